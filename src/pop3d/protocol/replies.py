"""Building replies: status lines with RFC 2449/3206 response codes, and multi-line bodies.

Rules:

* A status line is ``+OK`` or ``-ERR``, an optional ``[CODE]``, our text, CRLF.  The
  text is always ours: nothing the client sent is echoed.
* A multi-line body is byte-stuffed (RFC 1939 §3: every line that begins with ``.``
  gets another ``.``; the very first line of a message included) and ends with ``.CRLF``.
* Message bodies arrive from storage as CRLF-normalised chunks of any size; stuffing keeps
  its line-start state across chunks and works on whole buffers, so RETR does no
  per-line Python work (popa3d ``pop_reply_multiline``; Twisted's ``transformChunk``
  loses the state at chunk boundaries).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

CRLF = b"\r\n"
#: A line that starts with a dot.  ``re.sub`` stuffs faster than ``bytes.replace``:
#: replace checks every LF as a candidate match, the regex engine scans for the pair
#: (figures: docs/performance.md).
_LINE_START_DOT = re.compile(rb"\n\.")
#: Where dots are rarer than one per this many octets, :func:`_stuff` walks from dot to
#: dot with ``bytes.find`` (memchr) instead of the regex (which looks at every LF).  A
#: step of that walk costs about as much Python time as the regex spends on 256 octets,
#: so a chunk never costs more than twice the regex alone.
_SPARSE_DOTS = 256
#: ... and where line-start dots are rarer than one per this many octets: each cut costs
#: two pieces (Python work here, an iovec in the transport's ``writev``), so a chunk
#: with more of them (quoted text, logs, ASCII art) goes to the regex, which returns
#: one piece.
_SPARSE_CUTS = 16 * 1024
#: Chunks shorter than this go to the regex: on a small message the walk's per-dot
#: Python costs more than the regex; it pays on big chunks.
_WALK_MIN = 64 * 1024
TERMINATOR = b".\r\n"


class RespCode(enum.Enum):
    """Extended response codes (RFC 2449 §8, RFC 3206)."""

    #: The maildrop is locked by another session.
    IN_USE = "IN-USE"
    #: The user logged in too recently.
    LOGIN_DELAY = "LOGIN-DELAY"
    #: A temporary system problem; retrying later may succeed.
    SYS_TEMP = "SYS/TEMP"
    #: A permanent system problem.
    SYS_PERM = "SYS/PERM"
    #: The credentials were refused (RFC 3206).
    AUTH = "AUTH"
    #: UTF-8 is required for this user (RFC 6856).
    UTF8 = "UTF8"


def ok(text: str = "") -> bytes:
    """Return a ``+OK`` status line.

    Made as text and encoded once: cheaper than joining encoded parts (``err`` alike).
    """
    return f"+OK {text}\r\n".encode() if text else b"+OK\r\n"


def err(text: str, code: RespCode | None = None) -> bytes:
    """Return a ``-ERR`` status line, with ``[CODE]`` when given."""
    return (f"-ERR [{code.value}] {text}\r\n" if code else f"-ERR {text}\r\n").encode()


def multiline(status: bytes, lines: list[bytes]) -> bytes:
    """Return a complete multi-line reply whose ``lines`` need no stuffing (listings)."""
    return status + b"".join(line + CRLF for line in lines) + TERMINATOR


#: Pieces of output: a stuffed chunk is the pieces between its line-start dots, which a
#: transport can write with one ``writev`` instead of joining them into a copy first.
Piece = bytes | memoryview
#: Stuffs every line-start dot of a big chunk except one at its very start (the caller
#: adds that one), returning pieces.  The default is the regex; the server installs a
#: faster one where it has one (:mod:`pop3d.simdtext`, ``Pop3Settings.stuff_dense``).
DenseStuffer = Callable[[bytes], list[Piece]]


def stuff_dense(chunk: bytes) -> list[Piece]:
    """The :data:`DenseStuffer` of the standard library: one regex substitution."""
    return [_LINE_START_DOT.sub(b"\n..", chunk)]


def _stuff(chunk: bytes, *, first: bool, dense: DenseStuffer = stuff_dense) -> list[Piece]:
    """Return ``chunk`` with a dot added before every dot that starts a line, as pieces.

    Every LF ends a line (input is CRLF-normalised), so a dot after an LF starts one;
    ``first`` says whether the chunk itself starts at a line start.  Dots are found with
    ``bytes.find`` and the chunk is cut before each line-start dot, with an extra ``.``
    between the pieces (mail is mostly attachments and prose, where dots are sparse); a
    chunk dense with dots goes to ``dense``.  For chunks of at least :data:`_WALK_MIN`
    octets: :meth:`DotStuffer.feed` stuffs a smaller one itself, with the regex.
    """
    find = chunk.find
    cuts = [0] if first and chunk[0] == 0x2E else []
    budget = len(chunk) // _SPARSE_DOTS
    cut_budget = len(chunk) // _SPARSE_CUTS
    pos = find(b".", 1)
    while pos >= 0:
        if chunk[pos - 1] == 0x0A:
            cuts.append(pos)
            cut_budget -= 1
        budget -= 1
        if budget < 0 or cut_budget < 0:
            stuffed = dense(chunk)
            return [b".", *stuffed] if cuts and cuts[0] == 0 else stuffed  # no copy
        pos = find(b".", pos + 1)
    if not cuts:
        return [chunk]
    view = memoryview(chunk)
    pieces: list[Piece] = [view[: cuts[0]]] if cuts[0] else []
    for a, b in zip(cuts, [*cuts[1:], len(chunk)], strict=True):
        pieces += (b".", view[a:b])
    return pieces


class DotStuffer:
    """Byte-stuffs a CRLF-normalised stream given in chunks of any size."""

    __slots__ = ("_at_line_start", "_dense")

    def __init__(self, dense: DenseStuffer = stuff_dense) -> None:
        self._at_line_start = True
        self._dense = dense

    def restart(self) -> None:
        """Start a new stream (one stuffer serves every message of a session)."""
        self._at_line_start = True

    def feed(self, chunk: bytes) -> list[Piece]:
        """Return ``chunk`` stuffed, as pieces to send in order (a big chunk is not copied).

        Remembers whether the chunk ended at a line start.
        """
        if not chunk:
            return []
        first = self._at_line_start
        self._at_line_start = chunk[-1] == 0x0A
        if len(chunk) < _WALK_MIN:
            # A small chunk (most messages are one): the regex, here, without a call.
            out = _LINE_START_DOT.sub(b"\n..", chunk)
            return [b"." + out if first and chunk[0] == 0x2E else out]
        return _stuff(chunk, first=first, dense=self._dense)

    def end(self) -> bytes:
        """Return the terminator (with a line end first if the stream lacked one)."""
        return TERMINATOR if self._at_line_start else CRLF + TERMINATOR


class TopFilter:
    """Passes a message's header, the blank line after it, and ``lines`` body lines.

    Works across chunk boundaries without holding a line in memory (a line may be of any
    length).  Only TOP uses it; RETR skips it.
    """

    __slots__ = ("_done", "_in_header", "_line_len", "_lines_left")

    def __init__(self, lines: int) -> None:
        self._in_header = True
        self._lines_left = lines
        #: Octets of the current, unfinished line seen so far.
        self._line_len = 0
        self._done = False

    @property
    def done(self) -> bool:
        """True once everything TOP wants has passed."""
        return self._done

    def feed(self, chunk: bytes) -> bytes:
        """Return the part of ``chunk`` that belongs in the TOP response."""
        if self._done:
            return b""
        pos = 0
        n = len(chunk)
        while pos < n:
            if not self._in_header and self._lines_left == 0:
                self._done = True
                return chunk[:pos]
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                self._line_len += n - pos
                return chunk
            length = self._line_len + nl + 1 - pos
            self._line_len = 0
            pos = nl + 1
            if self._in_header:
                if length == 2:  # the empty line "\r\n" that ends the header
                    self._in_header = False
            else:
                self._lines_left -= 1
        if not self._in_header and self._lines_left == 0:
            self._done = True
        return chunk
