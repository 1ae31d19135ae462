"""Logging: to stderr, one line per event, one summary line per session.

Passwords never reach a log call (the core's events hide them in ``repr``; a test greps
the log of a whole session for the password).

Each line names the process (``pop3d[pid]``: workers share stderr).  The pid comes from
:mod:`pop3d.process`, not from the kernel for every record as :mod:`logging` does by
default (a ``getpid`` system call a session, on the login path).

While a server's event loop runs (:func:`buffered_for`), INFO lines logged in its
thread are gathered for up to a tenth of a second and written together (nginx's
``access_log ... buffer= flush=``), instead of one ``write`` each: a write per login was
6 % of a login's CPU time in the benchmark, with about one session ending per turn of the
loop.  Warnings and errors are written at once (after what is pending), and so are lines
of other threads.  Every write is at most ``PIPE_BUF`` octets of whole lines, so workers
sharing a pipe never interleave inside a line.  A ``kill -9`` can lose the INFO lines of
the last tenth of a second; a stop writes them.

The session line (:func:`info`) skips :mod:`logging`'s per-record machinery when pop3d's
own handler is the one that would write it: at one line a login, a record, its dispatch
and its formatting were a fifth of a login's CPU time in the benchmark.  The line reads
exactly as a record's would; with any other logging set-up it is an ordinary record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
import re
import select
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

from pop3d import process
from pop3d.config import LogConfig
from pop3d.errors import ConfigError

#: The most octets a pipe takes in one atomic ``write`` (POSIX: at least 512).
_ATOMIC_WRITE = getattr(select, "PIPE_BUF", 512)

#: How long a line of the loop's thread may wait for others to be written with (s).
_WRITE_AFTER = 0.1

#: What a line shows; :func:`_line` writes it (the formatter and :func:`info` alike).
_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def _line(asctime: str, levelname: str, name: str, message: str) -> str:
    """A line of :data:`_FORMAT`, with the pid this module keeps."""
    return f"{asctime} {levelname} {name}[{process.pid()}]: {message}"


class _Clock:
    """The standard ``asctime`` (``2026-11-27 06:00:00,123``, local time), made cheaper.

    The date and time of day are formatted once a second rather than for every line.
    """

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def text(self, second: int, msecs: int) -> str:
        if second != self._second:
            self._text = time.strftime(
                logging.Formatter.default_time_format, logging.Formatter.converter(second)
            )
            self._second = second
        return f"{self._text},{msecs:03d}"


class _Formatter(logging.Formatter):
    """The standard formatter of :data:`_FORMAT`, with cheaper pid and time of day.

    The message part is :func:`_line`'s; the exception and stack text, the standard's.
    """

    def __init__(self) -> None:
        super().__init__(_FORMAT)
        self.clock = _Clock()

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        return _line(record.asctime, record.levelname, record.name, record.message)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self.clock.text(int(record.created), int(record.msecs))


class _Handler(logging.StreamHandler[TextIO]):
    """A stream handler whose INFO lines, in the loop's thread, wait to be written together."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        #: Lines (newline included) not written yet; only the loop's
        #: thread touches them.
        self._pending: list[str] = []
        self._pending_octets = 0
        #: The one timer that writes them (armed by the first line with none armed).
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if record.levelno >= logging.WARNING:
                # A warning or an error is on its way out before anything else happens.
                self._write_pending()
                self._write_now(line)
            else:
                self.write_line(line)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_line(self, line: str) -> None:
        """Write ``line`` (with its newline), in the loop's thread within :data:`_WRITE_AFTER`.

        Anywhere else, it is written at once.
        """
        if self._loop is None or threading.get_ident() != self._loop_thread:
            self._write_now(line)
            return
        octets = len(line) if line.isascii() else len(line.encode("utf-8", "replace"))
        if self._pending_octets + octets > _ATOMIC_WRITE:
            self._write_pending()
        if self._timer is None:
            self._timer = self._loop.call_later(_WRITE_AFTER, self._timed_out)
        self._pending.append(line)
        self._pending_octets += octets

    def _timed_out(self) -> None:
        self._timer = None
        self._write_pending()

    def _write_pending(self) -> None:
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            return  # the loop's thread writes its own lines
        lines, self._pending, self._pending_octets = self._pending, [], 0
        if lines:
            self._write_now("".join(lines))

    def _write_now(self, text: str) -> None:
        self.acquire()
        try:
            self.stream.write(text)
            self.stream.flush()
        finally:
            self.release()

    def flush(self) -> None:
        self._write_pending()
        super().flush()

    def bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Gather this thread's lines while ``loop`` runs; ``None``: write at once."""
        self._write_pending()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = loop
        self._loop_thread = threading.get_ident() if loop is not None else 0

    def forget_pending(self) -> None:
        """In a forked child: the parent writes what it had pending, not the child."""
        self._pending, self._pending_octets, self._loop, self._timer = [], 0, None, None


#: pop3d's handler, once :func:`setup` has run.
_handler: _Handler | None = None


def setup(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send pop3d's logs to ``stream`` (stderr when ``None``) at ``level``.

    Only what the line shows is gathered for a record: :mod:`logging` by default also
    walks the stack for the caller's file and line, and looks up the thread and the
    multiprocessing process name (the "Optimization" section of its HOWTO).
    """
    global _handler  # noqa: PLW0603 (one handler per process)
    logging.logProcesses = False  # the formatter above fills the pid in
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # noqa: SLF001 (the switch the HOWTO names)
    if _handler is not None:
        with contextlib.suppress(OSError, ValueError):  # as logging.shutdown: closed stream
            _handler.flush()
    _handler = _Handler(sys.stderr if stream is None else stream)
    _handler.setFormatter(_Formatter())
    root = logging.getLogger("pop3d")
    root.handlers[:] = [_handler]
    root.setLevel(level.upper())
    root.propagate = False


@contextlib.contextmanager
def buffered_for(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """While inside, INFO lines of this thread wait up to :data:`_WRITE_AFTER` for others.

    Leaving writes what is pending.
    """
    handler = _handler
    if handler is None:
        yield
        return
    handler.bind(loop)
    try:
        yield
    finally:
        handler.bind(None)


def info(logger: logging.Logger, message: str) -> None:
    """Log ``message``, already formatted, at INFO on ``logger`` (a child of ``pop3d``).

    Written straight into pop3d's handler when that handler alone would write the record
    (:func:`setup` ran and nothing was added or filtered since); an ordinary record
    otherwise.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _handler
    parent = logger.parent
    if (
        handler is None
        or logger.handlers
        or logger.filters
        or not logger.propagate
        or parent is None
        or len(parent.handlers) != 1
        or parent.handlers[0] is not handler
        or parent.filters
        or handler.filters
        or handler.level > logging.INFO
    ):
        logger.info("%s", message)
        return
    formatter = handler.formatter
    if not isinstance(formatter, _Formatter):  # JSON lines: an ordinary record
        logger.info("%s", message)
        return
    now = time.time_ns()
    stamp = formatter.clock.text(now // 1_000_000_000, now % 1_000_000_000 // 1_000_000)
    handler.write_line(_line(stamp, "INFO", logger.name, message) + "\n")


# ---------------------------------------------------------------------- [log] targets

#: ``key=value`` fields of the session line (values without spaces).
_FIELD = re.compile(r"(\w+)=(\S+)")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``pid``, ``message``, fields.

    The fields are the audit line's (``event``, ``user``, ``rip``, ``mech``, ``reason``,
    ``tls``: :mod:`pop3d.audit` passes them) and the session line's ``key=value`` pairs
    (``peer``, ``user``, ``via``, ``result``, ``tls``, ...).  Keys are stable across
    versions, as the text shapes are.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON object (no newline)."""
        message = record.getMessage()
        out: dict[str, object] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": process.pid(),
            "message": message,
        }
        fields = getattr(record, "audit", None)
        if isinstance(fields, dict):
            out.update(fields)
        elif record.name == "pop3d.session" and message.startswith("session "):
            out["event"] = "session"
            out.update(_FIELD.findall(message))
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _iso_time(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


class _SyslogFormatter(logging.Formatter):
    """``pop3d[pid]: LEVEL logger: message`` (the tag and pid journald and syslog expect)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if self.inner is not None:
            body = self.inner.format(record)
        else:
            body = f"{record.levelname} {record.name}: {record.getMessage()}"
            if record.exc_info:
                body += "\n" + self.formatException(record.exc_info)
        return f"pop3d[{process.pid()}]: {body}"


def configure(log: LogConfig, level: str | None = None) -> None:
    """Send pop3d's logs where ``[log]`` says, in its format, at its level.

    ``level`` (``serve --log-level``) overrides ``[log] level``.  Run in the supervisor
    before workers fork (and again at each reload): the file or syslog socket is opened
    with the supervisor's privileges and inherited.

    Raises:
        ConfigError: the log file cannot be opened or the syslog socket reached.

    """
    global _handler  # noqa: PLW0603 (one handler per process)
    chosen = (level or log.level).upper()
    root = logging.getLogger("pop3d")
    if log.target == "stderr" and log.format == "text":
        old = list(root.handlers)
        setup(chosen)
        _close_all_but(old, root.handlers[0])
        return
    handler: logging.Handler
    if log.target == "syslog":
        try:
            handler = logging.handlers.SysLogHandler(
                address=str(log.syslog_socket),
                facility=logging.handlers.SysLogHandler.facility_names[log.facility],
            )
        except OSError as exc:
            raise ConfigError(
                f"[log] syslog_socket: cannot send to {log.syslog_socket}: {exc.strerror}"
            ) from None
        handler.setFormatter(_SyslogFormatter(JsonFormatter() if log.format == "json" else None))
        new_handler = None
    else:
        stream: TextIO = sys.stderr
        if log.target == "file":
            assert log.file is not None
            try:
                stream = log.file.open("a", encoding="utf-8", buffering=1)
            except OSError as exc:
                raise ConfigError(f"[log] file: cannot open {log.file}: {exc.strerror}") from None
        new_handler = _Handler(stream)
        new_handler.setFormatter(JsonFormatter() if log.format == "json" else _Formatter())
        handler = new_handler
    if _handler is not None:
        with contextlib.suppress(OSError, ValueError):
            _handler.flush()
    old = list(root.handlers)
    root.handlers[:] = [handler]
    _handler = new_handler
    root.setLevel(chosen)
    root.propagate = False
    _close_all_but(old, handler)


def _close_all_but(handlers: list[logging.Handler], kept: logging.Handler) -> None:
    """Close the handlers replaced by a reload (a log file, a syslog socket)."""
    for previous in handlers:
        if previous is not kept and getattr(previous, "stream", None) is not sys.stderr:
            with contextlib.suppress(OSError, ValueError):
                previous.close()


def _forget_in_child() -> None:
    if _handler is not None:
        _handler.forget_pending()


os.register_at_fork(after_in_child=_forget_in_child)
