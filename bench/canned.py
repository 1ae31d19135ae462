"""Canned POP3 servers: every reply precomputed, for the ceilings of the benchmark.

``--message FILE``: serves that one message to any user and password, RETR being one
``sendall``, so that retr-large run against it shows the most the load generator and the
kernel can carry, checks included.  Its load-generator CPU tells which of the two is the
limit: with zlib-ng's CRC-32 in the generator (bench/.venv) it is the canned server's
core, the generator then being at about two thirds of its own; with plain zlib it was the
generator.  A real server that comes near this figure is near what the rig can measure.

``--login MANIFEST [--tls CERT KEY]``: answers login sessions (greeting, USER, PASS, STAT from the
manifest, QUIT) from an asyncio protocol on uvloop, with no password check, no storage
and no logging: what the load generator can drive.  On the development VM the generator
reaches its whole core first (the canned server used 84 µs of CPU a session, so it could
go faster); no real server can pass this figure, and the ratio to it shows how far a
server is from being limited by the generator.  With ``--tls`` the same over POP3S: the
ceiling of ``login-tls`` and ``login-tls-resume`` (TLS 1.3 tickets on, as Python's ssl
issues them), with the server's TLS handshake in it as any server's.

127.0.0.1 only; stops after ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections import Counter
from pathlib import Path
from typing import cast

from pop3d.bench.manifest import Manifest, stuff, to_wire


def serve(conn: socket.socket, retr: bytes, size: int) -> None:
    with conn, conn.makefile("rb") as rfile:
        conn.sendall(b"+OK canned\r\n")
        for line in rfile:
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"RETR":
                conn.sendall(retr)
            elif verb == b"STAT":
                conn.sendall(b"+OK 1 %d\r\n" % size)
            elif verb == b"LIST":
                conn.sendall(b"+OK\r\n1 %d\r\n.\r\n" % size)
            elif verb == b"QUIT":
                conn.sendall(b"+OK bye\r\n")
                return
            else:
                conn.sendall(b"+OK\r\n")


class LoginProtocol(asyncio.Protocol):
    """One login session: every reply a constant but STAT's, looked up by user."""

    def __init__(self, stats: dict[bytes, bytes]) -> None:
        self.stats = stats
        self.buf = b""
        self.user = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods but are not its subclasses
        self.transport = t = cast("asyncio.Transport", transport)
        t.write(b"+OK canned\r\n")

    def data_received(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        self.buf += data
        while b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            verb, _, arg = line.rstrip(b"\r").partition(b" ")
            verb = verb.upper()
            if verb == b"USER":
                self.user = arg
                t.write(b"+OK\r\n")
            elif verb == b"STAT":
                t.write(self.stats.get(self.user, b"+OK 0 0\r\n"))
            elif verb == b"QUIT":
                t.write(b"+OK bye\r\n")
                t.close()
                return
            else:
                t.write(b"+OK\r\n")


def serve_logins(port: int, manifest: Path, seconds: float,
                 tls: tuple[Path, Path] | None = None) -> None:
    """Run the canned login server for ``seconds`` (POP3S with ``tls``: certificate, key)."""
    known = Manifest.load(manifest)
    stats = {}
    for user in known.users:
        box = known.expected(user) or Counter()
        size = sum(s * k for (s, _), k in box.items())
        stats[user.encode()] = b"+OK %d %d\r\n" % (box.total(), size)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        context = None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls[0], tls[1])
        server = await loop.create_server(
            lambda: LoginProtocol(stats), "127.0.0.1", port, backlog=1024, ssl=context
        )
        async with server:
            await asyncio.sleep(seconds)

    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--message", type=Path, help="serve this message (retr-large)")
    what.add_argument("--login", type=Path, metavar="MANIFEST", help="serve login sessions")
    ap.add_argument("--tls", type=Path, nargs=2, metavar=("CERT", "KEY"),
                    help="--login over implicit TLS (POP3S), Python's ssl as pop3d uses it")
    ap.add_argument("--seconds", type=float, default=120)
    a = ap.parse_args()
    if a.login is not None:
        serve_logins(a.port, a.login, a.seconds, tuple(a.tls) if a.tls else None)
        return
    wire = to_wire(a.message.read_bytes())
    retr = b"+OK\r\n" + stuff(wire) + b".\r\n"
    end = time.monotonic() + a.seconds
    with socket.create_server(("127.0.0.1", a.port), backlog=128) as srv:
        srv.settimeout(0.5)
        while time.monotonic() < end:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve, args=(conn, retr, len(wire)), daemon=True).start()


if __name__ == "__main__":
    main()
