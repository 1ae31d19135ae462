"""The ``pop3d`` command line: serve, check-config, deliver, user, mailbox, who, kick, bench.

``build_parser()`` is separate from ``main()`` so tests drive the CLI in-process:
``main(["deliver", "--config", path, "alice", msg]) == 0``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pop3d import __version__


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="pop3d", description="A POP3 server.")
    parser.add_argument("--version", action="version", version=f"pop3d {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from pop3d import (  # noqa: PLC0415 (each subcommand loads only what it needs)
        admin,
        checkconfig,
        dbadmin,
        dbimport,
        deliver,
        serve,
        useradmin,
    )

    serve.add_parser(sub)
    checkconfig.add_parser(sub)
    deliver.add_parser(sub)
    useradmin.add_parser(sub)
    admin.add_parser(sub)
    dbadmin.add_parser(sub)
    dbimport.add_parser(sub)
    from pop3d import bench  # noqa: PLC0415 (each subcommand loads only what it needs)

    bench.add_parser(sub)
    _add_testserver(sub)
    return parser


def _add_testserver(sub: Any) -> None:
    """Register ``testserver`` (pop3d.testing.http; loaded only when it runs)."""
    p = sub.add_parser(
        "testserver",
        help="a throwaway POP3 server for tests, driven over a JSON HTTP API",
        description="Run a test server (Maildirs in a temporary folder, TLS from a "
        "throwaway CA) until SIGTERM/SIGINT; print one JSON line with its ports and users.",
    )
    p.add_argument("--user", action="append", default=[], metavar="NAME[:PASSWORD]",
                   help="a user (repeatable); without a password one is made")
    p.add_argument("--pop3-port", type=int, default=0, help="cleartext POP3 (0: any free)")
    p.add_argument("--pop3s-port", type=int, default=0, help="implicit TLS (0: any free)")
    p.add_argument("--http-port", type=int, default=0, help="HTTP API and page (0: any free)")
    p.add_argument("--root", type=Path, default=None,
                   help="folder for users, mail, certificates (default: a temporary one)")
    p.add_argument("--no-tls", action="store_true", help="no STLS, no POP3S")
    p.set_defaults(run=_run_testserver)


def _run_testserver(args: argparse.Namespace) -> int:
    from pop3d.testing import http  # noqa: PLC0415 (each subcommand loads only what it needs)

    return http.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.run(args)
    except KeyboardInterrupt:  # Ctrl-C at a prompt: no traceback
        print(file=sys.stderr)  # noqa: T201
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
