"""The wire form of a stored message, shared by every backend.

Rules of this file (RFC 1939 §3 and §11; the sizes in LIST/STAT depend on them):

* Every bare LF becomes CRLF; an existing CRLF is kept; a lone CR is kept as it is.
* A message that does not end with LF gets a final CRLF.  The empty message stays empty:
  it has no line to terminate, and the ``.`` terminator then starts a line anyway.
* Byte-stuffing is *not* done here: the protocol core stuffs, after the size is counted.
* Work is done with whole-buffer ``bytes`` operations (``count``, ``replace``), never a
  Python loop per line, and state carried across chunk boundaries (a CR ending one chunk
  and an LF starting the next are one CRLF), so a message streams in bounded memory.
"""

from __future__ import annotations


def wire_size(data: bytes) -> int:
    """Return the length of :func:`to_wire` of ``data`` without building it."""
    if not data:
        return 0
    bare_lf = data.count(b"\n") - data.count(b"\r\n")
    return len(data) + bare_lf + (0 if data.endswith(b"\n") else 2)


def hold_cr(data: bytes, held: bool) -> tuple[bytes, bool]:
    """One chunk of a stream whose line ends are converted, and whether a CR is now held.

    ``held``: the previous chunk ended in a CR, held back until this chunk shows whether
    an LF follows it; it is put back in front.  A CR ending ``data`` is held in turn.
    """
    if held:
        data = b"\r" + data
    if data.endswith(b"\r"):
        return data[:-1], True
    return data, False


def to_wire(data: bytes) -> bytes:
    """Return ``data`` with bare LFs as CRLF and a final CRLF if it lacks a line end."""
    normaliser = CrlfNormaliser()
    return normaliser.feed(data) + normaliser.finish()


class CrlfNormaliser:
    """Turns a stored message, fed in chunks of any size, into its wire form.

    A CR at the end of a chunk is held back until the next chunk shows whether an LF
    follows it.  Output chunks are at most ``2 * len(input) + 1`` octets long.
    """

    __slots__ = ("_ends_lf", "_held_cr", "_nonempty")

    def __init__(self) -> None:
        self._held_cr = False
        self._ends_lf = False
        self._nonempty = False

    def feed(self, data: bytes) -> bytes:
        """Return the wire form of ``data``, given everything fed before it.

        A ``bytearray`` is accepted too, and then never returned itself: the result is a
        new object (the Maildir reader refills its read buffer right after).
        """
        if not data:
            return b""
        self._nonempty = True
        self._ends_lf = data.endswith(b"\n")
        data, self._held_cr = hold_cr(data, self._held_cr)
        if b"\r" not in data:
            return data.replace(b"\n", b"\r\n")
        # CRLF -> LF -> CRLF keeps the existing CRLFs, converts bare LFs and leaves lone
        # CRs alone ("\r\r\n" -> "\r\n" -> "\r\r\n").
        return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        """Return what ends the message: a held CR, then CRLF if the last byte was not LF."""
        tail = b"\r" if self._held_cr else b""
        self._held_cr = False
        if self._nonempty and not self._ends_lf:
            tail += b"\r\n"
        return tail


class WireCounter:
    """Counts the wire size of a message fed in chunks, without producing the output.

    Also counts what Dovecot records as ``W=`` (the "virtual size": every bare LF counted
    as two octets, no final line end added), so a delivery can name its file as Dovecot
    would.
    """

    __slots__ = ("_bare_lf", "_ends_lf", "_prev_cr", "size")

    def __init__(self) -> None:
        #: Octets fed so far (the stored size, Dovecot's ``S=``).
        self.size = 0
        self._bare_lf = 0
        self._prev_cr = False
        self._ends_lf = False

    def feed(self, data: bytes) -> None:
        """Count ``data``, the next chunk of the stored message."""
        if not data:
            return
        self.size += len(data)
        self._bare_lf += data.count(b"\n") - data.count(b"\r\n")
        if self._prev_cr and data.startswith(b"\n"):
            self._bare_lf -= 1
        self._prev_cr = data.endswith(b"\r")
        self._ends_lf = data.endswith(b"\n")

    @property
    def virtual_size(self) -> int:
        """Dovecot's ``W=``: the size with every bare LF counted as CRLF."""
        return self.size + self._bare_lf

    @property
    def wire_size(self) -> int:
        """The size as sent: :attr:`virtual_size` plus a final CRLF if one is missing."""
        if self.size == 0:
            return 0
        return self.virtual_size + (0 if self._ends_lf else 2)
