"""pop3d.process: the CPUs pop3d counts for ``workers = "auto"`` and its hashing threads."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pop3d import process

from .integration.helpers import cpu_affinity

V1_CPU = Path("/sys/fs/cgroup/cpu")


def _proc(tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
    """A fake /proc/self with ``cgroup`` and ``mountinfo`` whose mounts are under tmp_path."""
    proc = tmp_path / "proc-self"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo.replace("TMP", str(tmp_path)))
    return proc


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


def test_usable_cpus_follow_the_affinity_mask(tmp_path: Path) -> None:
    """The CPUs pop3d counts are the ones it may run on (taskset, cpusets), not the host's."""
    no_cgroups = tmp_path  # no /proc/self files there: the mask alone decides
    mine = os.sched_getaffinity(0)
    assert process.usable_cpus(no_cgroups) == len(mine)
    with cpu_affinity({min(mine)}):
        assert process.usable_cpus(no_cgroups) == 1


def test_v2_the_smallest_quota_on_the_way_to_the_root_wins(tmp_path: Path) -> None:
    """cgroup v2: a limit set on a parent group holds for the group below it."""
    proc = _proc(tmp_path, "0::/box/app\n",
                 "30 23 0:26 / TMP/cg rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    _write(tmp_path / "cg", cpu_max="max 100000")
    _write(tmp_path / "cg" / "box", cpu_max="150000 100000")
    _write(tmp_path / "cg" / "box" / "app", cpu_max="max 100000")
    assert process.cgroup_cpu_limit(proc) == 1.5
    assert process.usable_cpus(proc) == min(2, len(os.sched_getaffinity(0)))


def test_v2_inside_a_cgroup_namespace(tmp_path: Path) -> None:
    """A container sees its own group as "/" and at the mount's root."""
    proc = _proc(tmp_path, "0::/\n",
                 "30 23 0:26 / TMP/cg rw - cgroup2 cgroup2 rw\n")
    _write(tmp_path / "cg", cpu_max="50000 100000")
    assert process.cgroup_cpu_limit(proc) == 0.5
    assert process.usable_cpus(proc) == 1


def test_v1_cpu_controller_mounted_with_cpuacct(tmp_path: Path) -> None:
    """cgroup v1: cfs_quota_us over cfs_period_us of the cpu controller's mount."""
    proc = _proc(tmp_path, "5:memory:/other\n4:cpu,cpuacct:/docker/abc\n",
                 "40 31 0:33 / TMP/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
                 "41 31 0:34 / TMP/memory rw - cgroup cgroup rw,memory\n")
    _write(tmp_path / "cpu,cpuacct", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    _write(tmp_path / "cpu,cpuacct" / "docker" / "abc",
           cpu_cfs_quota_us="300000", cpu_cfs_period_us="100000")
    assert process.cgroup_cpu_limit(proc) == 3.0


@pytest.mark.parametrize(
    ("cgroup", "content"),
    [("0::/\n", "max 100000"), ("0::/\n", "garbage"), ("0::/\n", "100 0"), ("junk\n", "1 1")],
)
def test_no_limit_or_nonsense_counts_as_unlimited(tmp_path: Path, cgroup: str,
                                                  content: str) -> None:
    """Unlimited, unreadable or malformed: no quota, the affinity mask alone decides."""
    proc = _proc(tmp_path, cgroup, "30 23 0:26 / TMP/cg rw - cgroup2 cgroup2 rw\n")
    _write(tmp_path / "cg", cpu_max=content)
    assert process.cgroup_cpu_limit(proc) is None
    assert process.usable_cpus(proc) == len(os.sched_getaffinity(0))


def test_missing_proc_files_count_as_unlimited(tmp_path: Path) -> None:
    """No /proc (not Linux, or hidden): no quota."""
    assert process.cgroup_cpu_limit(tmp_path / "nowhere") is None


@pytest.mark.skipif(not os.access(V1_CPU / "cgroup.procs", os.W_OK),
                    reason="needs a writable cgroup v1 cpu controller (root)")
def test_a_real_cpu_quota_lowers_the_count() -> None:
    """A process put in a real cgroup with half a CPU of quota counts 1 CPU."""
    group = V1_CPU / f"pop3d-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("50000")
        child = subprocess.Popen(  # waits for a line, by which time it is in the group
            [sys.executable, "-c",
             ("import sys; sys.stdin.readline(); from pop3d import process; "
              "print(process.cgroup_cpu_limit(), process.usable_cpus())")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        (group / "cgroup.procs").write_text(str(child.pid))
        out, _ = child.communicate("go\n", timeout=30)
        assert out.split() == ["0.5", "1"]
    finally:
        group.rmdir()
