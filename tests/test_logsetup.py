"""pop3d's log lines: the standard format, made cheaper."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import select
import subprocess
import sys
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
    return stream, logsetup.get_logger("pop3d.session")


class _Records(logging.Handler):
    """Someone else's handler: keeps the records."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _theirs(logger: logging.Logger) -> Iterator[_Records]:
    """Someone else's handler on ``logger`` while the block runs."""
    theirs = _Records()
    logger.addHandler(theirs)
    try:
        yield theirs
    finally:
        logger.removeHandler(theirs)


def _messages(text: str) -> list[str]:
    """The messages of the log lines in ``text``, without what precedes them."""
    return [line.split(": ", 1)[1] for line in text.splitlines()]


def test_the_session_line_reads_as_the_standard_formatter_writes_it(
    logged: tuple[_Writes, logging.Logger],
) -> None:
    """pop3d's lean logger and formatter write what logging's defaults would."""
    stream, session = logged
    session.info("session peer=%s user=%s", "a", "b")
    (line,) = stream.getvalue().splitlines(keepends=True)
    assert (m := _LINE.fullmatch(line)) is not None
    assert m.groups() == (str(process.pid()), "session peer=a user=b")
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    record = logging.LogRecord(
        "pop3d.session", logging.INFO, __file__, 1, "session peer=%s user=%s", ("a", "b"), None
    )
    assert standard.format(record)[23:] == line[23:].rstrip("\n")  # all but the time


def test_only_pop3d_loggers_are_lean() -> None:
    """get_logger's class is pop3d's for that logger only; pop3d's modules use it."""
    code = (
        "import logging, pop3d.serve\n"
        "from pop3d import logsetup\n"
        "lean = logsetup._LeanLogger\n"
        "assert all(isinstance(logging.getLogger(n), lean)"
        " for n in ('pop3d.session', 'pop3d.auth'))\n"
        "assert type(logging.getLogger('someone.else')) is logging.Logger\n"
        "assert logging.getLoggerClass() is logging.Logger\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_lean_record_keeps_extra_fields_and_refuses_overwrites(
    logged: tuple[_Writes, logging.Logger],
) -> None:
    _, session = logged
    with _theirs(session) as theirs:
        session.warning("x %(a)s", {"a": 1}, extra={"audit": {"event": "e"}})
        with pytest.raises(KeyError):
            session.warning("y", extra={"msg": "no"})
    (record,) = theirs.records
    assert record.getMessage() == "x 1"
    assert record.audit == {"event": "e"}  # type: ignore[attr-defined]


def test_the_session_line_is_an_ordinary_record_under_another_setup(
    logged: tuple[_Writes, logging.Logger],
) -> None:
    """A handler of someone else's on the way gets the record as well."""
    stream, session = logged
    with _theirs(session) as theirs:
        session.info("session peer=a")
    assert [r.getMessage() for r in theirs.records] == ["session peer=a"]
    assert stream.getvalue().endswith(": session peer=a\n")  # and pop3d's line as well


def test_below_info_nothing_is_written(restore_pop3d_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logsetup.setup("WARNING", stream)
    logging.getLogger("pop3d.session").info("session peer=a")
    assert stream.getvalue() == ""


def test_lines_of_the_loop_wait_and_leave_together_in_order(
    logged: tuple[_Writes, logging.Logger], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logsetup, "_WRITE_AFTER", 0.05)
    stream, session = logged
    seen: list[str] = []

    async def main() -> None:
        with logsetup.buffered_for(asyncio.get_running_loop()):
            session.info("one")
            session.info("two")
            await asyncio.sleep(0)
            session.info("three")
            seen.append(stream.getvalue())  # nothing written yet, turns later
            await asyncio.sleep(0.2)
            seen.append(stream.getvalue())
            session.info("four")
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
            session.info("before")
            session.warning("refused")
            return stream.getvalue()

    written = asyncio.run(main())
    assert _messages(written) == ["before", "refused"]


def test_only_session_lines_wait_audit_and_other_lines_are_written_at_once(
    logged: tuple[_Writes, logging.Logger],
) -> None:
    stream, session = logged

    async def main() -> list[str]:
        seen = []
        with logsetup.buffered_for(asyncio.get_running_loop()):
            session.info("session waits")
            seen.append(stream.getvalue())
            logging.getLogger("pop3d.auth").info("auth ok")  # an audit line
            seen.append(stream.getvalue())
            session.info("session waits again")
            logging.getLogger("pop3d.server").info("listening")
            seen.append(stream.getvalue())
        return seen

    seen = asyncio.run(main())
    assert seen[0] == ""
    assert _messages(seen[1]) == ["session waits", "auth ok"]
    assert _messages(seen[2]) == ["session waits", "auth ok", "session waits again", "listening"]


def test_other_threads_write_at_once(logged: tuple[_Writes, logging.Logger]) -> None:
    stream, session = logged

    async def main() -> str:
        with logsetup.buffered_for(asyncio.get_running_loop()):
            session.info("loop")
            worker = threading.Thread(target=session.info, args=("thread",))
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
                session.info(name)

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
                session.info("pending in the parent")
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
                session.info(name)
            written.append(stream.getvalue())
            await asyncio.sleep(0.2)
            written.append(stream.getvalue())

    asyncio.run(main())
    assert 0 < len(_messages(written[0])) < len(names)  # the full batches, at once
    assert _messages(written[1]) == names  # the rest, by the timer
    assert timers == [0.05]


def test_a_filter_on_pop3ds_handler_is_asked(logged: tuple[_Writes, logging.Logger]) -> None:
    stream, session = logged
    handler = logging.getLogger("pop3d").handlers[0]
    handler.addFilter(lambda record: "drop" not in record.getMessage())
    try:
        session.info("session keep")
        session.info("session drop")
    finally:
        handler.filters.clear()
    assert _messages(stream.getvalue()) == ["session keep"]
