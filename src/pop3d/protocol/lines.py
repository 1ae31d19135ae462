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
        self._buf = bytearray()
        self._start = 0
        #: True while the rest of an overlong line is being thrown away.
        self._discarding = False

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._start and self._start == len(self._buf):
            self._buf.clear()
            self._start = 0
        self._buf += data

    def clear(self) -> None:
        """Drop everything buffered (used after STLS: pre-TLS bytes must not be answered)."""
        self._buf.clear()
        self._start = 0
        self._discarding = False

    def __len__(self) -> int:
        return len(self._buf) - self._start

    def next_line(self, limit: int) -> bytes | Overlong | None:
        """Return the next line without its line end, :data:`OVERLONG`, or ``None``.

        Args:
            limit: the longest acceptable line in octets, line end included.

        """
        buf = self._buf
        nl = buf.find(b"\n", self._start)
        if self._discarding:
            if nl < 0:
                self._start = len(buf)
                return None
            self._start = nl + 1
            self._discarding = False
            return OVERLONG
        if nl < 0:
            if len(buf) - self._start >= limit:
                self._start = len(buf)
                self._discarding = True
            self._compact()
            return None
        start = self._start
        self._start = nl + 1
        if nl + 1 - start > limit:
            return OVERLONG
        end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
        return bytes(buf[start:end])

    def _compact(self) -> None:
        if self._start:
            del self._buf[: self._start]
            self._start = 0
