"""The login fast path: a fast password and an unchanged Maildir are answered at once.

``Pop3Protocol`` answers USER/PASS/STAT and the UPDATE of QUIT inside ``data_received``,
with no task, when the backends' ``*_now`` fast paths can; a refusal, a locked maildrop
or a Maildir that must be scanned still goes through a task, and gets the same answers.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from pop3d.app import build_authenticator, build_store
from pop3d.config import from_mapping
from pop3d.server.connection import Pop3Protocol
from pop3d.server.context import ServerContext
from pop3d.session import Backends, FailureDelays

OLD = 1_600_000_000


class _Transport:
    """Collects what the server writes."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if key == "peername" else default

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, pieces: list[bytes]) -> None:
        self.out.extend(pieces)

    def close(self) -> None:
        self.closed = True

    def __getattr__(self, name: str) -> Callable[..., None]:
        """Flow control (write limits, pausing reads) does nothing here."""
        if name in ("set_write_buffer_limits", "pause_reading", "resume_reading"):
            return lambda *args, **kwargs: None
        if name == "get_write_buffer_size":  # everything written is taken at once
            return lambda: 0  # type: ignore[return-value]
        raise AttributeError(name)

    def lines(self) -> list[bytes]:
        return b"".join(self.out).splitlines()


def _server(tmp_path: Path, messages: int = 2) -> ServerContext:
    (tmp_path / "users").write_text("alice:{PLAIN}alice-pass\n")
    maildir = tmp_path / "mail" / "alice" / "Maildir"
    for folder in ("cur", "new", "tmp"):
        (maildir / folder).mkdir(parents=True)
    for i in range(messages):
        (maildir / "cur" / f"{OLD + i}.M1P1.host:2,").write_bytes(b"Subject: %d\n\nbody\n" % i)
    for folder in ("cur", "new"):
        os.utime(maildir / folder, (OLD, OLD))  # not racy: its listing may be remembered
    cfg = from_mapping(
        {"auth": {"passwd_file": "users", "failure_delay": 0},
         "storage": {"maildir": "mail/%u/Maildir"}},
        tmp_path,
    )
    backends = Backends(build_authenticator(cfg), build_store(cfg), FailureDelays(0, 0))
    return ServerContext(cfg, backends, None)


async def _until(done: Callable[[], bool]) -> None:
    for _ in range(100):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("the session did not get there")


async def _session(ctx: ServerContext, *commands: bytes) -> tuple[_Transport, list[bool]]:
    """Run one session; for each command, whether a task was left running after it."""
    transport = _Transport()
    proto = Pop3Protocol(ctx, implicit_tls=False)
    proto.connection_made(cast("asyncio.Transport", transport))
    tasks = []
    for command in commands:
        proto.data_received(command + b"\r\n")
        tasks.append(proto._task is not None)
        await _until(lambda: proto._task is None)
    await _until(lambda: transport.closed)
    proto.connection_lost(None)
    return transport, tasks


def test_a_good_login_and_quit_run_no_task(tmp_path: Path) -> None:
    ctx = _server(tmp_path)

    async def main() -> list[tuple[_Transport, list[bool]]]:
        first = await _session(ctx, b"USER alice", b"PASS alice-pass", b"QUIT")
        # The first open scanned and remembered the Maildir: now it is all inline.
        again = await _session(ctx, b"USER alice", b"PASS alice-pass", b"STAT", b"DELE 1",
                               b"QUIT")
        last = await _session(ctx, b"USER alice", b"PASS alice-pass", b"QUIT")
        return [first, again, last]

    first, again, last = asyncio.run(main())
    assert first[1] == [False, True, False]
    transport, tasks = again
    assert tasks == [False, False, False, False, False]
    assert [line[:3] for line in transport.lines()] == [b"+OK"] * 6
    assert transport.lines()[3] == b"+OK 2 40"
    assert transport.lines()[5].endswith(b"(1 left)")
    # The inline UPDATE removed the message and released the lock.
    assert last[0].lines()[2].endswith(b"has 1 message (20 octets)")


def test_refusals_take_the_task_and_get_the_same_answers(tmp_path: Path) -> None:
    ctx = _server(tmp_path)

    async def main() -> list[tuple[_Transport, list[bool]]]:
        await _session(ctx, b"USER alice", b"PASS alice-pass", b"QUIT")  # remembered now
        wrong = await _session(ctx, b"USER alice", b"PASS wrong", b"QUIT")
        holder = Pop3Protocol(ctx, implicit_tls=False)
        holder.connection_made(cast("asyncio.Transport", _Transport()))
        holder.data_received(b"USER alice\r\nPASS alice-pass\r\n")
        locked = await _session(ctx, b"USER alice", b"PASS alice-pass", b"QUIT")
        holder.connection_lost(None)
        # The holder's lock is released by a task of the context: wait for it to end.
        await asyncio.wait_for(asyncio.gather(*ctx._tasks), 10)
        assert not ctx._tasks
        return [wrong, locked]

    (wrong, wrong_tasks), (locked, locked_tasks) = asyncio.run(main())
    assert wrong_tasks == [False, True, False]
    assert wrong.lines()[2] == b"-ERR [AUTH] invalid password"
    assert locked_tasks == [False, True, False]
    assert locked.lines()[2].startswith(b"-ERR [IN-USE]")
