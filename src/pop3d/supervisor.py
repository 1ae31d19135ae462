"""The supervisor: binds, reads keys, forks the workers, reloads, stops; talks to no client.

``pop3d serve`` runs as one supervisor process and its children:

* **workers** (``[server] workers`` of them) share the listening sockets and serve POP3 and
  LMTP; each drops to ``[server] user`` before it serves (:mod:`pop3d.privileges`) and
  answers ``pop3d who``/``kick`` on its own admin socket (:mod:`pop3d.admin`);
* the **metrics** process (with ``[metrics] listen``) serves ``/metrics``, also dropped.

The supervisor keeps the privileges it was started with (root on a real host): it binds the
sockets (or takes them from systemd, :mod:`pop3d.systemd`), reads the certificates and keys
and opens the log, before any fork; it never reads a client's octet.  Each child tells it,
over a pipe, when it serves (``R``) and when it no longer accepts (``Q``).  Signals:

* **SIGHUP**: the whole configuration is read again and checked as ``check-config`` does;
  if it is good, a new generation of workers is started with it (certificates, users,
  limits, mechanisms, log settings: everything), and once they serve, the old workers are
  told to retire (SIGQUIT): they stop accepting and finish their sessions undisturbed.  A
  bad configuration is logged and the running one kept.  Listen addresses, ``user``,
  ``group``, ``run_dir`` and the metrics address need a restart; a change is logged so.
* **SIGTERM/SIGINT**: every child stops accepting, UPDATEs in progress finish, the other
  sessions are closed without UPDATE, all within ``[server] shutdown_grace``.  Exit 0.
* A worker that dies unasked is replaced (at most once a second).  A worker that exits with
  os.EX_CONFIG stops the server with that status.

With ``NOTIFY_SOCKET`` (systemd ``Type=notify``) the supervisor sends ``READY=1`` once every
worker serves, ``RELOADING=1``/``READY=1`` around a reload, and ``STOPPING=1``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import selectors
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pop3d import checkconfig, logsetup, metrics, privileges, process, systemd
from pop3d.config import Config
from pop3d.errors import ConfigError
from pop3d.server.tls import TlsContexts

__all__ = ["BindError", "Listeners", "Supervisor", "bind_listeners"]

log = logging.getLogger("pop3d.server")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: Signals the supervisor handles through its wake-up pipe.
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
#: Seconds past ``shutdown_grace`` before children still alive are killed.
_KILL_AFTER = 5.0


class BindError(Exception):
    """A listening address could not be bound; the message names it and its key."""


@dataclass
class Listeners:
    """The sockets bound (or passed by systemd) before any fork."""

    pop3: list[tuple[socket.socket, bool]] = field(default_factory=list)
    lmtp: list[socket.socket] = field(default_factory=list)
    metrics: socket.socket | None = None
    #: True when systemd passed them (socket activation).
    activated: bool = False

    def close(self) -> None:
        """Close every socket."""
        for sock in [s for s, _ in self.pop3] + self.lmtp:
            sock.close()
        if self.metrics is not None:
            self.metrics.close()


def _preload_for(cfg: Config) -> tuple[str, ...]:
    """The modules a worker of ``cfg`` needs beyond the usual, imported before the drop."""
    return privileges.PRELOAD_DATABASE if cfg.database is not None else ()


def bind_listeners(cfg: Config) -> Listeners:
    """Bind every address of the config, or take the sockets systemd passed.

    Raises:
        BindError: an address cannot be bound (its key and the reason are named).

    """
    passed = systemd.listen_fds()
    if passed:
        return _from_systemd(cfg, passed)
    from pop3d.server.listener import bind_all  # noqa: PLC0415

    out = Listeners()
    where = ""
    try:
        for key, addresses, tls in (
            ("listen", cfg.server.listen, False),
            ("tls_listen", cfg.server.tls_listen, True),
        ):
            for address in addresses:
                where = f"{address} ([server] {key})"
                one = dataclasses.replace(
                    cfg.server,
                    listen=() if tls else (address,),
                    tls_listen=(address,) if tls else (),
                )
                out.pop3 += bind_all(dataclasses.replace(cfg, server=one))
        if cfg.lmtp.listen:
            from pop3d.lmtp import bind_lmtp  # noqa: PLC0415

            for lmtp in cfg.lmtp.listen:
                where = f"{lmtp} ([lmtp] listen)"
                one_lmtp = dataclasses.replace(cfg.lmtp, listen=(lmtp,))
                out.lmtp += bind_lmtp(dataclasses.replace(cfg, lmtp=one_lmtp))
        if cfg.metrics.listen is not None:
            where = f"{cfg.metrics.listen} ([metrics] listen)"
            out.metrics = _bind_tcp(cfg.metrics.listen.host, cfg.metrics.listen.port)
    except OSError as exc:
        out.close()
        reason = exc.strerror or str(exc)
        raise BindError(f"cannot listen on {where}: {reason}") from None
    return out


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def _from_systemd(cfg: Config, passed: list[systemd.ListenedSocket]) -> Listeners:
    """Sort systemd's sockets by ``FileDescriptorName=`` (pop3, pop3s, lmtp, metrics).

    A socket with another name is recognised by its address among the config's
    (``tls_listen``, ``[lmtp] listen``, ``[metrics] listen``); any other is cleartext POP3.
    """
    tls_addresses = {(a.host, a.port) for a in cfg.server.tls_listen}
    lmtp_addresses = set()
    for text in cfg.lmtp.listen:
        if not text.startswith("unix:"):
            host, _, port = text.rpartition(":")
            lmtp_addresses.add((host.strip("[]"), int(port)))
    metrics_address = (
        (cfg.metrics.listen.host, cfg.metrics.listen.port) if cfg.metrics.listen else None
    )
    out = Listeners(activated=True)
    for item in passed:
        sock, name = item.sock, item.name
        address = sock.getsockname() if sock.family != socket.AF_UNIX else None
        key = tuple(address[:2]) if isinstance(address, tuple) else None
        if name == "lmtp" or sock.family == socket.AF_UNIX or key in lmtp_addresses:
            out.lmtp.append(sock)
        elif name == "metrics" or (key is not None and key == metrics_address):
            out.metrics = sock
        else:
            out.pop3.append((sock, name == "pop3s" or key in tls_addresses))
        shown = (
            f"{address[0]}:{address[1]}" if isinstance(address, tuple)
            else str(sock.getsockname())
        )
        log.info("socket from systemd: %s (%s)", shown, name)
    return out


@dataclass(eq=False)
class _Child:
    pid: int
    #: Read end of the status pipe.
    status: int
    kind: str  # "worker" or "metrics"
    generation: int = 0
    ready: bool = False
    quiet: bool = False
    retiring: bool = False
    admin_path: Path | None = None


class WorkerHooks:
    """What a worker tells its supervisor, and the admin socket it answers on."""

    def __init__(self, status_fd: int | None = None, admin: socket.socket | None = None) -> None:
        self.status_fd = status_fd
        self.admin = admin

    def tell(self, what: bytes) -> None:
        """Send one status octet (``R`` ready, ``Q`` no longer accepting) to the supervisor."""
        if self.status_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.status_fd, what)


#: A worker's body (:func:`pop3d.serve.worker_main`): it serves the sockets as the
#: config says until told to stop, and returns the process's exit status.
Worker = Callable[
    [Config, list[tuple[socket.socket, bool]], list[socket.socket], TlsContexts | None,
     WorkerHooks],
    int,
]


class Supervisor:
    """Forks and watches the workers (see the module's docstring)."""

    def __init__(
        self,
        load: Callable[[], Config],
        cfg: Config,
        listeners: Listeners,
        identity: privileges.Identity | None,
        *,
        worker: Worker,
        log_level: str | None = None,
    ) -> None:
        self.load = load
        self.worker = worker
        self.cfg = cfg
        self.listeners = listeners
        self.identity = identity
        self.log_level = log_level
        self.children: dict[int, _Child] = {}
        self.generation = 0
        self.stopping = False
        self.status = 0
        self.selector = selectors.DefaultSelector()
        self.tls: TlsContexts | None = None
        #: The old workers a reload waits for (to stop accepting) before it reports.
        self.reload_waiting: set[_Child] | None = None
        self.previous: tuple[Config, TlsContexts | None] | None = None
        self.last_respawn = 0.0
        self.to_respawn: list[str] = []
        self.kill_at: float | None = None
        self.run_dir = checkconfig.run_dir_of(cfg)
        self.told_ready = False

    # ------------------------------------------------------------------ set-up

    def _prepare_run_dir(self) -> None:
        """``run_dir`` (root's), its ``admin/`` (0700) and a fresh ``metrics/`` (the user's)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        admin = self.run_dir / "admin"
        admin.mkdir(mode=0o700, exist_ok=True)
        os.chmod(admin, 0o700)  # noqa: PTH101
        for stale in admin.glob("*.sock"):
            stale.unlink(missing_ok=True)
        if self.cfg.metrics.listen is not None:
            folder = self.run_dir / "metrics"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(mode=0o700)
            if self.identity is not None and os.geteuid() == 0:
                os.chown(folder, self.identity.uid, self.identity.gid)
            metrics.enable(folder)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit status."""
        try:
            self._prepare_run_dir()
            self.tls = TlsContexts(self.cfg.tls) if self.cfg.tls is not None else None
        except (OSError, ConfigError) as exc:
            log.error("configuration: %s", exc)  # noqa: TRY400
            return os.EX_CONFIG
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(wake_r, selectors.EVENT_READ, None)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        for sig in _SIGNALS:
            signal.signal(sig, _ignore_here)
        try:
            self._start_generation()
            if self.listeners.metrics is not None:
                self._fork_metrics()
            self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            os.close(wake_r)
            os.close(wake_w)
            self.listeners.close()
        return self.status

    # ------------------------------------------------------------------ the loop

    def _loop(self, wake_r: int) -> None:
        while self.children or not self.stopping:
            timeout = None
            now = time.monotonic()
            if self.to_respawn and not self.stopping:
                timeout = max(0.0, self.last_respawn + 1.0 - now)
            if self.kill_at is not None:
                left = max(0.0, self.kill_at - now)
                timeout = left if timeout is None else min(timeout, left)
            for key, _ in self.selector.select(timeout):
                if key.fd == wake_r:
                    self._signals(wake_r)
                else:
                    self._status(key.data)
            self._reap()
            now = time.monotonic()
            if self.kill_at is not None and now >= self.kill_at:
                for child in self.children.values():
                    log.warning("%s %d did not stop in time: killed", child.kind, child.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
                self.kill_at = None
            if self.to_respawn and not self.stopping and now >= self.last_respawn + 1.0:
                self.last_respawn = now
                kind = self.to_respawn.pop(0)
                if kind == "metrics":
                    self._fork_metrics()
                else:
                    self._fork_worker()

    def _signals(self, wake_r: int) -> None:
        try:
            received = os.read(wake_r, 512)
        except BlockingIOError:
            return
        for number in received:
            if number in (signal.SIGTERM, signal.SIGINT):
                self._stop()
            elif number == signal.SIGHUP and not self.stopping:
                self._reload()

    def _status(self, child: _Child) -> None:
        try:
            data = os.read(child.status, 64)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(child.status)
            os.close(child.status)
            child.status = -1
            return
        if b"R" in data and not child.ready:
            child.ready = True
            self._ready_changed()
        if b"Q" in data:
            child.quiet = True
            self._quiet_changed()

    def _reap(self) -> None:
        while True:
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            self._forget(child)
            exit_code = os.waitstatus_to_exitcode(code)
            self._exited(child, exit_code)

    def _forget(self, child: _Child) -> None:
        if child.status >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(child.status)
            os.close(child.status)
            child.status = -1
        if child.admin_path is not None:
            child.admin_path.unlink(missing_ok=True)
        metrics.process_dead(child.pid)

    def _exited(self, child: _Child, exit_code: int) -> None:
        if self.stopping:
            if exit_code not in (0, -signal.SIGTERM, -signal.SIGINT):
                log.error("%s %d exited with status %d", child.kind, child.pid, exit_code)
                self.status = self.status or 1
            return
        if child.retiring:
            self._quiet_changed()
            return
        if child.kind == "worker" and child.generation != self.generation:
            return  # a worker of a reload that was given up
        if exit_code == os.EX_CONFIG:
            log.error("%s %d exited: configuration error", child.kind, child.pid)
            if self.reload_waiting is not None:
                self._reload_failed()
                return
            self.status = os.EX_CONFIG
            self._stop()
            return
        if exit_code == 0:
            log.warning(
                "%s %d stopped without the supervisor; starting a new one", child.kind, child.pid
            )
        else:
            log.error(
                "%s %d died (status %d); starting a new one", child.kind, child.pid, exit_code
            )
        self.to_respawn.append(child.kind)

    # ------------------------------------------------------------------ children

    def _workers(self) -> list[_Child]:
        return [c for c in self.children.values() if c.kind == "worker"]

    def _start_generation(self) -> None:
        count = self.cfg.server.workers or process.usable_cpus()
        for _ in range(count):
            self._fork_worker()
        pids = sorted(c.pid for c in self._workers() if c.generation == self.generation)
        log.info("started %d workers: %s", count, " ".join(map(str, pids)))

    def _fork(self, kind: str, run: Callable[[int], int]) -> int:
        """Fork a child that runs ``run(status_w)`` and exits with its status; its pid."""
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(status_r)
            self._in_child()
            code = 1
            try:
                code = run(status_w)
            except BaseException:
                log.exception("%s failed", kind)
            finally:
                os._exit(code)
        os.close(status_w)
        child = _Child(pid, status_r, kind, generation=self.generation)
        self.children[pid] = child
        self.selector.register(status_r, selectors.EVENT_READ, child)
        return pid

    def _fork_worker(self) -> None:
        admin_dir = self.run_dir / "admin"
        pid = self._fork("worker", lambda status_w: self._worker_child(status_w, admin_dir))
        self.children[pid].admin_path = admin_dir / f"{pid}.sock"

    def _drop(self) -> bool:
        """In a child: become ``[server] user``; False (logged) if that cannot be done."""
        if self.identity is None:
            return True
        try:
            privileges.drop(self.identity, _preload_for(self.cfg))
        except OSError as exc:  # never serve with the privileges we meant to drop
            log.error("cannot become %s: %s", self.identity, exc)  # noqa: TRY400
            return False
        return True

    def _worker_child(self, status_w: int, admin_dir: Path) -> int:
        from pop3d import admin  # noqa: PLC0415
        admin_sock = admin.bind(admin_dir / f"{os.getpid()}.sock")  # as root: 0600 root's
        if not self._drop():
            return os.EX_CONFIG
        return self.worker(
            self.cfg,
            self.listeners.pop3,
            self.listeners.lmtp,
            self.tls,
            WorkerHooks(status_w, admin_sock),
        )

    def _fork_metrics(self) -> None:
        sock = self.listeners.metrics
        assert sock is not None

        def run(status_w: int) -> int:
            if not self._drop():
                return os.EX_CONFIG
            return metrics.serve(sock, lambda: os.write(status_w, b"R"))

        self._fork("metrics", run)

    def _in_child(self) -> None:
        """In a forked child: default signals, no supervisor state, die with the parent."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        # Until the child's event loop takes them: a stop before it serves is a clean exit.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _exit_cleanly)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the supervisor's
        for child in self.children.values():
            if child.status >= 0:
                with contextlib.suppress(OSError):
                    os.close(child.status)
        with contextlib.suppress(Exception):
            self.selector.close()
        _die_with_parent()

    # ------------------------------------------------------------------ readiness, reload

    def _ready_changed(self) -> None:
        current = [c for c in self._workers() if c.generation == self.generation]
        if not all(c.ready for c in current):
            return
        if self.reload_waiting is None and self.generation == 0:
            if not self.told_ready:
                self.told_ready = True
                systemd.notify("READY=1")
            return
        if self.reload_waiting is not None:
            # The new workers serve: the old ones stop accepting and finish their sessions.
            for old in self.reload_waiting:
                old.retiring = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old.pid, signal.SIGQUIT)
            self._quiet_changed()

    def _quiet_changed(self) -> None:
        waiting = self.reload_waiting
        if waiting is None or not all(c.retiring for c in waiting):
            return
        if any(not c.quiet and c.pid in self.children for c in waiting):
            return
        self.reload_waiting = None
        self.previous = None
        if self.cfg.tls is not None:
            log.info("TLS certificates reloaded")
        log.info("configuration reloaded (generation %d)", self.generation)
        systemd.notify("READY=1")

    def _reload(self) -> None:
        if self.reload_waiting is not None:
            log.warning("reload already in progress; SIGHUP ignored")
            return
        systemd.notify("RELOADING=1")
        log.info("SIGHUP: reading the configuration again")
        try:
            new = self.load()
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)  # noqa: TRY400
            systemd.notify("READY=1")
            return
        problems = checkconfig.check(new, bind=False)
        if problems:
            for problem in problems:
                if "[tls" in problem:
                    log.error("TLS reload failed, keeping the old certificates: %s", problem)
                else:
                    log.error("reload failed, keeping the running configuration: %s", problem)
            systemd.notify("READY=1")
            return
        try:
            tls = TlsContexts(new.tls) if new.tls is not None else None
        except (OSError, ValueError) as exc:
            log.error("TLS reload failed, keeping the old certificates: %s", exc)  # noqa: TRY400
            systemd.notify("READY=1")
            return
        new = self._keep_restart_only(new)
        try:
            logsetup.configure(new.log, level=self.log_level)
        except (OSError, ConfigError) as exc:
            log.error("reload failed: [log]: %s", exc)  # noqa: TRY400
            systemd.notify("READY=1")
            return
        self.previous = (self.cfg, self.tls)
        self.cfg, self.tls = new, tls
        self.reload_waiting = {c for c in self._workers() if not c.retiring}
        self.generation += 1
        self._start_generation()

    def _reload_failed(self) -> None:
        """A worker of the new generation failed to start: keep the old ones serving."""
        log.error("reload failed: the new workers did not start; keeping the running ones")
        for child in self._workers():
            if child.generation == self.generation:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        if self.previous is not None:
            self.cfg, self.tls = self.previous
        self.previous = None
        self.reload_waiting = None
        self.generation += 1  # the old workers keep serving; none of them is replaced
        for child in self._workers():
            if not child.retiring and child.generation == self.generation - 2:
                child.generation = self.generation
        systemd.notify("READY=1")

    def _keep_restart_only(self, new: Config) -> Config:
        """Keep what needs a restart as it runs; log each change of it."""
        old = self.cfg
        fixed = {
            "[server] listen": (old.server.listen, new.server.listen),
            "[server] tls_listen": (old.server.tls_listen, new.server.tls_listen),
            "[lmtp] listen": (old.lmtp.listen, new.lmtp.listen),
            "[metrics] listen": (old.metrics.listen, new.metrics.listen),
            "[server] user": (old.service.user, new.service.user),
            "[server] group": (old.service.group, new.service.group),
            "[server] run_dir": (old.service.run_dir, new.service.run_dir),
        }
        for key, (was, now) in fixed.items():
            if was != now:
                log.warning("%s changed: it takes effect at the next restart, not on reload", key)
        return dataclasses.replace(
            new,
            server=dataclasses.replace(
                new.server, listen=old.server.listen, tls_listen=old.server.tls_listen
            ),
            lmtp=dataclasses.replace(new.lmtp, listen=old.lmtp.listen),
            metrics=old.metrics,
            service=dataclasses.replace(
                new.service,
                user=old.service.user,
                group=old.service.group,
                run_dir=old.service.run_dir,
            ),
        )

    def _stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        systemd.notify("STOPPING=1")
        log.info("stopping: %d process(es) finish within %.0f s",
                 len(self.children), self.cfg.service.shutdown_grace)
        self.kill_at = time.monotonic() + self.cfg.service.shutdown_grace + _KILL_AFTER
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)


def _exit_cleanly(_sig: int, _frame: object) -> None:
    """A child told to stop before it serves: nothing to finish, exit 0."""
    os._exit(0)


def _ignore_here(_sig: int, _frame: object) -> None:
    """The signal's number reaches the loop through the wake-up pipe."""


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this child when the supervisor dies.

    ``kill -9`` of the server's PID then ends every process of it at once: no orphan
    keeps a port or a maildrop lock.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: orphans stop at their next SIGTERM
        return
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(1)


