"""ServerContext.flush_soon: replies leave at the end of the loop's turn, in order."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import pytest

from pop3d.config import from_mapping
from pop3d.server.connection import Pop3Protocol
from pop3d.server.context import ServerContext
from pop3d.session import Backends


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class _Conn:
    """Stands in for a connection: notes when the server asks it to write."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, flushed: list[str]) -> None:
        self.loop, self.name, self.flushed = loop, name, flushed
        self.peer = name
        self.transport = _Transport()

    def flush(self) -> None:
        if self.name == "broken":
            raise RuntimeError("write failed")
        self.flushed.append(self.name)


def test_flushes_wait_for_the_end_of_the_turn_and_keep_their_order(tmp_path: Path) -> None:
    ctx = ServerContext(from_mapping({}, tmp_path), cast("Backends", None), None)

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        flushed: list[str] = []
        a, b = (cast("Pop3Protocol", _Conn(loop, n, flushed)) for n in "ab")
        ctx.flush_soon(a)
        ctx.flush_soon(b)
        assert flushed == []  # nothing is written while this turn's events are handled
        await asyncio.sleep(0)
        assert flushed == ["a", "b"]
        ctx.flush_soon(b)  # a later turn gets its own flush
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return flushed

    assert asyncio.run(main()) == ["a", "b", "b"]


def test_a_failing_connection_does_not_keep_the_others_from_writing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = ServerContext(from_mapping({}, tmp_path), cast("Backends", None), None)

    async def main() -> tuple[list[str], bool]:
        loop = asyncio.get_running_loop()
        flushed: list[str] = []
        conns = [_Conn(loop, n, flushed) for n in ("a", "broken", "b")]
        for conn in conns:
            ctx.flush_soon(cast("Pop3Protocol", conn))
        await asyncio.sleep(0)
        return flushed, conns[1].transport.aborted

    assert asyncio.run(main()) == (["a", "b"], True)
    assert "internal error writing to broken" in caplog.text


def test_shutdown_writes_what_this_turn_queued(tmp_path: Path) -> None:
    """A sign-off queued in the turn the server stops in is written before shutdown returns."""
    ctx = ServerContext(from_mapping({}, tmp_path), cast("Backends", None), None)

    async def main() -> list[str]:
        flushed: list[str] = []
        ctx.flush_soon(cast("Pop3Protocol", _Conn(asyncio.get_running_loop(), "a", flushed)))
        await ctx.shutdown()  # no session open: it returns without waiting a turn
        return list(flushed)

    assert asyncio.run(main()) == ["a"]
