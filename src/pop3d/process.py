"""Facts about the running process: its pid, and the CPUs it may use.

Code on the login path that needs the pid (the log line, the lock table's fork check)
reads :func:`pid` instead of asking the kernel with ``os.getpid()`` at every use.
``os.fork``, ``multiprocessing`` and ``subprocess`` run the at-fork hook; a fork that
skips it is not supported by CPython itself.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "pid", "usable_cpus"]

_PROC_SELF = Path("/proc/self")

_pid = os.getpid()


def pid() -> int:
    """Return this process's pid."""
    return _pid


def usable_cpus(proc_self: Path = _PROC_SELF) -> int:
    """How many CPUs this process may use: its affinity mask and CPU quota, not the host's.

    ``workers = "auto"`` and the password-hashing threads are sized by it, so a pop3d
    started under ``taskset``, in a cpuset, with systemd's ``CPUAffinity=`` or in a
    container given ``--cpus=2`` on a big host starts as many workers as it was given CPUs,
    not one per CPU of the host (the JVM and Go's runtime count the same way).  The mask
    is ``os.process_cpu_count`` (Python 3.13) or ``os.sched_getaffinity``; a quota
    (:func:`cgroup_cpu_limit`) lowers it to the quota rounded up.
    """
    counted = getattr(os, "process_cpu_count", None)
    if counted is not None:
        cpus = int(counted() or 1)
    else:
        try:
            cpus = len(os.sched_getaffinity(0)) or 1
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(proc_self)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return cpus


def cgroup_cpu_limit(proc_self: Path = _PROC_SELF) -> float | None:
    """The CPUs' worth of time this process's cgroups allow, or ``None`` for no limit.

    cgroup v2's ``cpu.max`` (``QUOTA PERIOD`` or ``max PERIOD``) and v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none), read in the process's own
    cgroup and every one above it up to the mount's root; the smallest wins.  Anything
    unreadable or malformed counts as no limit: the affinity mask still applies.
    """
    try:
        groups = (proc_self / "cgroup").read_text(encoding="utf-8").splitlines()
        mounts = (proc_self / "mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in groups:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        v2 = controllers == ""
        if not v2 and "cpu" not in controllers.split(","):
            continue
        for folder in _cgroup_folders(mounts, group, v2=v2):
            limit = _read_limit(folder, v2=v2)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _cgroup_folders(mounts: list[str], group: str, *, v2: bool) -> list[Path]:
    """The folders of ``group`` and of the groups above it, in each matching cgroup mount."""
    folders: list[Path] = []
    for line in mounts:
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(after) < 3:
            continue
        fstype, options = after[0], after[2].split(",")
        if (fstype != "cgroup2") if v2 else (fstype != "cgroup" or "cpu" not in options):
            continue
        root, mount_point = fields[3], Path(fields[4])
        relative = os.path.relpath(group, root)
        if relative.startswith(".."):
            relative = "."  # a cgroup namespace: the mount shows the process's own group
        folder = mount_point / relative
        while True:
            folders.append(folder)
            if folder == mount_point or mount_point not in folder.parents:
                break
            folder = folder.parent
    return folders


def _read_limit(folder: Path, *, v2: bool) -> float | None:
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text(encoding="utf-8").split()
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
        period_us = int((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def _forked() -> None:
    global _pid  # noqa: PLW0603 (the one process-wide fact this module keeps)
    _pid = os.getpid()


# Registered at import, so before the hooks of any module that imports this one: they
# see the child's pid.
os.register_at_fork(after_in_child=_forked)
