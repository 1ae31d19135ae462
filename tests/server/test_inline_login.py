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
from typing import cast

import pytest

from pop3d import metrics
from pop3d.server.connection import Pop3Protocol
from pop3d.server.context import ServerContext

from .fakes import RecordingTransport, maildir_server

OLD = 1_600_000_000


def _server(tmp_path: Path, messages: int = 2) -> ServerContext:
    (tmp_path / "users").write_text("alice:{PLAIN}alice-pass\n")
    maildir = tmp_path / "mail" / "alice" / "Maildir"
    for folder in ("cur", "new", "tmp"):
        (maildir / folder).mkdir(parents=True)
    for i in range(messages):
        (maildir / "cur" / f"{OLD + i}.M1P1.host:2,").write_bytes(b"Subject: %d\n\nbody\n" % i)
    for folder in ("cur", "new"):
        os.utime(maildir / folder, (OLD, OLD))  # not racy: its listing may be remembered
    return maildir_server(tmp_path)


async def _until(done: Callable[[], bool]) -> None:
    for _ in range(100):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("the session did not get there")


async def _session(ctx: ServerContext, *commands: bytes) -> tuple[RecordingTransport, list[bool]]:
    """Run one session; for each command, whether a task was left running after it."""
    transport = RecordingTransport()
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

    async def main() -> list[tuple[RecordingTransport, list[bool]]]:
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

    async def main() -> list[tuple[RecordingTransport, list[bool]]]:
        await _session(ctx, b"USER alice", b"PASS alice-pass", b"QUIT")  # remembered now
        wrong = await _session(ctx, b"USER alice", b"PASS wrong", b"QUIT")
        holder = Pop3Protocol(ctx, implicit_tls=False)
        holder.connection_made(cast("asyncio.Transport", RecordingTransport()))
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


def test_metrics_are_reported_only_while_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's result label and a RETR's octets reach the metrics once they are on
    (``metrics.on``, read at the time of each call), and nothing is reported while off."""
    ctx = _server(tmp_path)
    ended: list[str] = []
    retrieved: list[int] = []
    monkeypatch.setattr(metrics, "session_ended", ended.append)
    monkeypatch.setattr(metrics, "retrieved", retrieved.append)

    async def main() -> RecordingTransport:
        await _session(ctx, b"USER alice", b"PASS alice-pass", b"RETR 1", b"QUIT")
        assert (ended, retrieved) == ([], [])  # off: nothing worked out, nothing reported
        monkeypatch.setattr(metrics, "on", True)
        transport, _ = await _session(ctx, b"USER alice", b"PASS alice-pass", b"RETR 2", b"QUIT")
        await _session(ctx, b"QUIT")
        return transport

    transport = asyncio.run(main())
    assert ended == ["quit", "quit_auth"]
    message = b"Subject: 1\r\n\r\nbody\r\n"
    assert message + b".\r\n" in b"".join(transport.out)
    assert retrieved == [len(message)]  # the message's wire octets
