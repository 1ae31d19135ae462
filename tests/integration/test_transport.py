"""Socket options the transport depends on, and how replies leave it."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from pop3d.config import from_mapping
from pop3d.serve import serve_forever
from pop3d.server.context import ServerContext
from pop3d.server.listener import bind_all

from .helpers import RawClient, ServerFactory


def test_client_sockets_have_nodelay(tmp_path: Path) -> None:
    """Accepted sockets have TCP_NODELAY: else every multi-line reply waits 40 ms for an ACK."""
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    cfg = from_mapping(
        {
            "server": {"listen": ["127.0.0.1:0"], "workers": 1},
            "auth": {"passwd_file": "users"},
            "storage": {"maildir": "mail/%u/Maildir"},
        },
        tmp_path,
    )
    sockets = bind_all(cfg)
    assert all(sock.proto == socket.IPPROTO_TCP for sock, _ in sockets)
    port = sockets[0][0].getsockname()[1]

    async def main() -> int:
        ready: asyncio.Future[ServerContext] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        server = asyncio.create_task(serve_forever(cfg, sockets, ready=ready, stop=stop))
        ctx = await ready
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert (await reader.readline()).startswith(b"+OK")
            [conn] = ctx.connections
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        finally:
            writer.close()
            await writer.wait_closed()
            stop.set()
            await server

    assert asyncio.run(main()) != 0


def test_sessions_answered_in_one_turn_get_their_own_replies_in_order(
    pop3_server_factory: ServerFactory,
) -> None:
    """Twenty whole sessions sent at once: the replies written together at the end of each
    turn of the loop reach the right client, in order, with the sign-off before the close."""
    users = {f"user{i}": f"pw{i}" for i in range(20)}
    server = pop3_server_factory(users=users)
    for i, user in enumerate(users):
        for _ in range(i):
            server.add_message(user, b"Subject: x\n\nbody\n")
    clients = [RawClient(server.host, server.port) for _ in users]
    try:
        for client, (user, password) in zip(clients, users.items(), strict=True):
            session = f"USER {user}\r\nPASS {password}\r\nSTAT\r\nQUIT\r\n"
            client.send(session.encode())
        for i, client in enumerate(clients):
            assert client.line() == b"+OK send PASS\r\n"
            assert client.line().startswith(b"+OK user%d's maildrop has %d " % (i, i))
            assert client.line().startswith(b"+OK %d " % i)
            assert client.line().startswith(b"+OK")
            assert client.wait_eof() == b""
    finally:
        for client in clients:
            client.close()
