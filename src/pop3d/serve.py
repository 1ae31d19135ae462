"""``pop3d serve``: run the server in the foreground until SIGTERM/SIGINT.

With ``--config`` it serves that configuration; without, the embedded default
(:mod:`pop3d.demo`).  The configuration is checked as ``pop3d check-config`` checks it
(:mod:`pop3d.checkconfig`); the sockets are bound (or taken from systemd) and the
certificates read by the supervisor (:mod:`pop3d.supervisor`), which then forks
``[server] workers`` processes (``"auto"``: one per usable CPU) that share the sockets,
drop privileges (:mod:`pop3d.privileges`) and serve (:func:`serve_forever`).  The
maildrop lock is a lock of an open file description (:mod:`pop3d.storage.locking`) and so
holds across workers.  Exit status is 0 after a clean stop, 78 (EX_CONFIG) for a bad
configuration, 71 (EX_OSERR) when a socket cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from pop3d import app, checkconfig, demo, logsetup, metrics, privileges, supervisor
from pop3d.config import Config
from pop3d.errors import ConfigError
from pop3d.server.allocator import keep_chunk_buffers_in_heap
from pop3d.server.context import ServerContext
from pop3d.server.listener import start_listeners
from pop3d.server.tls import TlsContexts
from pop3d.session import Backends
from pop3d.supervisor import WorkerHooks

log = logging.getLogger("pop3d.server")

EX_CONFIG = 78
EX_OSERR = 71
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

#: What makes the context the connections share (:func:`serve_forever`'s ``context``).
ContextFactory = Callable[[Config, Backends, TlsContexts | None], ServerContext]


def add_parser(sub: Any) -> None:
    """Register ``serve``."""
    p = sub.add_parser("serve", help="run the POP3 server in the foreground")
    app.add_config_arguments(p)
    p.add_argument(
        "--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (default: [log] level)"
    )
    p.set_defaults(run=run)


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


class _OpenSessionsTicker:
    """Reports ``len(ctx.connections)`` to :func:`metrics.sessions_open` once a second."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ctx: ServerContext) -> None:
        self.loop = loop
        self.ctx = ctx
        self.handle: asyncio.TimerHandle | None = None
        self.tick()

    def tick(self) -> None:
        metrics.sessions_open(len(self.ctx.connections))
        self.handle = self.loop.call_later(1.0, self.tick)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        metrics.sessions_open(0)


def worker_main(
    cfg: Config,
    sockets: list[tuple[socket.socket, bool]],
    lmtp: list[socket.socket],
    tls: TlsContexts | None,
    hooks: WorkerHooks,
) -> int:
    """Serve as a forked worker (privileges already dropped); return the exit status."""
    _install_uvloop()
    keep_chunk_buffers_in_heap()
    try:
        asyncio.run(serve_forever(cfg, sockets, lmtp_sockets=lmtp, tls=tls, hooks=hooks))
    except ConfigError as exc:
        log.error("configuration: %s", exc)  # noqa: TRY400
        return EX_CONFIG
    return 0


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
    tls: TlsContexts | None = None,
    hooks: WorkerHooks | None = None,
    context: ContextFactory = ServerContext,
) -> None:
    """Serve on ``sockets`` until ``stop`` is set or SIGTERM/SIGINT arrives.

    ``lmtp_sockets`` are the ``[lmtp]`` sockets bound before workers forked; without
    them, LMTP addresses are bound here (one process).  ``tls`` are contexts loaded
    before privileges were dropped (built here from ``cfg.tls`` when ``None``).
    ``hooks`` connect a worker to its supervisor (readiness, SIGQUIT to retire, the
    admin socket).  ``context`` makes the :class:`ServerContext` every connection shares
    (:mod:`pop3d.testing`'s test server passes one that wraps the backends and the wire
    with its faults; production uses the class itself).  The loop's INFO log lines are
    written in batches (:func:`logsetup.buffered_for`).
    """
    with logsetup.buffered_for(asyncio.get_running_loop()):
        await _serve(
            cfg, sockets, ready=ready, stop=stop, lmtp_sockets=lmtp_sockets, tls=tls,
            hooks=hooks or WorkerHooks(), context=context,
        )


async def _serve(
    cfg: Config,
    sockets: list[tuple[socket.socket, bool]],
    *,
    ready: asyncio.Future[ServerContext] | None,
    stop: asyncio.Event | None,
    lmtp_sockets: list[socket.socket] | None,
    tls: TlsContexts | None,
    hooks: WorkerHooks,
    context: ContextFactory,
) -> None:
    loop = asyncio.get_running_loop()
    if tls is None and cfg.tls is not None:
        tls = TlsContexts(cfg.tls)
    authenticator = app.build_authenticator(cfg)
    store = app.build_store(cfg)
    backends = app.build_backends(cfg, authenticator, store)
    ctx = context(cfg, backends, tls)
    stop = stop or asyncio.Event()
    retire = asyncio.Event()
    signals = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGQUIT, retire.set)
        if tls is not None and hooks.status_fd is None:
            loop.add_signal_handler(signal.SIGHUP, tls.reload)  # alone: reload in place
        signals = True
    servers = await start_listeners(ctx, sockets)
    lmtp_servers: list[Any] = []
    if cfg.lmtp.listen:
        from pop3d.lmtp import start_lmtp  # noqa: PLC0415

        lmtp_servers = await start_lmtp(cfg, authenticator, store, sockets=lmtp_sockets)
        if lmtp_sockets is not None:
            for address in cfg.lmtp.listen:
                log.info("LMTP listening on %s", address)
    ticker = _OpenSessionsTicker(loop, ctx) if metrics.enabled() else None
    admin_server = None
    if hooks.admin is not None:
        from pop3d import admin  # noqa: PLC0415

        admin_server = await admin.serve(ctx, hooks.admin)
    if ready is not None:
        ready.set_result(ctx)
    hooks.tell(b"R")
    try:
        waiters = [loop.create_task(stop.wait()), loop.create_task(retire.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if retire.is_set() and not stop.is_set():
            # A reload: the new workers accept from now on; sessions here end by themselves.
            for server in [*servers, *lmtp_servers]:
                server.close()
            hooks.tell(b"Q")
            log.info("retiring: no longer accepting; %d session(s) left", len(ctx.connections))
            while ctx.connections and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiters[0], 1.0)
        for waiter in waiters:
            waiter.cancel()
    finally:
        log.info("stopping")
        for server in [*servers, *lmtp_servers]:
            server.close()
        hooks.tell(b"Q")
        if admin_server is not None:
            admin_server.close()
        if ticker is not None:
            ticker.cancel()
        await ctx.shutdown(grace=cfg.service.shutdown_grace)
        for server in [*servers, *lmtp_servers]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
                loop.remove_signal_handler(sig)
        close = getattr(authenticator, "close", None)
        if close is not None:  # stop the hashing thread pool
            close()
        from pop3d import pgbackends  # noqa: PLC0415

        await pgbackends.shutdown()  # release cluster leases, close the database pool


def run(args: argparse.Namespace) -> int:
    """Run ``pop3d serve``: check the config, bind, then supervise the workers."""
    logsetup.setup(args.log_level or "INFO")
    _raise_file_limit()
    try:
        cfg = app.load_config(args)
        logsetup.configure(cfg.log, level=args.log_level)
    except ConfigError as exc:
        log.error("configuration: %s", exc)  # noqa: TRY400
        return EX_CONFIG
    problems = checkconfig.check(cfg, bind=False)
    if problems:
        for problem in problems:
            log.error("configuration: %s", problem)
        return EX_CONFIG
    identity = privileges.resolve(cfg.service)
    if identity is None and os.geteuid() == 0:
        log.warning(
            "running as root: [server] user is not set, so every process keeps root;"
            " set user (and group) to serve mail without it"
        )
    try:
        listeners = supervisor.bind_listeners(cfg)
    except supervisor.BindError as exc:
        log.error("%s", exc)  # noqa: TRY400
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
    return supervisor.Supervisor(
        lambda: app.load_config(args), cfg, listeners, identity, worker=worker_main,
        log_level=args.log_level,
    ).run()
