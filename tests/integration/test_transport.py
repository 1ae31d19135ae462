"""Socket options the transport depends on."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from pop3d.config import from_mapping
from pop3d.serve import serve_forever
from pop3d.server.listener import ServerContext, bind_all


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
