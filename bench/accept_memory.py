"""The accept path under load: a silent flood on the POP3S port, and idle POP3S sessions' RSS.

    .venv/bin/python bench/accept_memory.py flood  [--loop asyncio|uvloop] [--n 1000]
    .venv/bin/python bench/accept_memory.py idle   [--loop asyncio|uvloop] [--n 2000] [--login]
    .venv/bin/python bench/accept_memory.py idle --stls ...   (port 110 and STLS instead)

``flood``: a server with ``max_connections_per_ip = 50`` and ``max_connections = 80``;
``--n`` TCP connections to its POP3S port that never send a byte, from 20 loopback
addresses (127.0.0.11 to .30).  Prints how many the server still holds open after 1 s and
after ``--hold`` seconds (a connection the server closed reads EOF), and its RSS growth.

``idle``: ``--n`` TLS sessions that complete the handshake, read the greeting (and with
``--login`` log in, one user each) and then stay silent; prints the server's RSS growth per
session (VmRSS of the server process, after a warm-up of 100 sessions so that lazy
allocations are not counted).  ``--stls``: the same on the cleartext port, upgraded with
STLS.

The server runs in a child process on the chosen event loop (``pop3d serve`` picks uvloop
whenever installed, hence this script's own child); the clients run here, on asyncio.
These are memory and count figures, not speed: they do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

from pop3d import config as config_mod
from pop3d.testing import free_port, to_toml, wait_for_port

WARM = 100


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve_child(config_path: str, loop_kind: str) -> None:
    """Run one pop3d worker on ``loop_kind`` (the child process's job)."""
    _raise_nofile()
    if loop_kind == "uvloop":
        import uvloop  # noqa: PLC0415

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from pop3d.serve import serve_forever  # noqa: PLC0415
    from pop3d.server.allocator import keep_chunk_buffers_in_heap  # noqa: PLC0415
    from pop3d.server.listener import bind_all  # noqa: PLC0415

    keep_chunk_buffers_in_heap()
    cfg = config_mod.load(Path(config_path))
    asyncio.run(serve_forever(cfg, bind_all(cfg)))


def _setup(folder: Path, users: int, **server: object) -> tuple[Path, int, int, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(folder / "key.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    lines = []
    for i in range(users):
        lines.append(f"u{i}:{{PLAIN}}pw\n")
        for sub in ("tmp", "new", "cur"):
            (folder / "mail" / f"u{i}" / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
    (folder / "users").write_text("".join(lines))
    port, tls_port = free_port(), free_port()
    sections: dict[str, dict[str, object]] = {
        "server": {
            "listen": [f"127.0.0.1:{port}"],
            "tls_listen": [f"127.0.0.1:{tls_port}"],
            "idle_timeout": 600,
            "workers": 1,
            **server,
        },
        "tls": {"cert": "cert.pem", "key": "key.pem"},
        "auth": {"passwd_file": "users", "failure_delay": 0},
        "storage": {"maildir": "mail/%u/Maildir"},
    }
    path = folder / "pop3d.toml"
    path.write_text(to_toml(sections))
    return path, port, tls_port, folder / "ca.pem"


def _start(config_path: Path, loop_kind: str, port: int) -> subprocess.Popen[bytes]:
    log = (config_path.parent / "server.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, __file__, "_serve", str(config_path), loop_kind],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    wait_for_port("127.0.0.1", port, 20, process=proc)
    return proc


async def _flood(n: int, tls_port: int, hold: float) -> tuple[int, int]:
    loop = asyncio.get_running_loop()
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)  # noqa: FBT003
        s.bind((f"127.0.0.{11 + i % 20}", 0))
        await loop.sock_connect(s, ("127.0.0.1", tls_port))
        socks.append(s)

    def still_open() -> int:
        alive = 0
        for s in socks:
            try:
                data = s.recv(1 << 16)
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
            else:
                if data:  # the server sent something (a TLS alert?): count it as open
                    alive += 1
        return alive

    await asyncio.sleep(1)
    after_1s = still_open()
    await asyncio.sleep(max(0.0, hold - 1))
    after_hold = still_open()
    for s in socks:
        s.close()
    return after_1s, after_hold


async def _idle(
    n: int, ports: tuple[int, int], ca: Path, pid: int, login: bool, stls: bool
) -> tuple[int, int, int]:
    ctx = ssl.create_default_context(cafile=str(ca))
    held: list[asyncio.StreamWriter] = []

    async def one(i: int) -> None:
        if stls:
            reader, writer = await asyncio.open_connection("127.0.0.1", ports[0])
            assert (await reader.readline()).startswith(b"+OK")
            writer.write(b"STLS\r\n")
            assert (await reader.readline()).startswith(b"+OK")
            await writer.start_tls(ctx, server_hostname="localhost")
            writer.write(b"NOOP\r\n")
            greeting = await reader.readline()  # NOOP's answer before login: -ERR
        else:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", ports[1], ssl=ctx, server_hostname="localhost"
            )
            greeting = await reader.readline()
            assert greeting.startswith(b"+OK"), greeting
        held.append(writer)
        if login:
            writer.write(f"USER u{i}\r\nPASS pw\r\n".encode())
            assert (await reader.readline()).startswith(b"+OK")
            answer = await reader.readline()
            assert answer.startswith(b"+OK"), answer

    async def batch(lo: int, hi: int) -> None:
        for start in range(lo, hi, 200):
            await asyncio.gather(*(one(i) for i in range(start, min(hi, start + 200))))

    await batch(0, WARM)
    await asyncio.sleep(0.5)
    base = _rss_kib(pid)
    await batch(WARM, n)
    await asyncio.sleep(1)
    after = _rss_kib(pid)
    for w in held:
        w.transport.abort()
    return base, after, n - WARM


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        _serve_child(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("what", choices=("flood", "idle"))
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--n", type=int, default=0)
    p.add_argument("--hold", type=float, default=10.0, help="flood: seconds to hold")
    p.add_argument("--login", action="store_true", help="idle: log every session in")
    p.add_argument("--stls", action="store_true", help="idle: port 110 with STLS")
    args = p.parse_args()
    _raise_nofile()
    with tempfile.TemporaryDirectory(prefix="pop3d-accept-") as tmp:
        folder = Path(tmp)
        if args.what == "flood":
            n = args.n or 1000
            path, port, tls_port, _ = _setup(
                folder, 1, max_connections=80, max_connections_per_ip=50
            )
        else:
            n = args.n or 2000
            path, port, tls_port, _ = _setup(
                folder, n if args.login else 1, max_connections=n + 100,
                max_connections_per_ip=n + 100,
            )
        proc = _start(path, args.loop, port)
        try:
            rss0 = _rss_kib(proc.pid)
            if args.what == "flood":
                t0 = time.monotonic()
                after_1s, after_hold = asyncio.run(_flood(n, tls_port, args.hold))
                print(
                    f"flood {args.loop}: {n} silent connections to POP3S (caps 50/ip, 80 total): "
                    f"{after_1s} held after 1 s, {after_hold} after {args.hold:.0f} s; "
                    f"server RSS +{_rss_kib(proc.pid) - rss0} KiB "
                    f"({time.monotonic() - t0:.0f} s)"
                )
            else:
                base, after, count = asyncio.run(
                    _idle(n, (port, tls_port), folder / "ca.pem", proc.pid, args.login,
                          args.stls)
                )
                state = "logged in" if args.login else "after the greeting"
                kind = "STLS" if args.stls else "POP3S"
                print(
                    f"idle {args.loop}: {count} {kind} sessions {state}: RSS "
                    f"+{after - base} KiB, {(after - base) / count:.1f} KiB per session"
                )
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if os.environ.get("ACCEPT_MEMORY_LOG"):
                print((folder / "server.log").read_text()[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
