"""Sessions through ``Pop3Protocol`` without sockets, for instruction counts (callgrind).

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/session_cost.py WORK/pop3d fetch 10

runs ``login`` sessions (USER, PASS, STAT, QUIT over ``login1..login1000``) or ``fetch``
sessions (USER, PASS, RETR 1..100, QUIT over ``fetch1..fetch4``) after a warm-up, on a work
folder kept by ``bench/run.py --keep`` (or ``bench/ab.py``'s data).  Instructions per
session (or per message) are the difference between N and 0 sessions, divided by N (or by
100 N): a figure that, unlike time, does not move with the load of a shared machine
(``PYTHONHASHSEED=0``; one copy of the work folder per run, as a session locks its
maildrop).  The kernel's work is not in it.  See docs/performance.md (2026-12-03).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from login_cost import _Transport
from pop3d import config as config_mod
from pop3d import logsetup
from pop3d.app import build_authenticator, build_store
from pop3d.server.connection import Pop3Protocol
from pop3d.server.context import ServerContext
from pop3d.session import Backends, FailureDelays


async def _main(folder: Path, mode: str, n: int) -> None:
    cfg = config_mod.load(folder / "pop3d.toml")
    backends = Backends(authenticator=build_authenticator(cfg), store=build_store(cfg),
                        delays=FailureDelays(0, 0))
    ctx = ServerContext(cfg, backends, None)
    loop = asyncio.get_running_loop()
    # 1,000 login users in a full run's data, fewer in a quick run's
    logins = sum(1 for p in (folder / "mail").iterdir() if p.name.startswith("login")) or 1000

    async def one(i: int) -> None:
        if mode == "login":
            user = f"login{i % logins + 1}".encode()
            cmds = b"STAT\r\nQUIT\r\n"
        else:
            user = f"fetch{i % 4 + 1}".encode()
            cmds = b"".join(b"RETR %d\r\n" % k for k in range(1, 101)) + b"QUIT\r\n"
        t = _Transport()
        proto = Pop3Protocol(ctx, implicit_tls=False, loop=loop)
        proto.connection_made(t)  # type: ignore[arg-type]
        proto.data_received(b"USER %s\r\nPASS pw-%s\r\n" % (user, user))
        await t.until(lambda: b"".join(t.out).count(b"\r\n") >= 3)
        if not t.out[-1].startswith(b"+OK"):
            raise SystemExit(f"login failed: {t.out!r}")
        proto.data_received(cmds)
        await t.until(lambda: t.closed)
        proto.connection_lost(None)

    with logsetup.buffered_for(loop):
        for _ in range(2):  # the second pass finds every listing remembered
            for i in range(logins if mode == "login" else 8):
                await one(i)
            await asyncio.sleep(2.1)  # maildir._RACY_SECONDS: then a listing is kept
        for i in range(n):
            await one(i)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[2] not in ("login", "fetch"):
        raise SystemExit("usage: session_cost.py WORK/pop3d login|fetch N")
    asyncio.run(_main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
