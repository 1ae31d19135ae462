"""A big RETR's chunks: full ones from the start, small ones after the peer stalled.

``Pop3Protocol`` streams a Maildir message through a transport that records each write
and, when told to, pauses the protocol as a full socket would (the peer stopped reading).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from pop3d.protocol import limits
from pop3d.server.connection import Pop3Protocol
from pop3d.server.context import ServerContext
from pop3d.storage.maildir import _MessageReader

from .fakes import RecordingTransport, maildir_server

#: LF line ends, as an MTA stores them: every chunk is converted on the way out.
LINE = b"x" * 998 + b"\n"


class _Socket(RecordingTransport):
    """Records the octets of each write; write number ``full_at`` fills it (a pause)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []
        self.full_at = -1
        self.protocol: Pop3Protocol | None = None

    def writelines(self, pieces: list[bytes]) -> None:
        self.writes.append(sum(map(len, pieces)))
        if len(self.writes) == self.full_at and self.protocol is not None:
            self.protocol.pause_writing()


async def _until(done: Callable[[], bool]) -> None:
    for _ in range(1000):  # the first login scans the Maildir in a thread
        if done():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the session did not get there")


def _server(tmp_path: Path, size: int) -> ServerContext:
    (tmp_path / "users").write_text("alice:{PLAIN}pw\n")
    maildir = tmp_path / "mail" / "alice" / "Maildir"
    for folder in ("cur", "new", "tmp"):
        (maildir / folder).mkdir(parents=True)
    (maildir / "cur" / "1600000000.M1P1.host:2,").write_bytes(LINE * (size // len(LINE)))
    return maildir_server(tmp_path)


def _raw(wire: int) -> int:
    """Raw octets of a chunk of ``LINE``s that went out as ``wire`` octets (CRLF)."""
    return wire * len(LINE) // (len(LINE) + 1)


def test_chunks_are_full_until_a_stall_then_start_small_and_double(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "SHRINK_AFTER_STALL", 0)  # a pause is a stall at once
    shrunk: list[int] = []
    shrink = _MessageReader.shrink

    def noted(reader: _MessageReader) -> None:
        shrunk.append(len(shrunk))
        shrink(reader)

    monkeypatch.setattr(_MessageReader, "shrink", noted)
    ctx = _server(tmp_path, 6 * limits.READ_CHUNK)

    async def main() -> list[int]:
        sock = _Socket()
        proto = Pop3Protocol(ctx, implicit_tls=False)
        sock.protocol = proto
        proto.connection_made(cast("asyncio.Transport", sock))
        proto.data_received(b"USER alice\r\nPASS pw\r\n")
        await _until(lambda: proto.username != "" and proto._task is None
                     and not proto._flush_queued)
        del sock.writes[:]  # the greeting and the login's replies
        sock.full_at = 3  # the third chunk fills the socket: the peer stalls
        proto.data_received(b"RETR 1\r\n")
        await _until(lambda: bool(shrunk))  # the read buffer goes
        proto.resume_writing()  # the peer reads again
        await _until(lambda: proto._task is None)
        proto.data_received(b"QUIT\r\n")
        await _until(lambda: sock.closed)
        proto.connection_lost(None)
        return sock.writes

    writes = asyncio.run(main())
    full, small = limits.READ_CHUNK, limits.READ_CHUNK_AFTER_STALL
    # Full chunks from the first (which carries the +OK line) to the one that stalled.
    assert [round(_raw(n) / full, 2) for n in writes[:3]] == [1.0, 1.0, 1.0]
    # Then small ones, doubling while the socket takes each whole, up to full ones again.
    assert [round(_raw(n) / small, 2) for n in writes[3:8]] == [1.0, 2.0, 4.0, 8.0, 16.0]
    # All of the message went out, with its +OK line and terminator.
    body = 6 * full // len(LINE) * (len(LINE) + 1)
    assert 0 < sum(writes) - body - len(b".\r\n") < 80
