"""``python -m pop3d.bench``: the load generator alone, without the server's dependencies."""

from __future__ import annotations

import argparse
import sys

from pop3d.bench.cli import add_parser


def main() -> int:
    """Parse ``sys.argv`` as ``pop3d bench`` would and run."""
    parser = argparse.ArgumentParser(prog="pop3d")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["bench", *sys.argv[1:]])
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
