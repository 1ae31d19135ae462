"""A bounded line splitter for the command channel.

Rules:

* A line ends at LF; a CR right before it is dropped (RFC 1939 asks for CRLF, but a bare
  LF is accepted as Dovecot and popa3d do, since no command can contain an LF).
* A line longer than the limit is never returned: its bytes are discarded up to and
  including its LF, and :data:`OVERLONG` is returned once in its place, so the tail of an
  overlong line never runs as a command (asyncio's ``readline`` limit gets this wrong:
  it drops the buffer and carries on with the tail).
* Memory is bounded by the limit plus one received chunk.
"""

from __future__ import annotations

import enum


class Overlong(enum.Enum):
    """Marker for a line that exceeded the limit and was discarded."""

    #: The one member.
    OVERLONG = "overlong"


OVERLONG = Overlong.OVERLONG


class LineBuffer:
    """Collects received bytes and hands out complete lines."""

    __slots__ = ("_buf", "_discarding", "_start")

    def __init__(self) -> None:
        #: Received octets from ``_start`` on are not taken yet.  While everything before
        #: a feed was taken, this is the received ``bytes`` object itself, and lines are
        #: sliced out of it as ``bytes``: slicing a bytearray and copying the slice into
        #: ``bytes`` costs about three times as much (CPython 3.11).  A tail left over
        #: when more arrives moves into a bytearray, which later feeds extend in place
        #: (so a client that drips octets behind unanswered lines costs no copy of them).
        self._buf: bytes | bytearray = b""
        self._start = 0
        #: True while the rest of an overlong line is being thrown away.
        self._discarding = False

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        buf = self._buf
        if self._start == len(buf):
            # Everything was taken: start over with these octets (bytes are immutable,
            # so they are kept without a copy).
            self._buf = data if type(data) is bytes else bytes(data)
            self._start = 0
        elif isinstance(buf, bytearray):
            buf += data
        else:
            self._buf = bytearray(memoryview(buf)[self._start :])
            self._buf += data
            self._start = 0

    def clear(self) -> None:
        """Drop everything buffered (used after STLS: pre-TLS bytes must not be answered)."""
        self._buf = b""
        self._start = 0
        self._discarding = False

    def pending(self) -> int:
        """Octets received and not taken yet.

        A method, for the driver asks after every read: ``len()`` of a Python class
        costs a C-to-Python call.
        """
        return len(self._buf) - self._start

    __len__ = pending

    def next_line(self, limit: int) -> bytes | Overlong | None:
        """Return the next line without its line end, :data:`OVERLONG`, or ``None``.

        Args:
            limit: the longest acceptable line in octets, line end included.

        """
        buf = self._buf
        start = self._start
        if start == len(buf):
            # Nothing left (most batches of commands end so): no search, and the octets
            # taken are released.
            if start:
                self._buf = b""
                self._start = 0
            return None
        nl = buf.find(b"\n", start)
        if self._discarding:
            if nl < 0:
                self._buf = b""
                self._start = 0
                return None
            self._start = nl + 1
            self._discarding = False
            return OVERLONG
        if nl < 0:
            if len(buf) - start >= limit:
                self._discarding = True
                self._buf = b""
                self._start = 0
            elif start:
                # Keep only the partial line, if any: what was taken is released.
                self._buf = buf[start:] if start < len(buf) else b""
                self._start = 0
            return None
        self._start = nl + 1
        if nl - start >= limit:
            return OVERLONG
        end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
        return buf[start:end] if type(buf) is bytes else bytes(buf[start:end])
