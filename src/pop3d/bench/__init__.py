"""``pop3d bench``: a load generator for any POP3 server, in the spirit of redis-benchmark.

It runs one scenario (``login``, ``fetch``, ``retr-large``, ``idle``, ``storm``) from several
processes, verifies every message it receives (size against LIST, checksum against a
manifest when given), and prints a summary with its own CPU use.  ``bench/run.py`` at the
repository root drives it against pop3d and Dovecot side by side.
"""

from __future__ import annotations

from pop3d.bench.cli import add_parser, run

__all__ = ["add_parser", "run"]
