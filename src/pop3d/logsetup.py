"""Logging: to stderr, one line per event, one summary line per session.

Passwords never reach a log call (the core's events hide them in ``repr``; a test greps
the log of a whole session for the password).

Each line names the process (``pop3d[pid]``: workers share stderr).  The pid comes from
:mod:`pop3d.process`, not from the kernel for every record as :mod:`logging` does by
default (a ``getpid`` system call a session, on the login path).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from pop3d import process


class _Formatter(logging.Formatter):
    """The standard formatter, with the pid this module keeps and the time of day cached.

    ``asctime`` reads as the standard one's (``2026-11-27 06:00:00,123``, local time), but
    the date and time are formatted once a second, not for every record.
    """

    _second = -1
    _text = ""

    def format(self, record: logging.LogRecord) -> str:
        record.process = process.pid()
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._text},{int(record.msecs):03d}"


def setup(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send pop3d's logs to ``stream`` (stderr when ``None``) at ``level``.

    Only what the line shows is gathered for a record: :mod:`logging` by default also
    walks the stack for the caller's file and line, and looks up the thread and the
    multiprocessing process name (the "Optimization" section of its HOWTO).
    """
    logging.logProcesses = False  # the formatter above fills the pid in
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # noqa: SLF001 (the switch the HOWTO names)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger("pop3d")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
