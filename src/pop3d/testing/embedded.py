"""The in-process and subprocess test servers behind :mod:`pop3d.testing` (see there)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from pop3d import config as config_mod
from pop3d.config import Config

if TYPE_CHECKING:
    from pop3d.server.context import ServerContext

#: The host every test server listens on.
LOOPBACK = "127.0.0.1"

#: Which section each flat keyword override belongs to.
_SECTION_OF: Mapping[str, str] = {
    **dict.fromkeys(
        ("idle_timeout", "max_connections", "max_connections_per_ip", "greeting",
         "hostname", "workers", "tls_listen", "login_timeout", "proxy_protocol_from",
         "handshake_timeout", "max_tls_handshakes"),
        "server",
    ),
    **dict.fromkeys(
        ("apop", "failure_delay", "max_failure_delay", "plaintext_without_tls",
         "secure_networks", "default_scheme", "mechanisms", "login_delay", "login_stamps",
         "ipv6_penalty_prefix"),
        "auth",
    ),
    **dict.fromkeys(("quota", "quota_exit"), "storage"),
}

#: Maildir path template of the test servers, relative to their root folder.
MAILDIR_TEMPLATE = "mail/%u/Maildir"

_names = itertools.count(1)

#: ``pop3d serve``'s exit status when it cannot bind a listening socket.
_EX_OSERR = 71


class _PortTaken(Exception):
    """The chosen port was taken before the server could bind it."""


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago (bind to port 0, close).

    Another process may take it before you bind it; prefer port 0 where you can.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    *,
    process: subprocess.Popen[bytes] | None = None,
    expect: bytes = b"+OK",
) -> None:
    """Wait until ``host:port`` accepts a connection that greets with ``expect``.

    Polls every 20 ms up to ``timeout`` seconds.

    Raises:
        RuntimeError: ``process`` exited first.
        TimeoutError: nothing answered within ``timeout``.

    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                if s.recv(len(expect)) == expect:
                    return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing answered on {host}:{port} within {timeout} s")
        time.sleep(0.02)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(sections: Mapping[str, Mapping[str, object]]) -> str:
    """Write a two-level mapping (``{section: {key: value}}``) as TOML text."""
    out: list[str] = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {_toml_value(value)}" for key, value in keys.items())
        out.append("")
    return "\n".join(out)


def _user_line(user: str, password: str) -> str:
    if any(ch in user for ch in ":\n\r") or not user:
        raise ValueError(f"not a passwd-file user name: {user!r}")
    if "\n" in password or "\r" in password:
        raise ValueError("a password cannot contain a line end")
    stored = password if password.startswith("{") else "{PLAIN}" + password
    return f"{user}:{stored}\n"


class _Mailboxes:
    """The files of a test server: passwd-file and Maildirs under ``root``."""

    def __init__(
        self,
        root: Path | str,
        users: Mapping[str, str] | None,
        overrides: Mapping[str, object],
        sections: Mapping[str, Mapping[str, object]] | None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        #: The passwd-file the server reads.
        self.passwd_file = self.root / "users"
        self._users: dict[str, str] = dict(users or {})
        self._write_users()
        for user in self._users:
            self.maildir(user)
        self._sections = self._build_sections(overrides, sections)

    @staticmethod
    def _build_sections(
        overrides: Mapping[str, object], sections: Mapping[str, Mapping[str, object]] | None
    ) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {
            "server": {"idle_timeout": 600},
            "auth": {"passwd_file": "users", "failure_delay": 0},
            "storage": {"maildir": MAILDIR_TEMPLATE},
        }
        for name, keys in (sections or {}).items():
            out.setdefault(name, {}).update(keys)
        for key, value in overrides.items():
            section = _SECTION_OF.get(key)
            if section is None:
                known = ", ".join(sorted(_SECTION_OF))
                raise TypeError(f"unknown config override {key!r} (known: {known})")
            out[section][key] = value
        return out

    # ------------------------------------------------------------------ users

    def _write_users(self) -> None:
        text = "".join(_user_line(u, p) for u, p in self._users.items())
        tmp = self.passwd_file.with_name(f".users.{os.getpid()}.{next(_names)}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o600)
        tmp.replace(self.passwd_file)

    def set_user(self, user: str, password: str) -> None:
        """Add or change ``user`` (atomic rewrite of the passwd-file); create its Maildir."""
        self._users[user] = password
        self.maildir(user)
        self._write_users()

    # ------------------------------------------------------------------ mail

    def maildir(self, user: str) -> Path:
        """Return ``user``'s Maildir, creating ``tmp/ new/ cur/`` if missing."""
        path = self.root / MAILDIR_TEMPLATE.replace("%u", user)
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        return path

    def add_message(self, user: str, data: bytes) -> Path:
        """Deliver ``data`` as stored (no line-end conversion) to ``user``; return its path.

        The name is a standard Maildir name whose order is the order of delivery.
        """
        root = self.maildir(user)
        name = f"{int(time.time())}.P{os.getpid()}Q{next(_names):08d}.pop3d-test"
        tmp = root / "tmp" / name
        tmp.write_bytes(data)
        final = root / "new" / name
        tmp.rename(final)
        return final

    def message_paths(self, user: str) -> list[Path]:
        """Return the message files of ``user`` (``new/`` and ``cur/``) in delivery order."""
        root = self.maildir(user)
        found: list[tuple[int, str, Path]] = []
        for sub in ("new", "cur"):
            with os.scandir(root / sub) as it:
                for entry in it:
                    if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                        continue
                    head = entry.name.split(".", 1)[0]
                    secs = int(head) if head.isascii() and head.isdigit() else 0
                    found.append((secs, entry.name, Path(entry.path)))
        return [path for _, _, path in sorted(found)]

    def messages(self, user: str) -> list[bytes]:
        """Return the contents of ``user``'s messages, in delivery order."""
        return [path.read_bytes() for path in self.message_paths(user)]

    def config_mapping(self) -> dict[str, dict[str, object]]:
        """Return the configuration as a TOML-shaped mapping (paths relative to ``root``)."""
        return {name: dict(keys) for name, keys in self._sections.items()}


class Pop3TestServer(_Mailboxes):
    """A pop3d running in a background thread of this process, on ``127.0.0.1:0``.

    Args:
        root: folder for the passwd-file and the Maildirs (created if missing).
        users: user name -> password (``{PLAIN}`` unless it has a ``{SCHEME}``).
        sections: whole config sections to merge in (``{"tls": {...}}``).
        start_timeout: seconds to wait for the server to listen.
        **overrides: config keys of ``[server]``, ``[auth]``, ``[storage]``.

    Raises:
        TypeError: an unknown override.
        pop3d.errors.ConfigError: the resulting configuration is invalid (from ``start``).

    """

    def __init__(
        self,
        root: Path | str,
        users: Mapping[str, str] | None = None,
        *,
        sections: Mapping[str, Mapping[str, object]] | None = None,
        start_timeout: float = 10.0,
        **overrides: object,
    ) -> None:
        super().__init__(root, users, overrides, sections)
        self._sections["server"]["listen"] = [f"{LOOPBACK}:0"]
        if self._sections["server"].get("tls_listen"):
            self._sections["server"]["tls_listen"] = [f"{LOOPBACK}:0"]
        self.host = LOOPBACK
        #: The cleartext POP3 port (0 until started).
        self.port = 0
        #: The implicit-TLS port when ``tls_listen`` was asked for, else 0.
        self.tls_port = 0
        self.config: Config = config_mod.from_mapping(self._sections, self.root)
        self._start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        #: What the connections share, once started (its backends, TLS contexts).
        self.context: ServerContext | None = None

    def start(self) -> Self:
        """Bind, start the server thread, and wait until it serves."""
        if self._thread is not None:
            raise RuntimeError("already started")
        from pop3d.server.listener import bind_all  # noqa: PLC0415

        sockets = bind_all(self.config)
        for sock, implicit_tls in sockets:
            port = sock.getsockname()[1]
            if implicit_tls:
                self.tls_port = self.tls_port or port
            else:
                self.port = self.port or port
        self._thread = threading.Thread(
            target=self._run, args=(sockets,), name=f"pop3d-test:{self.port}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(self._start_timeout):
            self.stop()
            raise TimeoutError("the test server did not start")
        if self._error is not None:
            self._join()
            error, self._error = self._error, None
            raise error
        return self

    def _run(self, sockets: list[tuple[socket.socket, bool]]) -> None:
        try:
            asyncio.run(self._main(sockets))
        except BaseException as exc:  # reported to the thread that calls start()/stop()
            self._error = exc
        finally:
            for sock, _ in sockets:
                sock.close()
            self._started.set()

    async def _main(self, sockets: list[tuple[socket.socket, bool]]) -> None:
        from pop3d.serve import serve_forever  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()
        ready: asyncio.Future[Any] = loop.create_future()
        server = loop.create_task(
            serve_forever(
                self.config, sockets, ready=ready, stop=self._stop_event, **self._serve_options()
            )
        )
        await asyncio.wait({ready, server}, return_when=asyncio.FIRST_COMPLETED)
        authenticator = None
        if ready.done():
            self.context = ready.result()
            authenticator = self.context.backends.authenticator
            self._started.set()
        try:
            await server
        finally:
            close = getattr(authenticator, "close", None)
            if close is not None:
                close()

    def _serve_options(self) -> dict[str, Any]:
        """More keyword arguments of ``serve_forever`` (for subclasses)."""
        return {}

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                raise RuntimeError("the test server thread did not stop")
            self._thread = None

    def stop(self) -> None:
        """Stop the server: open sessions are closed without UPDATE.  Idempotent.

        Raises:
            BaseException: whatever made the server thread fail, if anything did.

        """
        loop, stop = self._loop, self._stop_event
        if loop is not None and stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(stop.set)
        self._join()
        self._loop = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Pop3ServeProcess(_Mailboxes):
    """``pop3d serve --config FILE`` as a subprocess, listening on a free loopback port.

    The config is written to ``root/pop3d.toml``; stderr (the server's log) goes to
    ``root/pop3d.log``.  Leaving the ``with`` block kills the process if it still runs.

    Args:
        root: folder for the config, the log, the passwd-file and the Maildirs.
        users: user name -> password (``{PLAIN}`` unless it has a ``{SCHEME}``).
        sections: whole config sections to merge in.
        port: the port to listen on (default: :func:`free_port`).
        start_timeout: seconds to wait until the port greets.
        extra_args: more command-line arguments after ``serve --config FILE``.
        **overrides: config keys of ``[server]``, ``[auth]``, ``[storage]``.

    """

    def __init__(
        self,
        root: Path | str,
        users: Mapping[str, str] | None = None,
        *,
        sections: Mapping[str, Mapping[str, object]] | None = None,
        port: int | None = None,
        start_timeout: float = 15.0,
        extra_args: Sequence[str] = (),
        **overrides: object,
    ) -> None:
        super().__init__(root, users, overrides, sections)
        self.host = LOOPBACK
        self._fixed_port = port is not None
        self.port = port or free_port()
        self._sections["server"]["listen"] = [f"{LOOPBACK}:{self.port}"]
        self.config_path = self.root / "pop3d.toml"
        self.log_path = self.root / "pop3d.log"
        self._start_timeout = start_timeout
        self._extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server's process id."""
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.pid

    def write_config(self) -> Path:
        """Write the config file (done by :meth:`start`); return its path."""
        self.config_path.write_text(to_toml(self._sections), encoding="utf-8")
        return self.config_path

    def command(self) -> list[str]:
        """The command line that runs the server."""
        return [sys.executable, "-m", "pop3d", "serve", "--config", str(self.config_path),
                *self._extra_args]

    def start(self) -> Self:
        """Start the process and wait until it listens and its port greets.

        The port from :func:`free_port` may be taken by someone else before the server
        binds it; the server then exits with 71 (EX_OSERR) and is started again on
        another port (unless ``port`` was given).

        Raises:
            RuntimeError: the process exited (its log is in the message).
            TimeoutError: the port did not answer within ``start_timeout``.

        """
        if self.process is not None:
            raise RuntimeError("already started")
        for attempt in range(3):
            try:
                self._start_once()
            except _PortTaken:
                if self._fixed_port or attempt == 2:
                    raise RuntimeError(
                        f"port {self.port} is in use\n--- pop3d log ---\n{self.log_text()}"
                    ) from None
                self.port = free_port()
                self._sections["server"]["listen"] = [f"{LOOPBACK}:{self.port}"]
                self.process = None
                continue
            return self
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.write_config()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.root,
            )
        try:
            self._wait_bound()
            wait_for_port(self.host, self.port, self._start_timeout, process=self.process)
        except _PortTaken:
            self.kill()
            raise
        except (RuntimeError, TimeoutError) as exc:
            self.kill()
            raise type(exc)(f"{exc}\n--- pop3d log ---\n{self.log_text()}") from None

    def _wait_bound(self) -> None:
        """Wait for *our* process to bind: another program could own a port that greets.

        The server logs ``listening on HOST:PORT`` once bound.
        """
        assert self.process is not None
        bound = f"listening on {self.host}:{self.port}"
        deadline = time.monotonic() + self._start_timeout
        while bound not in self.log_text():
            status = self.process.poll()
            if status == _EX_OSERR:
                raise _PortTaken
            if status is not None:
                raise RuntimeError(f"the server exited with status {status}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the server did not listen within {self._start_timeout} s")
            time.sleep(0.02)

    def log_text(self) -> str:
        """Return what the server has logged so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` and return the exit status (negative: killed by a signal).

        Raises:
            subprocess.TimeoutExpired: it did not exit within ``timeout`` (it is then killed).

        """
        process = self.process
        if process is None:
            raise RuntimeError("not started")
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """``kill -9`` the server (if it runs) and reap it."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
