"""pop3d's log lines: the standard format, made cheaper."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import select
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pop3d import logsetup, process


@pytest.fixture
def restore_pop3d_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("pop3d")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def test_lines_read_as_the_standard_formatter_writes_them(
    restore_pop3d_logger: logging.Logger,
) -> None:
    """The cached time of day gives what logging.Formatter gives, record for record."""
    stream = io.StringIO()
    logsetup.setup("INFO", stream)
    ours = logging.getLogger("pop3d").handlers[0].formatter
    assert ours is not None
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    # Within one second, across a second, across a day, back in time, and on a .999.
    for created in (1_790_000_000.001, 1_790_000_000.5, 1_790_000_001.25,
                    1_790_086_400.999, 1_700_000_000.0, 1_790_000_000.999):
        record = logging.LogRecord("pop3d.session", logging.INFO, __file__, 1, "m %s", ("x",),
                                   None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        record.process = process.pid()
        assert ours.format(record) == standard.format(record)


def test_a_line_names_the_process(restore_pop3d_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logsetup.setup("INFO", stream)
    logging.getLogger("pop3d.session").info("session %s", "x")
    assert f" INFO pop3d.session[{process.pid()}]: session x\n" in stream.getvalue()


_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO pop3d\.session\[(\d+)\]: (.*)\n"
)


class _Writes(io.StringIO):
    """A stream that remembers what each ``write`` call was given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


@pytest.fixture
def logged(restore_pop3d_logger: logging.Logger) -> tuple[_Writes, logging.Logger]:
    """pop3d's logging set up at INFO into a fresh stream, and the session logger."""
    stream = _Writes()
    logsetup.setup("INFO", stream)
    return stream, logging.getLogger("pop3d.session")


class _Records(logging.Handler):
    """Someone else's handler: keeps the records."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _messages(text: str) -> list[str]:
    """The messages of the log lines in ``text``, without what precedes them."""
    return [line.split(": ", 1)[1] for line in text.splitlines()]


def test_the_session_line_reads_as_a_record_would(
    logged: tuple[_Writes, logging.Logger],
) -> None:
    """info() writes the line the formatter would write for the same record."""
    stream, session = logged
    logsetup.info(session, "session peer=a user=b")
    session.info("%s", "session peer=a user=b")
    direct, record = stream.getvalue().splitlines(keepends=True)
    assert (m := _LINE.fullmatch(direct)) is not None
    assert m.groups() == (str(process.pid()), "session peer=a user=b")
    assert direct[23:] == record[23:]  # all but the time


def test_the_session_line_is_an_ordinary_record_under_another_setup(
    logged: tuple[_Writes, logging.Logger],
) -> None:
    """With a handler of someone else's on the way, info() makes a record for it."""
    stream, session = logged
    theirs = _Records()
    session.addHandler(theirs)
    try:
        logsetup.info(session, "session peer=a")
    finally:
        session.removeHandler(theirs)
    assert [r.getMessage() for r in theirs.records] == ["session peer=a"]
    assert stream.getvalue().endswith(": session peer=a\n")  # and pop3d's line as well


def test_below_info_nothing_is_written(restore_pop3d_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logsetup.setup("WARNING", stream)
    logsetup.info(logging.getLogger("pop3d.session"), "session peer=a")
    assert stream.getvalue() == ""


def test_lines_of_the_loop_wait_and_leave_together_in_order(
    logged: tuple[_Writes, logging.Logger], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logsetup, "_WRITE_AFTER", 0.05)
    stream, session = logged
    seen: list[str] = []

    async def main() -> None:
        with logsetup.buffered_for(asyncio.get_running_loop()):
            logsetup.info(session, "one")
            session.info("two")
            await asyncio.sleep(0)
            logsetup.info(session, "three")
            seen.append(stream.getvalue())  # nothing written yet, turns later
            await asyncio.sleep(0.2)
            seen.append(stream.getvalue())
            logsetup.info(session, "four")
        seen.append(stream.getvalue())  # leaving writes what is pending

    asyncio.run(main())
    assert seen[0] == ""
    assert _messages(seen[1]) == ["one", "two", "three"]
    assert seen[2].endswith(": four\n")
    assert len(stream.calls) == 2  # one write for the three


def test_a_warning_is_written_at_once_after_what_is_pending(
    logged: tuple[_Writes, logging.Logger],
) -> None:
    stream, session = logged

    async def main() -> str:
        with logsetup.buffered_for(asyncio.get_running_loop()):
            logsetup.info(session, "before")
            session.warning("refused")
            return stream.getvalue()

    written = asyncio.run(main())
    assert _messages(written) == ["before", "refused"]


def test_other_threads_write_at_once(logged: tuple[_Writes, logging.Logger]) -> None:
    stream, session = logged

    async def main() -> str:
        with logsetup.buffered_for(asyncio.get_running_loop()):
            logsetup.info(session, "loop")
            worker = threading.Thread(target=logsetup.info, args=(session, "thread"))
            worker.start()
            worker.join()
            return stream.getvalue()

    written = asyncio.run(main())
    assert _messages(written) == ["thread"]


def test_writes_hold_whole_lines_within_pipe_buf(logged: tuple[_Writes, logging.Logger]) -> None:
    """Workers share stderr: a pipe mixes writes of PIPE_BUF octets or less only whole."""
    stream, session = logged
    names = [f"session user=user{i}-é-{'x' * 150}" for i in range(200)]

    async def main() -> None:
        with logsetup.buffered_for(asyncio.get_running_loop()):
            for name in names:
                logsetup.info(session, name)

    asyncio.run(main())
    assert len(stream.calls) > 1
    for call in stream.calls:
        assert len(call.encode()) <= select.PIPE_BUF
        assert call.endswith("\n")
    assert _messages(stream.getvalue()) == names


def test_a_forked_child_does_not_write_the_parents_pending_lines(
    restore_pop3d_logger: logging.Logger, tmp_path: Path
) -> None:
    log_file = tmp_path / "log"
    with log_file.open("a", encoding="utf-8") as stream:
        logsetup.setup("INFO", stream)
        session = logging.getLogger("pop3d.session")

        async def main() -> None:
            with logsetup.buffered_for(asyncio.get_running_loop()):
                logsetup.info(session, "pending in the parent")
                child = os.fork()
                if child == 0:  # pragma: no cover (the child)
                    logging.getLogger("pop3d").handlers[0].flush()
                    os._exit(0)
                os.waitpid(child, 0)

        asyncio.run(main())
    assert _messages(log_file.read_text(encoding="utf-8")) == ["pending in the parent"]


def test_one_timer_writes_what_the_full_batches_left(
    logged: tuple[_Writes, logging.Logger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches cut at PIPE_BUF go out at once; the rest waits for the one timer armed."""
    monkeypatch.setattr(logsetup, "_WRITE_AFTER", 0.05)
    stream, session = logged
    names = [f"session user=user{i}-{'x' * 150}" for i in range(60)]
    timers: list[float] = []
    written: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        real = loop.call_later

        def counting(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
            if getattr(callback, "__self__", None) is logging.getLogger("pop3d").handlers[0]:
                timers.append(delay)
            return real(delay, callback, *args)

        monkeypatch.setattr(loop, "call_later", counting)
        with logsetup.buffered_for(loop):
            for name in names:
                logsetup.info(session, name)
            written.append(stream.getvalue())
            await asyncio.sleep(0.2)
            written.append(stream.getvalue())

    asyncio.run(main())
    assert 0 < len(_messages(written[0])) < len(names)  # the full batches, at once
    assert _messages(written[1]) == names  # the rest, by the timer
    assert timers == [0.05]
