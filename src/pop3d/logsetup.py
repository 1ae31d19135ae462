"""Logging: to stderr, one line per event, one summary line per session.

Passwords never reach a log call (the core's events hide them in ``repr``; a test greps
the log of a whole session for the password).

Only :mod:`logging`'s extension points are used, and only on pop3d's own loggers:

* :class:`_Formatter` writes the standard line (``asctime levelname name[pid]: message``)
  with the time of day formatted once a second and the pid from :mod:`pop3d.process`.
* pop3d's busy loggers (:func:`get_logger`) are of a class of ours, :class:`_LeanLogger`,
  made with :func:`logging.setLoggerClass` for them only: their records
  (:class:`_Record`) skip what no pop3d line shows, the caller's file and line, the thread
  and the process name.
* :class:`_Handler` writes the session lines (INFO of ``pop3d.session``) logged in the
  event loop's thread in batches (:func:`buffered_for`): gathered for up to
  :data:`_WRITE_AFTER` and written together (nginx's ``access_log ... buffer= flush=``),
  instead of one ``write`` each.  Every other line, the audit lines of ``pop3d.auth``
  above all, is written at once (after what is pending).  Every write is at most
  ``PIPE_BUF`` octets of whole lines, so workers sharing a pipe never interleave inside a
  line.  A ``kill -9`` can lose the session lines of the last tenth of a second; a stop
  writes them.  (What batching is worth: docs/performance.md.)
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
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from pop3d import process
from pop3d.config import LogConfig
from pop3d.errors import ConfigError

#: The most octets a pipe takes in one atomic ``write`` (POSIX: at least 512).
_ATOMIC_WRITE = getattr(select, "PIPE_BUF", 512)

#: How long a line of the loop's thread may wait for others to be written with (s).
_WRITE_AFTER = 0.1

#: What a line shows; :func:`_line` writes it.
_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def _head(levelname: str, name: str, pid: int) -> str:
    """What a line of :data:`_FORMAT` has between the time and the message."""
    return f" {levelname} {name}[{pid}]: "


def _line(asctime: str, levelname: str, name: str, message: str, pid: int | None) -> str:
    """A line of :data:`_FORMAT`; a record without a pid gets :mod:`pop3d.process`'s."""
    return asctime + _head(levelname, name, pid or process.pid()) + message


#: Heads of lines (:func:`_head`) a formatter keeps: loggers x levels x pids.
_HEADS = 256

#: Which lines wait for a batch: the session lines (INFO), in the loop's thread.
_BATCHED = "pop3d.session"

_START = time.time()


class _Record(logging.LogRecord):
    """A record with what pop3d's lines show: no caller, thread or process name.

    As :mod:`logging` makes it with ``logThreads``, ``logMultiprocessing`` and
    ``logProcesses`` off, and the pid of :mod:`pop3d.process`.
    """

    def __init__(  # noqa: PLR0917 (LogRecord's signature)
        self,
        name: str,
        level: int,
        pathname: str,
        lineno: int,
        msg: object,
        args: Any,
        exc_info: Any,
        func: str | None = None,
        sinfo: str | None = None,
    ) -> None:
        created = time.time()
        self.name = name
        self.msg = msg
        if args and len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            args = args[0]  # as LogRecord: logger.info("%(a)s", {"a": 1})
        self.args = args
        self.levelname = logging.getLevelName(level)
        self.levelno = level
        self.pathname = pathname
        self.filename = pathname
        self.module = "(unknown module)"
        self.exc_info = exc_info
        self.exc_text = None
        self.stack_info = sinfo
        self.lineno = lineno
        self.funcName = func or "(unknown function)"
        self.created = created
        self.msecs = (created - int(created)) * 1000
        self.relativeCreated = (created - _START) * 1000
        self.thread = None
        self.threadName = None
        self.processName = None
        self.process = process.pid()
        self.taskName = None


class _LeanLogger(logging.Logger):
    """A logger that makes :class:`_Record` records and does not look for its caller."""

    def findCaller(  # noqa: N802 (logging's name)
        self, stack_info: bool = False, stacklevel: int = 1  # noqa: ARG002 (its signature)
    ) -> tuple[str, int, str, str | None]:
        return "(unknown file)", 0, "(unknown function)", None

    def makeRecord(  # noqa: N802, PLR0917 (logging's name and signature)
        self,
        name: str,
        level: int,
        fn: str,
        lno: int,
        msg: object,
        args: Any,
        exc_info: Any,
        func: str | None = None,
        extra: Mapping[str, object] | None = None,
        sinfo: str | None = None,
    ) -> logging.LogRecord:
        record = _Record(name, level, fn, lno, msg, args, exc_info, func, sinfo)
        if extra is not None:
            for key, value in extra.items():
                if key in ("message", "asctime") or key in record.__dict__:
                    raise KeyError(f"Attempt to overwrite {key!r} in LogRecord")
                record.__dict__[key] = value
        return record


def get_logger(name: str) -> logging.Logger:
    """pop3d's logger ``name``, a :class:`_LeanLogger` (unless something made it before).

    The logger class is pop3d's only while this logger is made: other loggers of the
    process stay as they are.
    """
    previous = logging.getLoggerClass()
    logging.setLoggerClass(_LeanLogger)
    try:
        return logging.getLogger(name)
    finally:
        logging.setLoggerClass(previous)


#: ``,000`` to ``,999``: the milliseconds of an ``asctime``, made once (and ``,1000``, which
#: a float's rounding could in theory give).
_MILLIS = tuple(f",{msecs:03d}" for msecs in range(1001))


class _Clock:
    """The standard ``asctime`` (``2026-11-27 06:00:00,123``, local time), made cheaper.

    The date and time of day are formatted once a second rather than for every line, the
    milliseconds looked up rather than formatted.
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
        if 0 <= msecs <= 1000:
            return self._text + _MILLIS[msecs]
        return f"{self._text},{msecs:03d}"  # a record made before 1970, say


class _Formatter(logging.Formatter):
    """The standard formatter of :data:`_FORMAT`, with cheaper pid and time of day.

    The message part is :func:`_line`'s; the exception and stack text, the standard's.
    The part between the time and the message (:func:`_head`) is the same for every line
    of a logger and level in a process: it is made once.
    """

    def __init__(self) -> None:
        super().__init__(_FORMAT)
        self.clock = _Clock()
        self._heads: dict[tuple[str, str, int], str] = {}

    def format(self, record: logging.LogRecord) -> str:
        """The line; a record with an exception or a stack goes the standard way."""
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = message = record.getMessage()
        record.asctime = asctime = self.clock.text(int(record.created), int(record.msecs))
        key = (record.levelname, record.name, record.process or process.pid())
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= _HEADS:
                self._heads.clear()
            head = self._heads[key] = _head(*key)
        return asctime + head + message

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        return _line(record.asctime, record.levelname, record.name, record.message,
                     record.process)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self.clock.text(int(record.created), int(record.msecs))


class _Handler(logging.StreamHandler[TextIO]):
    """A stream handler whose session lines, in the loop's thread, are written together."""

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

    def handle(self, record: logging.LogRecord) -> bool:
        """As :meth:`logging.Handler.handle`, but the lock is taken only to write.

        A session line of the loop's thread is formatted and queued without it (only
        that thread touches the queue); :meth:`_write_now` holds it for the write.
        """
        if self.filters and not self.filter(record):  # (no filters: nothing to ask)
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if record.name == _BATCHED and record.levelno == logging.INFO:
                self.write_line(line)
            else:
                # Anything else (an audit line, a warning) is out before anything happens.
                self._write_pending()
                self._write_now(line)
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
    """Send pop3d's logs to ``stream`` (stderr when ``None``) at ``level``."""
    global _handler  # noqa: PLW0603 (one handler per process)
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
    """While inside, session lines of this thread wait up to :data:`_WRITE_AFTER` for others.

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
