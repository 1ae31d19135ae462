"""pop3d's log lines: the standard format, made cheaper."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

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
