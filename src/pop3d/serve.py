"""``pop3d serve``: run the server in the foreground until SIGTERM/SIGINT.

With ``--config`` it serves that configuration; without, the embedded default
(:mod:`pop3d.demo`).  ``[server] workers`` > 1 (or ``"auto"``: one per core) binds the
sockets once, then forks that many worker processes that share them; the maildrop lock is
a lock of an open file description (:mod:`pop3d.storage.locking`) and so holds across
workers.  SIGHUP reloads TLS certificates.  Exit status is
0 after a clean stop, 78 (EX_CONFIG) for a bad configuration, 71 (EX_OSERR) when a
socket cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from pop3d import config as config_mod
from pop3d import demo, logsetup, process
from pop3d.config import Config
from pop3d.errors import ConfigError
from pop3d.login_delay import LoginDelay
from pop3d.server.allocator import keep_chunk_buffers_in_heap
from pop3d.server.listener import ServerContext, bind_all, start_listeners
from pop3d.server.tls import TlsContexts
from pop3d.session import Backends, FailureDelays

log = logging.getLogger("pop3d.server")

EX_CONFIG = 78
EX_OSERR = 71
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def add_parser(sub: Any) -> None:
    """Register ``serve``."""
    p = sub.add_parser("serve", help="run the POP3 server in the foreground")
    add_config_arguments(p)
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    p.set_defaults(run=run)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--config`` and ``--data``, which :func:`load_config` reads."""
    p.add_argument("--config", type=Path, help="TOML config (default: the embedded demo)")
    p.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("POP3D_DATA", "pop3d-data")),
        help="data folder of the embedded default (default: ./pop3d-data)",
    )


def load_config(args: argparse.Namespace) -> Config:
    """Return the config named by ``--config``, or the embedded default (creating its data)."""
    if args.config is not None:
        return config_mod.load(args.config)
    data = args.data.resolve()
    if demo.ensure_demo_data(data):
        log.info("created demo data in %s", data)
    return demo.default_config(data)


def build_store(cfg: Config) -> Any:
    """Return the mail store of ``[storage]`` (Maildir or mbox)."""
    if cfg.storage.mbox is not None:
        from pop3d.storage.mbox import MboxStore  # noqa: PLC0415

        return MboxStore.from_config(cfg.storage)
    from pop3d.storage.maildir import MaildirStore  # noqa: PLC0415

    return MaildirStore.from_config(cfg.storage)


def build_authenticator(cfg: Config) -> Any:
    """Return the authenticator of ``[auth]``."""
    from pop3d.auth.passwd_file import PasswdFileAuthenticator  # noqa: PLC0415

    if cfg.auth.passwd_file is None:
        raise ConfigError("[auth] passwd_file is required")
    if not cfg.auth.passwd_file.is_file():
        raise ConfigError(f"[auth] passwd_file {cfg.auth.passwd_file} does not exist")
    return PasswdFileAuthenticator.from_config(cfg.auth)


def _raise_file_limit() -> None:
    """Raise the soft limit of open files to the hard limit.

    Each session holds its socket (and, with per-mailbox lock files or an mbox, one or
    two more); the usual soft limit of 1,024 would refuse logins past ~1,000 sessions a
    process.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("open files limit raised from %d to %d", soft, hard)


def _bind_lmtp(cfg: Config) -> list[socket.socket]:
    if not cfg.lmtp.listen:
        return []
    from pop3d.lmtp import bind_lmtp  # noqa: PLC0415

    return bind_lmtp(cfg)


def _install_uvloop() -> None:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_forever(
    cfg: Config,
    sockets: list[tuple[socket.socket, bool]],
    *,
    ready: asyncio.Future[ServerContext] | None = None,
    stop: asyncio.Event | None = None,
    lmtp_sockets: list[socket.socket] | None = None,
) -> None:
    """Serve on ``sockets`` until ``stop`` is set or SIGTERM/SIGINT arrives.

    ``lmtp_sockets`` are the ``[lmtp]`` sockets bound before workers forked; without
    them, LMTP addresses are bound here (one process).  The loop's INFO log lines are
    written in batches (:func:`logsetup.buffered_for`).
    """
    with logsetup.buffered_for(asyncio.get_running_loop()):
        await _serve(cfg, sockets, ready=ready, stop=stop, lmtp_sockets=lmtp_sockets)


async def _serve(
    cfg: Config,
    sockets: list[tuple[socket.socket, bool]],
    *,
    ready: asyncio.Future[ServerContext] | None,
    stop: asyncio.Event | None,
    lmtp_sockets: list[socket.socket] | None,
) -> None:
    loop = asyncio.get_running_loop()
    tls = TlsContexts(cfg.tls) if cfg.tls is not None else None
    authenticator = build_authenticator(cfg)
    store = build_store(cfg)
    backends = Backends(
        authenticator=authenticator,
        store=store,
        delays=FailureDelays(
            cfg.auth.failure_delay,
            cfg.auth.max_failure_delay,
            ipv6_prefix=cfg.auth.ipv6_penalty_prefix,
        ),
        login_delay=(
            LoginDelay(cfg.auth.login_delay, cfg.auth.login_stamps)
            if cfg.auth.login_delay
            else None
        ),
    )
    ctx = ServerContext(cfg, backends, tls)
    stop = stop or asyncio.Event()
    signals = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        if tls is not None:
            loop.add_signal_handler(signal.SIGHUP, tls.reload)
        signals = True
    servers = await start_listeners(ctx, sockets)
    lmtp_servers: list[Any] = []
    if cfg.lmtp.listen:
        from pop3d.lmtp import start_lmtp  # noqa: PLC0415

        lmtp_servers = await start_lmtp(cfg, authenticator, store, sockets=lmtp_sockets)
    if ready is not None:
        ready.set_result(ctx)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        for server in [*servers, *lmtp_servers]:
            server.close()
        await ctx.shutdown()
        for server in [*servers, *lmtp_servers]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        close = getattr(authenticator, "close", None)
        if close is not None:  # stop the hashing thread pool
            close()


def _worker(
    cfg: Config, sockets: list[tuple[socket.socket, bool]], lmtp: list[socket.socket]
) -> int:
    _install_uvloop()
    keep_chunk_buffers_in_heap()
    try:
        asyncio.run(serve_forever(cfg, sockets, lmtp_sockets=lmtp))
    except ConfigError as exc:
        log.error("%s", exc)  # noqa: TRY400
        return EX_CONFIG
    return 0


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this worker when the supervisor dies.

    ``kill -9`` of the server's PID then ends every process of it at once, exactly as
    for a single-process server: no orphan keeps a port or a maildrop lock.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: orphans stop at their next SIGTERM
        return
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(1)


def _fork_worker(
    cfg: Config, sockets: list[tuple[socket.socket, bool]], lmtp: list[socket.socket]
) -> int:
    pid = os.fork()
    if pid == 0:  # child: restore default signal handling, serve, never return
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent()
        status = 1
        try:
            status = _worker(cfg, sockets, lmtp)
        finally:
            os._exit(status)
    return pid


def _supervise(
    cfg: Config,
    sockets: list[tuple[socket.socket, bool]],
    lmtp: list[socket.socket],
    workers: int,
) -> int:
    """Fork ``workers`` processes sharing ``sockets``; forward signals; replace crashed ones.

    A worker that dies while the server is not stopping (a crash, an OOM kill) is
    replaced, at most once a second so that a worker failing at start cannot spin.
    """
    stopping = False
    pids: set[int] = set()

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for _ in range(workers):
        pids.add(_fork_worker(cfg, sockets, lmtp))
    log.info("started %d workers: %s", workers, " ".join(map(str, sorted(pids))))
    status = 0
    last_respawn = 0.0
    while pids:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in pids:
            continue
        pids.discard(pid)
        exit_code = os.waitstatus_to_exitcode(code)
        if stopping:
            if exit_code not in (0, -signal.SIGTERM, -signal.SIGINT):
                status = 1
            continue
        if exit_code == EX_CONFIG:
            log.error("worker %d exited: configuration error", pid)
            forward(signal.SIGTERM, None)
            status = EX_CONFIG
            continue
        if exit_code == 0:  # stopped on its own (a SIGTERM sent to the worker alone)
            log.warning("worker %d stopped without the supervisor; starting a new one", pid)
        else:
            log.error("worker %d died (status %d); starting a new one", pid, exit_code)
        wait = last_respawn + 1.0 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        last_respawn = time.monotonic()
        pids.add(_fork_worker(cfg, sockets, lmtp))
    return status


def run(args: argparse.Namespace) -> int:
    """Run ``pop3d serve``."""
    logsetup.setup(args.log_level)
    _raise_file_limit()
    try:
        cfg = load_config(args)
        build_authenticator(cfg)  # fail fast on a missing passwd-file
        if cfg.tls is not None:
            TlsContexts(cfg.tls)  # and on unreadable certificates
    except ConfigError as exc:
        log.error("configuration: %s", exc)  # noqa: TRY400
        return EX_CONFIG
    except OSError as exc:
        log.error("configuration: %s", exc)  # noqa: TRY400
        return EX_CONFIG
    workers = cfg.server.workers or process.usable_cpus()
    try:
        sockets = bind_all(cfg, reuse_port=False)
        lmtp = _bind_lmtp(cfg)
    except OSError as exc:
        log.error("cannot listen: %s", exc)  # noqa: TRY400
        return EX_OSERR
    if args.config is None:
        addr = cfg.server.listen[0]
        print(  # noqa: T201 (the demo's instructions are for the person at the terminal)
            f"pop3d demo server on {addr}: user {demo.DEMO_USER}, password {demo.DEMO_PASSWORD}\n"
            f"  read the first message:  curl pop3://{demo.DEMO_USER}:{demo.DEMO_PASSWORD}"
            f"@{addr}/1\n"
            f"  list the mailbox:        curl pop3://{demo.DEMO_USER}:{demo.DEMO_PASSWORD}@{addr}/",
            file=sys.stderr,
            flush=True,
        )
    if workers > 1:
        return _supervise(cfg, sockets, lmtp, workers)
    return _worker(cfg, sockets, lmtp)
