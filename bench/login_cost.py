"""What a login session costs pop3d in Python, without sockets: µs per session.

    .venv/bin/python bench/login_cost.py WORK/pop3d            # whole session, no socket
    .venv/bin/python bench/login_cost.py WORK/pop3d --core     # the protocol core alone
    .venv/bin/python bench/login_cost.py WORK/pop3d --profile  # and the top of cProfile
    .venv/bin/python bench/login_cost.py WORK/pop3d --no-log   # without the session line

WORK is a work folder kept by ``bench/run.py --keep`` (its ``pop3d/`` holds pop3d.toml,
the passwd-file and the login users' Maildirs).  The whole-session figure runs
greeting, USER, PASS, STAT, QUIT through ``Pop3Protocol`` with a transport that only
collects the octets: the passwd-file lookup, the Maildir checks and listing, the lock,
the core, the timers and the session log line (pop3d's own logging set-up, writing to
``login_cost.log`` in WORK/pop3d) are all in it; the kernel's socket work is not.
``--core`` feeds the same commands to ``Pop3Connection`` alone.
Pin it (``taskset -c 0``) and compare runs made one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pop3d import config as config_mod
from pop3d import logsetup
from pop3d.protocol import Pop3Connection, Pop3Settings
from pop3d.protocol.events import Closed, NeedData, OpenMaildrop, PasswordAuthenticate, Update
from pop3d.server.connection import Pop3Protocol
from pop3d.session import Backends, FailureDelays

try:
    from pop3d.app import build_authenticator, build_store
    from pop3d.protocol.values import MessageInfo, Principal
    from pop3d.server.context import ServerContext
except ImportError:  # a tree before issue 19's layout (87b09bf, the one compared with)
    from pop3d.auth.base import Principal  # type: ignore[no-redef]
    from pop3d.serve import build_authenticator, build_store  # type: ignore[attr-defined,no-redef]
    from pop3d.server.listener import ServerContext  # type: ignore[attr-defined,no-redef]
    from pop3d.storage.base import MessageInfo  # type: ignore[no-redef]

def login_users(folder: Path) -> int:
    """How many ``loginN`` users the work folder holds (1,000 in a full run's data, 200 in
    a quick run's)."""
    return sum(1 for p in (folder / "mail").iterdir() if p.name.startswith("login")) or 1000


class _Transport:
    """Collects what the server writes; closes when told; ``changed`` is set by both."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False
        self.changed = asyncio.Event()

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self.changed.wait()
            self.changed.clear()

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if key == "peername" else default

    def write(self, data: bytes) -> None:
        self.out.append(data)
        self.changed.set()

    def writelines(self, pieces: list[bytes]) -> None:
        self.out.extend(pieces)
        self.changed.set()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def server_context(folder: Path) -> ServerContext:
    """What ``pop3d serve`` builds from ``folder/pop3d.toml``, without the failure delay."""
    cfg = config_mod.load(folder / "pop3d.toml")
    backends = Backends(
        authenticator=build_authenticator(cfg), store=build_store(cfg), delays=FailureDelays(0, 0)
    )
    return ServerContext(cfg, backends, None)


async def session(ctx: ServerContext, user: bytes, commands: bytes) -> None:
    """One session through ``Pop3Protocol`` without a socket (``login_cost`` and
    ``session_cost`` alike): greeting, USER and PASS (``pw-USER``, the bench's passwords),
    then ``commands``, which end with QUIT, until the server closes."""
    transport = _Transport()
    proto = Pop3Protocol(ctx, implicit_tls=False, loop=asyncio.get_running_loop())
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(b"USER %s\r\nPASS pw-%s\r\n" % (user, user))
    await transport.until(lambda: b"".join(transport.out).count(b"\r\n") >= 3)
    if not transport.out[-1].startswith(b"+OK"):
        raise SystemExit(f"login failed: {transport.out!r}")
    proto.data_received(commands)
    await transport.until(lambda: transport.closed)
    proto.connection_lost(None)


def login_user(i: int, users: int) -> bytes:
    """The ``i``-th session's user: the bench's ``users`` login users in turn."""
    return f"login{i % users + 1}".encode()


async def _sessions(folder: Path, n: int, profile: cProfile.Profile | None) -> float:
    ctx = server_context(folder)
    loop = asyncio.get_running_loop()
    users = login_users(folder)

    async def one(i: int) -> None:
        await session(ctx, login_user(i, users), b"STAT\r\nQUIT\r\n")

    with logsetup.buffered_for(loop):  # as `pop3d serve` logs
        for i in range(2 * users):  # warm: the listing cache holds every user
            await one(i)
        if profile:
            profile.enable()
        start = time.process_time()
        for i in range(n):
            await one(i)
        spent = time.process_time() - start
        if profile:
            profile.disable()
    return spent


def _core_sessions(n: int, profile: cProfile.Profile | None) -> float:
    settings = Pop3Settings()
    listing = [MessageInfo(f"uid{i}", 1500 + i) for i in range(5)]

    def one() -> None:
        conn = Pop3Connection(settings)
        conn.data_to_send()
        for line in (b"USER login1\r\n", b"PASS pw-login1\r\n", b"STAT\r\n", b"QUIT\r\n"):
            conn.receive_data(line)
            while not isinstance(event := conn.next_event(), NeedData | Closed):
                if isinstance(event, PasswordAuthenticate):
                    conn.auth_succeeded(Principal("login1"))
                elif isinstance(event, OpenMaildrop):
                    conn.maildrop_opened(listing)
                elif isinstance(event, Update):
                    conn.update_done()
            conn.data_to_send()

    for _ in range(2000):
        one()
    if profile:
        profile.enable()
    start = time.process_time()
    for _ in range(n):
        one()
    spent = time.process_time() - start
    if profile:
        profile.disable()
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("folder", type=Path, help="the pop3d/ folder of a kept bench work folder")
    ap.add_argument("-n", "--sessions", type=int, default=20_000)
    ap.add_argument("--core", action="store_true", help="the protocol core alone")
    ap.add_argument("--profile", action="store_true", help="print the top of cProfile")
    ap.add_argument("--no-log", dest="log", action="store_false",
                    help="without the session log line (level WARNING)")
    args = ap.parse_args()
    folder = args.folder.resolve()
    log_file = Path(os.devnull) if args.core else folder / "login_cost.log"
    # pop3d's own logging set-up (as `pop3d serve`), into the log file
    with log_file.open("a", encoding="utf-8") as log_stream:
        logsetup.setup("INFO" if args.log else "WARNING", log_stream)
        _measure(args, folder)


def _measure(args: argparse.Namespace, folder: Path) -> None:
    profile = cProfile.Profile() if args.profile else None
    if args.core:
        spent = _core_sessions(args.sessions, profile)
    else:
        try:
            import uvloop  # noqa: PLC0415 (optional, as in pop3d serve)
        except ImportError:
            runner = asyncio.run
        else:
            runner = uvloop.run
        spent = runner(_sessions(folder, args.sessions, profile))
    what = "protocol core" if args.core else "whole session without sockets"
    print(f"{args.sessions} sessions, {what}: {spent / args.sessions * 1e6:.1f} µs CPU each")
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
