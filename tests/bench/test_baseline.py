"""``bench/run.py --baseline NAME=REV``: another revision's pop3d as one more column.

A real run (one scenario, one second, no ceilings) against this checkout's HEAD as the
baseline, a revision that has no ``pop3d serve`` (its column n/a, the run still whole), and
the POP3S fallback of a tree that cannot serve it (a stub server: no such revision exists).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The repository's first commit: a skeleton with no ``pop3d serve``.
SKELETON = "fae5c6a"


@pytest.fixture(scope="module")
def bench_modules() -> Iterator[tuple[ModuleType, ModuleType]]:
    """bench/run.py and bench/servers.py, imported as run.py imports its neighbours."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        yield importlib.import_module("run"), importlib.import_module("servers")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _assert_no_worktree_left(res: subprocess.CompletedProcess[str]) -> None:
    """The run's temporary worktree (under its work folder, named in its log) is gone."""
    work = res.stderr.split(" users (", 1)[1].split(" in ", 1)[1].split()[0]
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list", "--porcelain"],
                            capture_output=True, text=True, check=True).stdout
    assert work.startswith("/tmp/pop3d-bench-")
    assert work not in listed
    assert not Path(work).exists()


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--servers", "pop3d",
         "--scenarios", "login", "--duration", "1", "--no-ceilings", "--large-mib", "1",
         "--idle", "1", "--results", str(tmp_path), *args],
        capture_output=True, text=True, timeout=230, check=False, cwd=ROOT)


def _row(stdout: str, scenario: str, metric: str) -> list[str]:
    """The cells after the metric on the table line of ``scenario`` / ``metric``."""
    for line in stdout.splitlines():
        if line.startswith(scenario + " ") and f" {metric} " in line + " ":
            return line.split(metric, 1)[1].split()
    raise AssertionError(f"no row {scenario} {metric} in:\n{stdout}")


def _header(stdout: str) -> list[str]:
    return next(x.split() for x in stdout.splitlines() if x.startswith("scenario "))


@pytest.mark.timeout(240)  # ~20 s; a loaded 2-CPU machine has stretched it to 80
def test_baselines_run_as_columns_beside_pop3d(tmp_path: Path) -> None:
    """HEAD runs as pop3d@head, taking its turns; the skeleton, which cannot serve, is n/a
    with its reason, and the run is still whole."""
    res = _bench(tmp_path, "--baseline", "head=HEAD", "--baseline", f"skel={SKELETON}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _header(res.stdout) == ["scenario", "metric", "pop3d", "pop3d@head", "pop3d@skel",
                                   "pop3d/pop3d@head", "pop3d/pop3d@skel"]
    current, base, skel, ratio, skel_ratio = (
        x.replace(",", "") for x in _row(res.stdout, "login", "sessions/s"))
    assert float(current) > 0
    assert float(base) > 0
    # the ratio of the unrounded rates (in the JSON), to its two digits
    rates = json.loads(next(tmp_path.glob("*.json")).read_text())["results"]
    exact = (rates["pop3d"]["login"]["sessions_per_s"]
             / rates["pop3d@head"]["login"]["sessions_per_s"])
    assert float(ratio) == pytest.approx(exact, abs=0.006)
    assert (skel, skel_ratio) == ("n/a", "n/a")
    assert _row(res.stdout, "login", "verify failures") == ["0", "0", "n/a", "-", "-"]
    assert "pop3d@head: login" in res.stderr  # its turns were taken
    note = next(x for x in res.stdout.splitlines() if x.startswith("n/a: pop3d@skel: login:"))
    assert "did not start" in note
    assert "Traceback" not in res.stdout
    _assert_no_worktree_left(res)
    assert (tmp_path / "latest.txt").read_text().count("pop3d@head") >= 2


def test_an_unknown_revision_is_refused_before_any_work(tmp_path: Path) -> None:
    res = _bench(tmp_path, "--baseline", "x=no-such-revision-here")
    assert res.returncode == 2
    assert "names no commit" in res.stderr
    assert "data:" not in res.stderr


def test_a_tree_without_pop3s_runs_its_other_rows(
        bench_modules: tuple[ModuleType, ModuleType], tmp_path: Path) -> None:
    run, servers = bench_modules

    class NoPop3s(servers.Pop3d):  # type: ignore[name-defined,misc]
        """A tree whose config refuses tls_listen (as a revision before POP3S would)."""

        started = False

        def start(self) -> bool:
            if self.tls:
                self.error = "pop3d.log tail\npop3d.config.ConfigError: unknown key tls_listen"
                return False
            self.started = True
            return True

    cert = (tmp_path / "cert.pem", tmp_path / "key.pem")
    under: dict[str, Any] = {"pop3d@old": (NoPop3s(tmp_path, 1, "0", tls=cert, src=tmp_path,
                                                    label="old"), tmp_path)}
    results: dict[str, Any] = {}
    assert run.Runner.start("pop3d@old", under, ["login", "login-tls"], results)
    plain = under["pop3d@old"][0]
    assert plain.started
    assert plain.tls is None
    assert plain.name == "pop3d@old"
    assert results == {"login-tls": {
        "n/a": "no POP3S: pop3d.config.ConfigError: unknown key tls_listen"}}
    # in the table: the baseline's cell and the ratio say n/a, and the reason is printed
    results = {"pop3d": {"login-tls": {"sessions_per_s": 900.0}}, "pop3d@old": results}
    text = run.table(results, ["pop3d", "pop3d@old"], 0.0, ["login-tls"], {})
    assert _row(text, "login-tls", "sessions/s (full handshake)") == ["900", "n/a", "n/a"]
    assert text.splitlines()[-1] == (
        "n/a: pop3d@old: login-tls: no POP3S: pop3d.config.ConfigError: unknown key tls_listen")


def test_two_worker_rows_show_the_gain_and_the_split(
        bench_modules: tuple[ModuleType, ModuleType]) -> None:
    run, _ = bench_modules
    results: dict[str, dict[str, dict[str, Any]]] = {
        "pop3d": {"login": {"sessions_per_s": 1000.0, "server_cpu_util": 0.5},
                  "login-2w": {"sessions_per_s": 1500.0, "server_processes": 3,
                               "server_cpu_util": 1.0,
                               "server_cpu_by_process_s": [2.0, 1.5, 0.01]}},
        "dovecot": {"login": {"sessions_per_s": 100.0},
                    "login-2w": {"sessions_per_s": 160.0, "server_processes": 9,
                                 "server_cpu_by_process_s": [3.0, 1.0]}},
    }
    text = run.table(results, ["pop3d", "dovecot"], 0.0, ["login", "login-2w"], {})
    assert _row(text, "login-2w", "x its login row (1 worker, 1 CPU)") == ["1.50", "1.60", "-"]
    # a worker's share is pop3d's; Dovecot's processes are not workers of one kind
    assert _row(text, "login-2w", "2nd busiest process CPU, % of 1st") == ["75", "-", "-"]
    # one worker took every connection: the other's share is 0
    results["pop3d"]["login-2w"]["server_cpu_by_process_s"] = [2.0]
    text = run.table(results, ["pop3d", "dovecot"], 0.0, ["login", "login-2w"], {})
    assert _row(text, "login-2w", "2nd busiest process CPU, % of 1st") == ["0", "-", "-"]
    assert _row(text, "login-2w", "server processes") == ["3", "9", "-"]
    # the sessions a CPU-second with one worker and with two: what sharing costs
    assert _row(text, "login", "sessions per server CPU-s") == ["2,000", "-", "-"]
    assert _row(text, "login-2w", "sessions per server CPU-s") == ["1,500", "-", "-"]


def test_slices_add_each_process_cpu(bench_modules: tuple[ModuleType, ModuleType]) -> None:
    run, _ = bench_modules
    part = {"elapsed_s": 1.0, "sessions": 10, "server_cpu_s": 1.0}
    merged = run.merge_slices([{**part, "server_cpu_by_process_s": [0.6, 0.4]},
                               {**part, "server_cpu_by_process_s": [0.5, 0.3, 0.1]}])
    assert merged["server_cpu_by_process_s"] == [1.1, 0.7, 0.1]


def test_baselines_may_run_fewer_scenarios(bench_modules: tuple[ModuleType, ModuleType],
                                           tmp_path: Path) -> None:
    run, _ = bench_modules
    args = run.argparse.Namespace(loadgen_cpus="1", baseline_scenarios={"login"})
    runner = run.Runner(args, run.QUICK, tmp_path)
    assert runner.takes_part("pop3d@old", "login")
    assert not runner.takes_part("pop3d@old", "fetch")
    assert runner.takes_part("pop3d", "fetch")
    assert runner.takes_part("dovecot", "fetch")
