"""The pid of the running process, kept here and renewed in a forked child.

Code on the login path that needs the pid (the log line, the lock table's fork check)
reads :func:`pid` instead of asking the kernel with ``os.getpid()`` at every use.
``os.fork``, ``multiprocessing`` and ``subprocess`` run the at-fork hook; a fork that
skips it is not supported by CPython itself.
"""

from __future__ import annotations

import os

__all__ = ["pid"]

_pid = os.getpid()


def pid() -> int:
    """Return this process's pid."""
    return _pid


def _forked() -> None:
    global _pid  # noqa: PLW0603 (the one process-wide fact this module keeps)
    _pid = os.getpid()


# Registered at import, so before the hooks of any module that imports this one: they
# see the child's pid.
os.register_at_fork(after_in_child=_forked)
