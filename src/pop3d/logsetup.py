"""Logging: to stderr, one line per event, one summary line per session.

Passwords never reach a log call (the core's events hide them in ``repr``; a test greps
the log of a whole session for the password).
"""

from __future__ import annotations

import logging
import sys


def setup(level: str = "INFO") -> None:
    """Send pop3d's logs to stderr at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    )
    root = logging.getLogger("pop3d")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
