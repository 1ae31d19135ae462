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


def test_the_session_line_reads_as_a_record_would(
    restore_pop3d_logger: logging.Logger,
) -> None:
    """info() writes the line the formatter would write for the same record."""
    stream = io.StringIO()
    logsetup.setup("INFO", stream)
    session = logging.getLogger("pop3d.session")
    logsetup.info(session, "session peer=a user=b")
    session.info("%s", "session peer=a user=b")
    direct, record = stream.getvalue().splitlines(keepends=True)
    assert (m := _LINE.fullmatch(direct)) is not None
    assert m.groups() == (str(process.pid()), "session peer=a user=b")
    assert direct[23:] == record[23:]  # all but the time


def test_the_session_line_is_an_ordinary_record_under_another_setup(
    restore_pop3d_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    """With a handler of someone else's on the way, info() makes a record for it."""
    stream = io.StringIO()
    logsetup.setup("INFO", stream)
    session = logging.getLogger("pop3d.session")
    session.addHandler(caplog.handler)
    try:
        logsetup.info(session, "session peer=a")
    finally:
        session.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records] == ["session peer=a"]
    assert stream.getvalue().endswith(": session peer=a\n")  # and pop3d's line as well


def test_below_info_nothing_is_written(restore_pop3d_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logsetup.setup("WARNING", stream)
    logsetup.info(logging.getLogger("pop3d.session"), "session peer=a")
    assert stream.getvalue() == ""


def test_lines_of_the_loop_wait_and_leave_together_in_order(
    restore_pop3d_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logsetup, "_WRITE_AFTER", 0.05)
    stream = _Writes()
    logsetup.setup("INFO", stream)
    session = logging.getLogger("pop3d.session")
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
    assert [line.split(": ")[1] for line in seen[1].splitlines()] == ["one", "two", "three"]
    assert seen[2].endswith(": four\n")
    assert len(stream.calls) == 2  # one write for the three


def test_a_warning_is_written_at_once_after_what_is_pending(
    restore_pop3d_logger: logging.Logger,
) -> None:
    stream = io.StringIO()
    logsetup.setup("INFO", stream)
    session = logging.getLogger("pop3d.session")

    async def main() -> str:
        with logsetup.buffered_for(asyncio.get_running_loop()):
            logsetup.info(session, "before")
            session.warning("refused")
            return stream.getvalue()

    written = asyncio.run(main())
    assert [line.split(": ")[1] for line in written.splitlines()] == ["before", "refused"]


def test_other_threads_write_at_once(restore_pop3d_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logsetup.setup("INFO", stream)
    session = logging.getLogger("pop3d.session")

    async def main() -> str:
        with logsetup.buffered_for(asyncio.get_running_loop()):
            logsetup.info(session, "loop")
            worker = threading.Thread(target=logsetup.info, args=(session, "thread"))
            worker.start()
            worker.join()
            return stream.getvalue()

    written = asyncio.run(main())
    assert [line.split(": ")[1] for line in written.splitlines()] == ["thread"]


def test_writes_hold_whole_lines_within_pipe_buf(restore_pop3d_logger: logging.Logger) -> None:
    """Workers share stderr: a pipe mixes writes of PIPE_BUF octets or less only whole."""
    stream = _Writes()
    logsetup.setup("INFO", stream)
    session = logging.getLogger("pop3d.session")
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
    assert [line.split(": ")[1] for line in stream.getvalue().splitlines()] == names


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
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert [line.split(": ")[1] for line in lines] == ["pending in the parent"]
