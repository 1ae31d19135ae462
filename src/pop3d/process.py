"""Facts about the running process: its pid, and the CPUs it may run on.

Code on the login path that needs the pid (the log line, the lock table's fork check)
reads :func:`pid` instead of asking the kernel with ``os.getpid()`` at every use.
``os.fork``, ``multiprocessing`` and ``subprocess`` run the at-fork hook; a fork that
skips it is not supported by CPython itself.
"""

from __future__ import annotations

import os

__all__ = ["pid", "usable_cpus"]

_pid = os.getpid()


def pid() -> int:
    """Return this process's pid."""
    return _pid


def usable_cpus() -> int:
    """How many CPUs this process may run on: its affinity mask, not the machine's count.

    ``workers = "auto"`` and the password-hashing threads are sized by it, so a pop3d
    started under ``taskset``, a cpuset cgroup or systemd's ``CPUAffinity=`` on a big host
    starts as many workers as it was given CPUs, not one per CPU of the host (nginx's
    ``worker_processes auto`` counts the same way).  ``os.process_cpu_count`` (Python
    3.13) where there is one; the affinity mask (Linux) else; the machine's count last.
    """
    counted = getattr(os, "process_cpu_count", None)
    if counted is not None:
        return int(counted() or 1)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _forked() -> None:
    global _pid  # noqa: PLW0603 (the one process-wide fact this module keeps)
    _pid = os.getpid()


# Registered at import, so before the hooks of any module that imports this one: they
# see the child's pid.
os.register_at_fork(after_in_child=_forked)
