"""The ``pop3d bench`` subcommand: options, user lists, exit status."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pop3d.bench.options import Options
from pop3d.bench.scenarios import SCENARIOS

_EPILOG = """\
scenarios:
  login       connect, USER, PASS, STAT, QUIT                       sessions/s, latency
  fetch       login, UIDL, LIST, RETR every message, QUIT           messages/s, MB/s
  retr-large  login, LIST, RETR 1 (--repeat times), QUIT            MB/s
  idle        hold --idle-conns authenticated sessions; NOOP probe  probe latency
  storm       login, with a NOOP probe on another session           sessions/s, probe latency

Users: a pattern with %d (-u 'user%d' -n 1000 gives user1..user1000), a comma list, or
--users-file. Concurrent sessions never share a user (POP3 locks the maildrop), so give at
least --concurrency users (plus one for the probe, which takes the last user).

Verification: every RETR is un-stuffed and its size compared with LIST; UIDL and LIST are
checked for form and against STAT; with --manifest (JSON: expected sizes and checksums per
user, see pop3d.bench.manifest) every message must be one the user's maildrop holds.

Exit status: 0 when every session succeeded and every byte checked out, 1 otherwise.

example:
  pop3d bench fetch -p 1110 -u 'fetch%d' -n 50 -c 20 -d 10 --manifest manifest.json
"""


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``pop3d`` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="load-test a POP3 server (any server) and verify what it sends",
        description="Load generator for POP3 servers: sessions/s, messages/s, MB/s, latency.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", choices=SCENARIOS, help="what each session does")
    p.add_argument("-H", "--host", default="127.0.0.1", help="server address (127.0.0.1)")
    p.add_argument("-p", "--port", type=int, default=1110, help="server port (1110)")
    p.add_argument("-u", "--users", default="user%d",
                   help="user pattern with %%d, or a comma-separated list (user%%d)")
    p.add_argument("-n", "--user-count", type=int, default=100,
                   help="how many users the %%d pattern makes (100)")
    p.add_argument("--user-start", type=int, default=1, help="first number of the pattern (1)")
    p.add_argument("--users-file", type=Path, help="file with one user name a line")
    p.add_argument("-P", "--password", default="secret",
                   help="password; %%u stands for the user name (secret)")
    p.add_argument("--auth", choices=("user", "plain"), default="user",
                   help="USER/PASS or AUTH PLAIN (user)")
    p.add_argument("-c", "--concurrency", type=int, default=10,
                   help="sessions in parallel, over all processes; for idle, how many "
                        "connections are opened at a time (10)")
    p.add_argument("-d", "--duration", type=float, default=10.0,
                   help="seconds to run (10)")
    p.add_argument("--count", type=int, help="run this many sessions instead of a duration")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="upper bound of a --count run, seconds (300)")
    p.add_argument("--session-timeout", type=float, default=60.0,
                   help="seconds one session may take before it counts as failed (60)")
    p.add_argument("-j", "--procs", type=int, default=_cores(),
                   help=f"load generator processes (cores available: {_cores()})")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="event loop; auto uses uvloop when installed")
    p.add_argument("--manifest", type=Path, help="JSON of expected messages per user")
    p.add_argument("--repeat", type=int, default=4, help="RETRs per retr-large session (4)")
    p.add_argument("--idle-conns", type=int, default=100,
                   help="idle: authenticated connections to hold (100)")
    p.add_argument("--ramp-timeout", type=float, default=300.0,
                   help="seconds allowed to open the idle connections (300)")
    p.add_argument("--probe", action="store_true",
                   help="time a NOOP on one more session throughout (idle, storm: always)")
    p.add_argument("--probe-user", help="user of the probe session (the last user)")
    p.add_argument("--probe-interval", type=float, default=0.01,
                   help="seconds between probe NOOPs (0.01)")
    p.add_argument("--ready-file", type=Path,
                   help="write this file when setup is done (idle: all connections held)")
    p.add_argument("--tls", action="store_true",
                   help="POP3S: implicit TLS on --port, a full handshake per session")
    p.add_argument("--tls-resume", action="store_true",
                   help="POP3S offering the last session's ticket (TLS session resumption)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="draw the progress line (default: when stderr is a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(run=run)
    return p


def user_list(args: argparse.Namespace) -> tuple[str, ...]:
    """The users named by ``--users``/``--user-count``/``--users-file``."""
    if args.users_file is not None:
        lines = args.users_file.read_text(encoding="utf-8").splitlines()
        return tuple(name for line in lines if (name := line.split(":", 1)[0].strip()))
    pattern: str = args.users
    if "%d" in pattern:
        start: int = args.user_start
        return tuple(pattern.replace("%d", str(i)) for i in range(start, start + args.user_count))
    return tuple(u for u in (x.strip() for x in pattern.split(",")) if u)


def run(args: argparse.Namespace) -> int:
    """Run ``pop3d bench``; return the exit status."""
    from pop3d.bench import loadgen, report  # noqa: PLC0415 (keep `pop3d --help` light)

    users = user_list(args)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    procs = max(1, args.procs)
    if args.scenario != "idle":
        procs = min(procs, max(1, args.concurrency))
    opts = Options(
        host=args.host, port=args.port, users=users, password=args.password,
        scenario=args.scenario, concurrency=max(1, args.concurrency), duration=args.duration,
        count=args.count, procs=procs, manifest=args.manifest, probe=args.probe,
        probe_user=args.probe_user, probe_interval=args.probe_interval,
        idle_conns=args.idle_conns, ramp_timeout=args.ramp_timeout, timeout=args.timeout,
        auth=args.auth, session_timeout=args.session_timeout, loop=args.loop,
        repeat=max(1, args.repeat), progress=progress,
        ready_file=args.ready_file, tls=args.tls, tls_resume=args.tls_resume,
    )
    pool = opts.pool()
    if not pool:
        sys.stderr.write("pop3d bench: no users left for the sessions "
                         "(the probe takes the last one)\n")
        return 2
    if args.scenario == "idle" and len(pool) < args.idle_conns:
        sys.stderr.write(f"pop3d bench: idle needs {args.idle_conns} users besides the "
                         f"probe's, got {len(pool)}\n")
        return 2
    if args.scenario != "idle" and len(pool) < opts.concurrency:
        sys.stderr.write(f"pop3d bench: warning: {len(pool)} users for {opts.concurrency} "
                         "parallel sessions: some will find the maildrop locked\n")
    summary = loadgen.run(opts)
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        sys.stdout.write(report.table(summary) + "\n")
    failed = summary["failures"] or summary["verify_failures"]
    if args.scenario == "idle":
        failed = failed or summary["idle"]["held"] < args.idle_conns
    elif not summary["sessions"]:
        failed = True
    return 1 if failed else 0
