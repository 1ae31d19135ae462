"""The core's one exception: a bug of its caller, never the peer's fault.

A peer's mistakes are not exceptions: the core answers them with ``-ERR`` (and closes
past :data:`~pop3d.protocol.limits.MAX_BAD_COMMANDS`).
"""

from __future__ import annotations


class LocalProtocolError(Exception):
    """pop3d misused its own core (or a closed maildrop): a bug.  The connection is closed."""
