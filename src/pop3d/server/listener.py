"""Listening sockets: bind them, then serve on them.

:func:`bind_all` binds every configured address (before workers fork);
:func:`start_listeners` serves on them with the protocol each connection starts in.

What the connections share is :class:`~pop3d.server.context.ServerContext`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from pop3d.config import Config, ListenAddress
from pop3d.server.accept import AcceptProtocol
from pop3d.server.connection import Pop3Protocol
from pop3d.server.context import ServerContext
from pop3d.server.tls import check_tls_support

log = logging.getLogger("pop3d.server")

def _bind(address: ListenAddress, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on accepted sockets that say they
    # are TCP (uvloop sets it always).  Without it Nagle held the last segment of every
    # multi-line reply for the client's delayed ACK: 40 ms per RETR.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address.host, address.port))
    sock.setblocking(False)  # noqa: FBT003
    return sock


def bind_all(config: Config, *, reuse_port: bool = False) -> list[tuple[socket.socket, bool]]:
    """Bind every listen address; return (socket, implicit_tls) pairs.

    Binding happens before workers fork so that a port in use fails the start at once.
    """
    out = [(_bind(a, reuse_port), False) for a in config.server.listen]
    out += [(_bind(a, reuse_port), True) for a in config.server.tls_listen]
    return out


async def start_listeners(
    ctx: ServerContext, sockets: list[tuple[socket.socket, bool]]
) -> list[asyncio.Server]:
    """Start serving POP3 (and POP3S) on already-bound sockets.

    Every listener accepts plain TCP: admission comes first, TLS after it
    (:mod:`pop3d.server.accept`).  A cleartext listener with no ``proxy_protocol_from``
    makes sessions directly, as fast as before.
    """
    loop = asyncio.get_running_loop()
    servers = []
    proxies = bool(ctx.config.server.proxy_protocol_from)
    for sock, implicit_tls in sockets:
        if implicit_tls:
            if ctx.tls_context() is None:
                msg = "tls_listen needs a [tls] section"
                raise RuntimeError(msg)
            check_tls_support(loop)
        factory: Callable[[], asyncio.Protocol]
        if implicit_tls or proxies:

            def factory(*, tls: bool = implicit_tls) -> asyncio.Protocol:
                return AcceptProtocol(ctx, implicit_tls=tls, loop=loop)

        else:

            def factory() -> asyncio.Protocol:
                return Pop3Protocol(ctx, implicit_tls=False, loop=loop)

        server = await loop.create_server(factory, sock=sock, backlog=1024)
        servers.append(server)
        name = sock.getsockname()
        log.info("listening on %s:%s%s", name[0], name[1], " (TLS)" if implicit_tls else "")
    return servers
