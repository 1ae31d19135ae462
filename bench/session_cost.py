"""Sessions through ``Pop3Protocol`` without sockets, for instruction counts (callgrind).

    valgrind --tool=callgrind --callgrind-out-file=/dev/null --collect-atstart=no \\
        --toggle-collect=sys_call_tracing \\
        .venv/bin/python bench/session_cost.py WORK/pop3d login 300

runs ``login`` sessions (USER, PASS, STAT, QUIT over ``login1..login1000``) or ``fetch``
sessions (USER, PASS, RETR 1..100, QUIT over ``fetch1..fetch4``) after a warm-up, on a work
folder kept by ``bench/run.py --keep`` (or ``bench/ab.py``'s data), logging as ``pop3d
serve`` does (the session line, into WORK/pop3d/session_cost.log; ``--no-log``: WARNING).
The N measured sessions run inside ``sys.call_tracing``, so with the options above
callgrind counts only them: instructions per session (or per message) are the count
divided by N (or by 100 N).  (Subtracting a run of 0 sessions from a run of N instead
adds the warm-ups' difference, which moves with the machine's load: +-40 % at N=300.)
``PYTHONHASHSEED=0``; one copy of the work folder per run, as a session locks its
maildrop.  The kernel's work is not in it.  See docs/performance.md (2026-12-03).
``bench/instructions.sh TREE WORK MODE N`` runs that command on a hard-linked copy of
WORK for the source tree TREE and prints instructions a session.

``--bytecodes`` (no valgrind) prints instead the Python bytecodes and calls a session (a
message, for fetch) of the N measured sessions, by file and by function (``sys.settrace``
opcode events; deterministic, but some 50x slower).
"""

from __future__ import annotations

import asyncio
import collections
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from login_cost import login_user, login_users, server_context, session
from pop3d import logsetup

#: A fetch session's commands: RETR of its 100 messages, QUIT.
_FETCH = b"".join(b"RETR %d\r\n" % k for k in range(1, 101)) + b"QUIT\r\n"


class _Bytecodes:
    """Python bytecodes and calls by (file, function), from ``sys.settrace`` events."""

    def __init__(self) -> None:
        self.ops: collections.Counter[tuple[str, str]] = collections.Counter()
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:  # noqa: ARG002
        code = frame.f_code
        key = (code.co_filename.rpartition("/src/")[2].rpartition("/python3.11/")[2],
               code.co_qualname)
        if event == "call":
            self.calls[key] += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            self.ops[key] += 1
        return self.trace

    def report(self, per: int) -> None:
        print(f"bytecodes {sum(self.ops.values()) / per:.0f}, "
              f"calls {sum(self.calls.values()) / per:.0f} a session")
        by_file: collections.Counter[str] = collections.Counter()
        for (file, _), count in self.ops.items():
            by_file[file] += count
        for file, count in by_file.most_common(30):
            print(f"{count / per:9.1f} {file}")
        print("--- bytecodes, calls a session, function")
        for key, count in self.ops.most_common(80):
            print(f"{count / per:9.1f} {self.calls[key] / per:6.2f} {key[0]}:{key[1]}")


def _traced(counter: _Bytecodes, run: Any, *args: Any) -> None:
    sys.settrace(counter.trace)
    try:
        run(*args)
    finally:
        sys.settrace(None)


def _run(folder: Path, mode: str, n: int, counter: _Bytecodes | None = None) -> None:
    ctx = server_context(folder)
    users = login_users(folder)

    async def one(i: int) -> None:
        if mode == "login":
            await session(ctx, login_user(i, users), b"STAT\r\nQUIT\r\n")
        else:
            await session(ctx, f"fetch{i % 4 + 1}".encode(), _FETCH)

    async def warm() -> None:
        for _ in range(2):  # the second pass finds every listing remembered
            for i in range(users if mode == "login" else 8):
                await one(i)
            await asyncio.sleep(2.1)  # maildir._RACY_SECONDS: then a listing is kept

    async def measured() -> None:
        for i in range(n):
            await one(i)

    loop = asyncio.new_event_loop()
    try:
        with logsetup.buffered_for(loop):
            loop.run_until_complete(warm())
            if counter is not None:
                _traced(counter, loop.run_until_complete, measured())
            else:
                # callgrind --toggle-collect=sys_call_tracing counts this call only
                sys.call_tracing(loop.run_until_complete, (measured(),))
    finally:
        loop.close()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a not in ("--no-log", "--bytecodes")]
    if len(args) != 3 or args[1] not in ("login", "fetch"):
        raise SystemExit("usage: session_cost.py WORK/pop3d login|fetch N [--no-log] [--bytecodes]")
    folder = Path(args[0])
    count = _Bytecodes() if "--bytecodes" in sys.argv else None
    # pop3d's own logging set-up (as `pop3d serve`: the session line at INFO), into a file
    with (folder / "session_cost.log").open("a", encoding="utf-8") as log_stream:
        logsetup.setup("WARNING" if "--no-log" in sys.argv else "INFO", log_stream)
        _run(folder, args[1], int(args[2]), count)
    if count is not None:
        count.report(int(args[2]) * (100 if args[1] == "fetch" else 1))
