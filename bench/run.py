"""``make bench``: pop3d against Dovecot (and Twisted), same data, same load generator, one run.

Creates the data (bench/mkdata.py), starts each server pinned to the server CPUs, runs every
scenario with ``pop3d bench`` pinned to the load generator CPUs, verifies every byte against
the manifest, and prints one table with the ratio pop3d/Dovecot.  Results also go to
``bench/results/`` (JSON and the table).  Every server listens on 127.0.0.1 only, every run
is bounded in time, and only processes started here are stopped, by PID.

``--baseline NAME=REV`` adds pop3d as of git revision REV (a temporary worktree) as server
``pop3d@NAME``, taking its turns like the others, and the ratio pop3d/pop3d@NAME; what that
tree cannot run is "n/a", with the reason under the table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import loopback
import mkdata
import servers
from pop3d.bench import report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCH_VENV = ROOT / "bench" / ".venv"
SCENARIOS = ("login", "fetch", "retr-large", "retr-dots", "retr-alldots", "idle", "storm",
             "login-tls", "login-tls-resume", "retr-large-tls",
             "login-mbox", "fetch-mbox", "retr-large-mbox", "login-2w", "retr-large-2w")
#: Scenarios that are another scenario of the load generator (other users, POP3S, mbox
#: servers, two-worker servers).
_LOADGEN_SCENARIO = {"retr-dots": "retr-large", "retr-alldots": "retr-large",
                     "login-tls": "login", "login-tls-resume": "login",
                     "retr-large-tls": "retr-large",
                     "login-mbox": "login", "fetch-mbox": "fetch", "retr-large-mbox": "retr-large",
                     "login-2w": "login", "retr-large-2w": "retr-large"}
#: POP3S scenarios: on the servers' implicit-TLS port, with the load generator's flag.
_TLS = {"login-tls": "tls", "login-tls-resume": "tls_resume", "retr-large-tls": "tls"}
#: Scenarios run on servers of their own, after the Maildir servers: mbox maildrops, and
#: pop3d with two workers (beside Dovecot) on both CPUs.
MBOX = ("login-mbox", "fetch-mbox", "retr-large-mbox")
TWO_WORKERS = ("login-2w", "retr-large-2w")


def _users_of(scenario: str) -> str:
    """The scenario whose users and options ``scenario`` takes (itself for most)."""
    return scenario if scenario in ("retr-dots", "retr-alldots") else (
        _LOADGEN_SCENARIO.get(scenario, scenario))


#: Servers that take part in the mbox and two-worker passes (Twisted reads Maildir only),
#: with every ``pop3d@NAME`` baseline.
_PASS_SERVERS = ("pop3d", "dovecot")


STORM_PASSWORD = "storm-secret"


def _in_passes(name: str) -> bool:
    return name in _PASS_SERVERS or name.startswith("pop3d@")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (full or --quick)."""

    duration: float
    login_users: int
    fetch_users: int
    large_users: int
    idle_conns: int
    storm_users: int
    large_size: int
    loopback_s: float


FULL = Plan(duration=10, login_users=1000, fetch_users=64, large_users=4, idle_conns=10000,
            storm_users=50, large_size=20 << 20, loopback_s=3)
QUICK = Plan(duration=3, login_users=200, fetch_users=32, large_users=4, idle_conns=500,
             storm_users=20, large_size=20 << 20, loopback_s=1)


def raise_nofile(want: int = 65536) -> None:
    """Let this process and the servers it starts hold 10,000+ connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def slow_hash() -> tuple[str, str]:
    """A ``{ARGON2ID}`` (else ``{SHA512-CRYPT}``) hash of the storm password, by doveadm."""
    for scheme in ("ARGON2ID", "SHA512-CRYPT"):
        res = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", STORM_PASSWORD],
                             capture_output=True, text=True, check=False, timeout=30)
        if res.returncode == 0 and res.stdout.startswith("{"):
            return scheme, res.stdout.strip()
    raise SystemExit("bench: doveadm pw failed; is dovecot-core installed?")


def loadgen_python() -> tuple[str, dict[str, str]]:
    """The interpreter for the load generator: bench/.venv (uvloop) if made, else this one."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    py = BENCH_VENV / "bin" / "python"
    return (str(py) if py.exists() else sys.executable), env


class Runner:
    """One benchmark run over several servers."""

    def __init__(self, args: argparse.Namespace, plan: Plan, work: Path) -> None:
        self.args = args
        self.plan = plan
        self.work = work
        self.py, self.env = loadgen_python()
        self.ncpu = len(servers.parse_cpus(args.loadgen_cpus))
        self.loopback_rates: list[float] = []
        self.ceiling_parts: dict[str, list[dict[str, Any]]] = {}
        #: the ceilings take a turn in each round unless ``--no-ceilings``
        self.with_ceilings = not getattr(args, "no_ceilings", False)
        #: the scenarios the ``pop3d@NAME`` baselines take part in (None: all)
        self.baseline_scenarios: set[str] | None = getattr(args, "baseline_scenarios", None)

    def takes_part(self, name: str, scenario: str) -> bool:
        """Whether server ``name`` runs ``scenario`` (a baseline may run fewer)."""
        return (not name.startswith("pop3d@") or self.baseline_scenarios is None
                or scenario in self.baseline_scenarios)

    def bench_cmd(self, server_dir: Path, port: int, scenario: str, **opt: Any) -> list[str]:
        cmd = ["taskset", "-c", self.args.loadgen_cpus, self.py, "-m", "pop3d.bench",
               _LOADGEN_SCENARIO.get(scenario, scenario),
               "-p", str(port), "--manifest", str(server_dir / "manifest.json"), "--json",
               "-j", str(opt.pop("procs", self.ncpu))]
        if self.args.progress:
            cmd.append("--progress")
        for key, value in opt.items():
            flag = f"--{key.replace('_', '-')}"
            cmd += [flag] if value is True else [flag, str(value)]
        return cmd

    def loadgen(self, cmd: list[str], timeout: float) -> dict[str, Any]:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, env=self.env,
                             timeout=timeout, check=False)
        try:
            out: dict[str, Any] = json.loads(res.stdout)
        except json.JSONDecodeError:
            return {"error": f"load generator exit {res.returncode}"}
        return out

    def scenario_opts(self, scenario: str) -> dict[str, Any]:
        base = _users_of(scenario)
        if base != scenario:
            opt = self.scenario_opts(base)
            if scenario in _TLS:
                opt[_TLS[scenario]] = True
            return opt
        p = self.plan
        d = p.duration
        if scenario == "login":
            return {"users": "login%d", "user_count": p.login_users, "password": "pw-%u",
                    "concurrency": 32, "duration": d}
        if scenario == "fetch":
            return {"users": "fetch%d", "user_count": p.fetch_users, "password": "pw-%u",
                    "concurrency": 16, "duration": d}
        if scenario in ("retr-large", "retr-dots", "retr-alldots"):
            users = {"retr-large": "large%d", "retr-dots": "dots%d",
                     "retr-alldots": "alldots%d"}[scenario]
            return {"users": users, "user_count": p.large_users, "password": "pw-%u",
                    "concurrency": 2, "duration": d, "repeat": 4, "procs": 1}
        if scenario == "idle":
            return {"users": "idle%d", "user_count": p.idle_conns + 1, "password": "pw-%u",
                    "concurrency": 64, "duration": d, "idle_conns": p.idle_conns,
                    "ramp_timeout": 600}
        return {"users": "storm%d", "user_count": p.storm_users + 1, "password": STORM_PASSWORD,
                "concurrency": 8, "duration": d}

    def warm_up(self, server_dir: Path, port: int, scenarios: list[str]) -> None:
        """One pass over every mailbox but the idle ones, so Dovecot's indexes exist."""
        done = set()
        for scenario in scenarios:
            if scenario == "idle":
                continue
            # POP3S scenarios warm their users in cleartext, once with their base scenario
            key = _users_of(scenario)
            if key in done:
                continue
            done.add(key)
            opt = {k: v for k, v in self.scenario_opts(key).items() if k not in _TLS.values()}
            opt.pop("duration")
            opt["count"] = opt["user_count"]
            opt["timeout"] = 300
            if key.startswith("retr-"):
                opt["repeat"] = 1
            if key == "storm":
                opt["probe_user"] = "storm1"  # the probe takes no part in a warm-up
            self.loadgen(self.bench_cmd(server_dir, port, key, **opt), timeout=400)

    def _canned(self, canned_args: list[str], scenario: str, data: Path,
                duration: float, tls: bool = False) -> dict[str, Any]:
        """Run ``scenario`` for ``duration`` s against bench/canned.py with ``canned_args``."""
        port = servers.free_port()
        d = duration
        proc = subprocess.Popen(
            ["taskset", "-c", self.args.server_cpus, sys.executable,
             str(ROOT / "bench" / "canned.py"), "--port", str(port), *canned_args,
             "--seconds", str(d + 60)],
            stdin=subprocess.DEVNULL, env=self.env)
        try:
            if not servers.wait_greeting(port, 20, tls=tls):
                return {"error": "canned server did not start"}
            opt = {**self.scenario_opts(scenario), "duration": d}
            return self.loadgen(self.bench_cmd(data, port, scenario, **opt), timeout=d + 60)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def generator_ceiling(self, duration: float) -> dict[str, Any]:
        """retr-large against bench/canned.py: what the load generator can take in, checked."""
        data = self.work / "data"
        message = next((data / "mail" / "large1" / "Maildir" / "new").iterdir())
        return self._canned(["--message", str(message)], "retr-large", data, duration)

    def login_ceiling(self, duration: float) -> dict[str, Any]:
        """login against bench/canned.py: the most a Python server on uvloop can do, pinned
        as the servers are (no password check, no storage), and what the generator drives."""
        data = self.work / "data"
        return self._canned(["--login", str(data / "manifest.json")], "login", data, duration)

    def tls_login_ceiling(self, scenario: str, duration: float) -> dict[str, Any]:
        """login-tls(-resume) against bench/canned.py over POP3S: the generator's TLS ceiling."""
        data = self.work / "data"
        cert, key = servers.make_cert(self.work, self.args.tls_key)
        return self._canned(["--login", str(data / "manifest.json"), "--tls", str(cert),
                             str(key)], scenario, data, duration, tls=True)

    def measure_ceilings(self, scenario: str, duration: float) -> None:
        """One round of the ceilings beside ``scenario``: loopback and a canned server."""
        if scenario == "retr-large":
            rate = loopback.measure(self.plan.loopback_s / self.args.rounds,
                                    self.args.server_cpus, self.args.loadgen_cpus)
            self.loopback_rates.append(rate)
            out = self.generator_ceiling(duration)
            log(f"ceilings: raw loopback {rate:,.0f} MB/s; a canned server "
                f"{out.get('mb_per_s', 0):,.0f} MB/s, load generator at "
                f"{out.get('loadgen_cpu', {}).get('utilization', 0):.0%} of its CPU")
        elif scenario in ("login-tls", "login-tls-resume"):
            out = self.tls_login_ceiling(scenario, duration)
            log(f"ceiling: a canned uvloop POP3S server {out.get('sessions_per_s', 0):,.0f} "
                f"sessions/s, load generator at "
                f"{out.get('loadgen_cpu', {}).get('utilization', 0):.0%} of its CPU")
        elif scenario == "login":
            out = self.login_ceiling(duration)
            log(f"ceiling: a canned uvloop server {out.get('sessions_per_s', 0):,.0f} "
                f"sessions/s, load generator at "
                f"{out.get('loadgen_cpu', {}).get('utilization', 0):.0%} of its CPU")
        else:
            return
        self.ceiling_parts.setdefault(scenario, []).append(out)

    def tls_ceilings(self) -> dict[str, dict[str, Any]]:
        """The canned POP3S server's login-tls and login-tls-resume, over all rounds."""
        return {k: merge_slices(v) for k, v in self.ceiling_parts.items() if k in _TLS}

    def ceilings(self) -> tuple[float, dict[str, Any], dict[str, Any]]:
        """The loopback rate, and the canned server's retr-large and login, over all rounds."""
        rates = self.loopback_rates
        merged = {k: merge_slices(v) for k, v in self.ceiling_parts.items()}
        return (sum(rates) / len(rates) if rates else 0.0,
                merged.get("retr-large", {}), merged.get("login", {}))

    def run_idle(self, server: servers.Server, server_dir: Path, opt: dict[str, Any],
                 ) -> dict[str, Any]:
        assert server.pid is not None
        before = servers.memory_kib(server.pid)
        ready = self.work / f"idle-ready-{server.name}"
        cmd = self.bench_cmd(server_dir, server.port, "idle", ready_file=ready, **opt)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=self.env)
        deadline = time.monotonic() + opt["ramp_timeout"] + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        held_mem = servers.memory_kib(server.pid)
        try:
            out_b, _ = proc.communicate(timeout=opt["duration"] + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out_b, _ = proc.communicate()
        try:
            out: dict[str, Any] = json.loads(out_b)
        except json.JSONDecodeError:
            out = {"error": f"load generator exit {proc.returncode}"}
        held = (out.get("idle") or {}).get("held", 0)
        out["server_memory"] = {
            "before_rss_kib": before[0], "held_rss_kib": held_mem[0],
            "before_pss_kib": before[1], "held_pss_kib": held_mem[1],
            "processes": held_mem[2],
            "rss_per_conn_kib": (held_mem[0] - before[0]) / held if held else None,
            "pss_per_conn_kib": (held_mem[1] - before[1]) / held if held else None,
        }
        return out

    def measure(self, server: servers.Server, server_dir: Path, scenario: str,
                opt: dict[str, Any]) -> dict[str, Any]:
        """Run one scenario against one server, with the server's CPU over the run."""
        assert server.pid is not None
        cpu0 = servers.cpu_seconds(server.pid)
        each0 = servers.cpu_by_process(server.pid)
        if scenario == "idle":
            out = self.run_idle(server, server_dir, opt)
        else:
            port = server.tls_port if scenario in _TLS else server.port
            cmd = self.bench_cmd(server_dir, port, scenario, **opt)
            out = self.loadgen(cmd, timeout=opt["duration"] + 300)
        out["server_cpu_s"] = servers.cpu_seconds(server.pid) - cpu0
        # each process's share: how a multi-process server spread the work (workers = 2)
        each = servers.cpu_by_process(server.pid)
        out["server_cpu_by_process_s"] = sorted(
            (round(t - each0.get(p, 0.0), 2) for p, t in each.items()
             if t - each0.get(p, 0.0) >= 0.01), reverse=True)
        out["server_processes"] = len(each)
        if out.get("elapsed_s"):
            out["server_cpu_util"] = out["server_cpu_s"] / out["elapsed_s"]
        if out.get("verify_failures"):
            log(f"{server.name}: {scenario}: {out['verify_failures']} VERIFY FAILURES")
        return out

    @staticmethod
    def start(name: str, under_test: dict[str, tuple[servers.Server, Path]],
              scenarios: list[str], results: dict[str, Any]) -> bool:
        """Start server ``name``; what it cannot run goes into ``results`` as "n/a".

        A baseline tree that cannot serve POP3S is started without it (its POP3S rows
        n/a); one that does not start at all has every scenario of the pass n/a.
        """
        server, sdir = under_test[name]
        log(f"{name}: starting on 127.0.0.1:{server.port} (CPUs {server.cpus})")
        if server.start():
            return True
        reason = _reason(server.error)
        log(f"{name}: {server.error}")
        if isinstance(server, servers.Pop3d) and server.src is not None and server.tls:
            log(f"{name}: starting it without POP3S")
            plain = server.without_tls()
            under_test[name] = (plain, sdir)
            if plain.start():
                results.update({s: {"n/a": f"no POP3S: {reason}"} for s in scenarios
                                if s in _TLS})
                return True
            reason = _reason(plain.error)
            log(f"{name}: {plain.error}")
        log(f"{name}: not measured")
        results.update({s: {"n/a": f"did not start: {reason}"} for s in scenarios})
        return False

    def run_servers(self, under_test: dict[str, tuple[servers.Server, Path]],
                    scenarios: list[str]) -> dict[str, dict[str, Any]]:
        """Every scenario against every server, all of them started side by side.

        ``idle`` runs first, on each fresh server in turn: the memory a server holds per
        connection is measured against a baseline no other scenario has inflated.  Each
        timed scenario then runs in ``--rounds`` slices per server, the servers taking
        turns and the order reversed every other round (A B C, C B A), so that a change in
        the shared machine's speed during the run falls on every server alike.  The
        ceilings (raw loopback and a canned server) take their turn in each round too,
        as one more contestant.
        """
        results: dict[str, dict[str, Any]] = {name: {} for name in under_test}
        live: list[str] = []
        try:
            live.extend(name for name in list(under_test)
                        if self.start(name, under_test, scenarios, results[name]))
            if "idle" in scenarios:
                for name in (n for n in live if self.takes_part(n, "idle")):
                    log(f"{name}: idle")
                    server, sdir = under_test[name]
                    results[name]["idle"] = self.measure(server, sdir, "idle",
                                                         self.scenario_opts("idle"))
            timed = [s for s in scenarios if s != "idle"]
            if timed:
                for name in live:
                    log(f"{name}: warm-up pass over the mailboxes")
                    server, sdir = under_test[name]
                    self.warm_up(sdir, server.port,
                                 [s for s in timed if self.takes_part(name, s)])
            rounds = self.args.rounds
            for scenario in timed:
                opt = self.scenario_opts(scenario)
                opt["duration"] /= rounds
                able = [n for n in live if self.takes_part(n, scenario)
                        and (scenario not in _TLS or under_test[n][0].tls)]
                parts: dict[str, list[dict[str, Any]]] = {name: [] for name in able}
                contestants = [_CEILINGS, *able] if self.with_ceilings else able
                for r in range(rounds):
                    for name in contestants if r % 2 == 0 else contestants[::-1]:
                        if name == _CEILINGS:
                            self.measure_ceilings(scenario, opt["duration"])
                            continue
                        log(f"{name}: {scenario}"
                            + (f" (round {r + 1} of {rounds})" if rounds > 1 else ""))
                        server, sdir = under_test[name]
                        parts[name].append(self.measure(server, sdir, scenario, dict(opt)))
                for name in able:
                    if all("error" in p for p in parts[name]):
                        results[name][scenario] = {"n/a": _reason(parts[name][0]["error"])}
                    else:
                        results[name][scenario] = merge_slices(parts[name])
        finally:
            for name in live:
                under_test[name][0].stop()
        return results


#: The ceilings' place in a round's order of contestants (not a server name).
_CEILINGS = ""


def _reason(error: str) -> str:
    """The last line of an error text (a log's tail: a traceback ends with its exception)."""
    lines = [x.strip() for x in error.strip().splitlines() if x.strip()]
    text = lines[-1] if lines else "unknown error"
    return text if len(text) <= 200 else text[:197] + "..."


def merge_slices(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from a scenario's slices against one server (report.merge, plus CPU)."""
    out = report.merge(parts)
    if len(parts) > 1:
        if any("server_cpu_s" in p for p in parts):  # the ceilings' canned servers have none
            out["server_cpu_s"] = sum(p.get("server_cpu_s", 0.0) for p in parts)
            if out.get("elapsed_s"):
                out["server_cpu_util"] = out["server_cpu_s"] / out["elapsed_s"]
        # each process's CPU over all slices (sorted lists: the busiest with the busiest)
        each = [p.get("server_cpu_by_process_s") or [] for p in parts]
        if any(each):
            out["server_cpu_by_process_s"] = [
                round(sum(x), 2) for x in itertools.zip_longest(*each, fillvalue=0.0)]
        keys = ("sessions_per_s", "messages_per_s", "mb_per_s", "server_cpu_util",
                "server_cpu_by_process_s")
        out["slices"] = [{k: p.get(k) for k in keys} for p in parts]
    return out


def log(text: str) -> None:
    sys.stderr.write(f"bench: {text}\n")
    sys.stderr.flush()


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def rows_of(results: dict[str, Any], names: list[str], ceiling: float,
            gen_rate: float | None, login_rate: float | None = None,
            tls_ceilings: dict[str, dict[str, Any]] | None = None,
            ) -> list[tuple[str, str, list[float | None], int]]:
    """(scenario, metric, value per server, digits) rows of the table."""

    def get(server: str, scenario: str, *path: str) -> float | None:
        node: Any = results.get(server, {}).get(scenario)
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return float(node) if isinstance(node, (int, float)) else None

    rows: list[tuple[str, str, list[float | None], int]] = []

    def add(scenario: str, metric: str, path: tuple[str, ...], digits: int = 0) -> None:
        rows.append((scenario, metric, [get(n, scenario, *path) for n in names], digits))

    def per_server_cpu(scenario: str, unit: str, key: str, scale: float = 1.0) -> None:
        """``unit``s per CPU-second of all the server's processes (the rate at ``key``
        divided by the server's CPU use): what one core of the server makes whichever side
        saturated, steadier than a rate on a shared machine (the figure to compare trees
        by), and beside the two-worker rows the same as with one worker when nothing the
        workers share costs more."""
        rates = [get(n, scenario, key) for n in names]
        busy = [get(n, scenario, "server_cpu_util") for n in names]
        rows.append((scenario, f"{unit} per server CPU-s",
                     [r * scale / b if r is not None and b else None
                      for r, b in zip(rates, busy, strict=True)], 0))

    def loadgen_cost(scenario: str) -> None:
        """The load generator's CPU per session, in microseconds."""
        values: list[float | None] = []
        for n in names:
            run_s, done = get(n, scenario, "loadgen_cpu", "run_s"), get(n, scenario, "sessions")
            values.append(run_s * 1e6 / done if run_s is not None and done else None)
        rows.append((scenario, "loadgen CPU µs/session", values, 0))

    add("login", "sessions/s", ("sessions_per_s",))
    per_server_cpu("login", "sessions", "sessions_per_s")
    rows.append(("login", "canned-server ceiling", [login_rate] * len(names), 0))
    add("login", "latency p50 ms", ("latency", "p50_ms"), 2)
    add("login", "latency p99 ms", ("latency", "p99_ms"), 2)
    add("fetch", "messages/s", ("messages_per_s",))
    add("fetch", "MB/s", ("mb_per_s",), 1)
    per_server_cpu("fetch", "messages", "messages_per_s")
    add("retr-large", "MB/s", ("mb_per_s",))
    per_server_cpu("retr-large", "MB", "mb_per_s")
    rows.append(("retr-large", "loopback ceiling MB/s", [ceiling] * len(names), 0))
    rows.append(("retr-large", "canned-server ceiling MB/s", [gen_rate] * len(names), 0))
    add("retr-dots", "MB/s (11 % dot lines)", ("mb_per_s",))
    add("retr-alldots", "MB/s (every line a dot)", ("mb_per_s",))
    add("idle", "connections held", ("idle", "held"))
    add("idle", "RSS KiB/conn", ("server_memory", "rss_per_conn_kib"), 1)
    add("idle", "PSS KiB/conn", ("server_memory", "pss_per_conn_kib"), 1)
    add("idle", "NOOP p50 ms", ("probe", "p50_ms"), 2)
    add("idle", "NOOP p99 ms", ("probe", "p99_ms"), 2)
    add("storm", "sessions/s", ("sessions_per_s",), 1)
    add("storm", "NOOP p50 ms", ("probe", "p50_ms"), 2)
    add("storm", "NOOP p99 ms", ("probe", "p99_ms"), 2)
    def tls_ceiling(scenario: str) -> None:
        out = (tls_ceilings or {}).get(scenario, {})
        rate = out.get("sessions_per_s")
        busy = (out.get("loadgen_cpu") or {}).get("utilization")
        rows.append((scenario, "canned POP3S ceiling", [rate] * len(names), 0))
        rows.append((scenario, "its loadgen CPU %", [busy] * len(names), 0))

    add("login-tls", "sessions/s (full handshake)", ("sessions_per_s",))
    per_server_cpu("login-tls", "sessions", "sessions_per_s")
    loadgen_cost("login-tls")
    tls_ceiling("login-tls")
    add("login-tls", "latency p99 ms", ("latency", "p99_ms"), 2)
    add("login-tls-resume", "sessions/s (ticket offered)", ("sessions_per_s",))
    per_server_cpu("login-tls-resume", "sessions", "sessions_per_s")
    loadgen_cost("login-tls-resume")
    tls_ceiling("login-tls-resume")
    resumed = [get(n, "login-tls-resume", "tls_resumed") for n in names]
    done = [get(n, "login-tls-resume", "sessions") for n in names]
    rows.append(("login-tls-resume", "resumed %",
                 [100 * r / d if r is not None and d else None
                  for r, d in zip(resumed, done, strict=True)], 0))
    add("retr-large-tls", "MB/s", ("mb_per_s",))
    per_server_cpu("retr-large-tls", "MB", "mb_per_s")
    add("login-mbox", "sessions/s", ("sessions_per_s",))
    add("fetch-mbox", "messages/s", ("messages_per_s",))
    add("fetch-mbox", "MB/s", ("mb_per_s",), 1)
    add("retr-large-mbox", "MB/s", ("mb_per_s",))
    def scaling(scenario: str, one: str, metric: str, path: tuple[str, ...]) -> None:
        """How ``scenario`` (workers = "auto" on the two-worker CPUs) grew from ``one``
        (one worker, one CPU), and how evenly a pop3d's busiest two processes shared it."""
        add(scenario, f"{metric} (workers = auto, 2 CPUs)", path)
        two, base = ([get(n, s, *path) for n in names] for s in (scenario, one))
        rows.append((scenario, f"x its {one} row (1 worker, 1 CPU)",
                     [a / b if a is not None and b else None
                      for a, b in zip(two, base, strict=True)], 2))
        per_server_cpu(scenario, "sessions" if one == "login" else "MB", path[0])
        add(scenario, "server processes", ("server_processes",))
        each = [results.get(n, {}).get(scenario, {}).get("server_cpu_by_process_s") or []
                if n.startswith("pop3d") else [] for n in names]
        # one busy process: the other worker had (next to) nothing, 0 %
        rows.append((scenario, "2nd busiest process CPU, % of 1st",
                     [100 * (e[1] if len(e) > 1 else 0.0) / e[0] if e and e[0] else None
                      for e in each], 0))

    scaling("login-2w", "login", "sessions/s", ("sessions_per_s",))
    scaling("retr-large-2w", "retr-large", "MB/s", ("mb_per_s",))
    for scenario in SCENARIOS:
        if _LOADGEN_SCENARIO.get(scenario, scenario) in ("fetch", "retr-large"):
            add(scenario, "verified msgs", ("verified",))
        add(scenario, "verify failures", ("verify_failures",))
        add(scenario, "failed sessions", ("failures",))
        add(scenario, "loadgen CPU %", ("loadgen_cpu", "utilization"), 0)
        if scenario != "idle":  # its CPU time includes the ramp, its run is a wait
            add(scenario, "server CPU %", ("server_cpu_util",), 0)
    return rows


_NO_RATIO = {
    "canned-server ceiling", "loopback ceiling MB/s", "canned-server ceiling MB/s",
    "connections held", "verified msgs", "resumed %", "canned POP3S ceiling", "its loadgen CPU %",
    "verify failures", "failed sessions", "loadgen CPU %", "server CPU %", "server processes",
    "2nd busiest process CPU, % of 1st", "loadgen CPU µs/session",
}

#: What the table's two kinds of rate are, printed under it.
TABLE_NOTE = (
    "sessions/s, MB/s: wall-clock rates, capped by whichever side (server or load generator)\n"
    'saturates its core first.  "per server CPU-s": the same count divided by the CPU\n'
    "seconds of all the server's processes over the run (from /proc: pop3d's worker; Dovecot's\n"
    "master, login, auth and pop3 processes, exited ones included), i.e. the rate one core\n"
    "of the server would reach: its ratio does not depend on which side saturates."
)


def _ratio(shown: list[float | None], names: list[str], other: str, metric: str,
           na: list[bool]) -> str:
    """The cell pop3d/``other`` of one row: "-" for a metric without a ratio or a value,
    "n/a" where ``other`` could not run the scenario."""
    if metric in _NO_RATIO or metric.startswith("x its "):
        return "-"
    i = names.index(other)
    a, b = shown[names.index("pop3d")], shown[i]
    if na[i]:
        return "n/a"
    return f"{a / b:.2f}" if a is not None and b else "-"


def not_run(results: dict[str, Any], names: list[str], scenarios: list[str]) -> list[str]:
    """One line per server and reason: the scenarios it could not run ("n/a") and why."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for name in names:
        for scenario in scenarios:
            reason = (results.get(name, {}).get(scenario) or {}).get("n/a")
            if reason is not None:
                by_reason.setdefault((name, reason), []).append(scenario)
    return [f"n/a: {name}: {', '.join(which)}: {reason}"
            for (name, reason), which in by_reason.items()]


def table(results: dict[str, Any], names: list[str], ceiling: float,
          scenarios: list[str], generator: dict[str, Any],
          login_ceiling: dict[str, Any] | None = None,
          tls_ceilings: dict[str, dict[str, Any]] | None = None) -> str:
    """The table: a column per server, then pop3d's ratios to Dovecot, to each
    ``pop3d@NAME`` baseline and to each Twisted peer; and the "n/a" lines under it."""
    header = ["scenario", "metric", *names]
    with_ratio = "pop3d" in names and "dovecot" in names
    at = 3 + names.index("dovecot") if with_ratio else 0  # right after Dovecot's column
    if with_ratio:
        header.insert(at, "pop3d/dovecot")
    # pop3d against each baseline and Twisted peer present, after the servers' own columns
    peers = [p for p in names if p.startswith("pop3d@")] + [
        p for p in ("twisted", "twisted-tuned") if p in names]
    peers = [p for p in peers if "pop3d" in names]
    header += [f"pop3d/{p}" for p in peers]
    lines = []
    gen_rate = generator.get("mb_per_s")
    login_rate = (login_ceiling or {}).get("sessions_per_s")
    for scenario, metric, values, digits in rows_of(results, names, ceiling, gen_rate,
                                                    login_rate, tls_ceilings):
        if scenario not in scenarios or all(v is None for v in values):
            continue
        scale = 100 if metric.endswith("CPU %") else 1
        shown = [None if v is None else v * scale for v in values]
        na = [v is None and "n/a" in (results.get(n, {}).get(scenario) or {})
              for n, v in zip(names, values, strict=True)]
        cells = [scenario, metric,
                 *("n/a" if x else _fmt(v, digits) for v, x in zip(shown, na, strict=True))]
        if with_ratio:
            cells.insert(at, _ratio(shown, names, "dovecot", metric, na))
        cells += [_ratio(shown, names, p, metric, na) for p in peers]
        lines.append(cells)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for cells in lines:
        left = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        out.append("  ".join(left + right))
    notes = not_run(results, names, scenarios)
    return "\n".join(out + (["", *notes] if notes else []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small run (3 s a scenario, 500 idle connections)")
    ap.add_argument("--servers", default="pop3d,dovecot",
                    help="comma list of pop3d, dovecot, twisted, twisted-tuned (pop3d,dovecot)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--duration", type=float, help="seconds per scenario")
    ap.add_argument("--idle", type=int, help="idle connections to hold (10000; quick: 500)")
    ap.add_argument("--large-mib", type=int,
                    help="size of the retr-* scenarios' messages in MiB (20)")
    ap.add_argument("--baseline", action="append", default=[], metavar="NAME=REV",
                    help="also run pop3d from git revision REV (checked out into a temporary "
                         "worktree) as server pop3d@NAME, taking turns with the others; the "
                         "table adds pop3d/pop3d@NAME (repeatable)")
    ap.add_argument("--baseline-scenarios", metavar="LIST",
                    help="the scenarios the baselines take part in (all of --scenarios); e.g. "
                         "login,fetch,retr-large for a before/after beside a full run")
    ap.add_argument("--no-ceilings", action="store_true",
                    help="leave out the loopback and canned-server ceilings' turns")
    ap.add_argument("--server-cpus", default="0")
    ap.add_argument("--loadgen-cpus", default=default_loadgen_cpus(),
                    help="CPUs of the load generator (the highest CPU: on 3+ CPUs apart from "
                         "the two-worker servers' 0-1) (%(default)s)")
    ap.add_argument("--workers", type=int, default=1, help="pop3d worker processes (1)")
    ap.add_argument("--tls-key", choices=("ec", "rsa"), default="ec",
                    help="POP3S certificate: ECDSA P-256 or RSA 2048 (ec)")
    ap.add_argument("--two-worker-cpus", default="0-1",
                    help="CPUs of the servers in the login-2w and retr-large-2w scenarios "
                         '(pop3d with workers = "auto", i.e. one per CPU given, Dovecot '
                         "beside it) (0-1)")
    ap.add_argument("--rounds", type=int,
                    help="slices each timed scenario is cut into, servers taking turns "
                         "(2; quick: 1)")
    ap.add_argument("--progress", action="store_true", help="show the load generator's line")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="folder for the JSON and latest.txt (bench/results)")
    args = ap.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if args.baseline_scenarios is not None:
        args.baseline_scenarios = {s for s in args.baseline_scenarios.split(",") if s}
        unknown |= args.baseline_scenarios - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenario(s) {sorted(unknown)}")
    names = [s for s in args.servers.split(",") if s]
    baselines: dict[str, str] = {}
    for spec in args.baseline:
        label, _, rev = spec.partition("=")
        if not label or not rev or not label.replace("-", "").replace("_", "").isalnum():
            ap.error(f"--baseline {spec!r}: give NAME=REV (NAME: letters, digits, - and _)")
        if label in baselines:
            ap.error(f"--baseline {label} given twice")
        try:
            baselines[label] = servers.resolve_rev(rev)
        except servers.CheckoutError as exc:
            ap.error(f"--baseline {spec}: {exc}")
    unknown = [n for n in names if n not in _SERVERS]
    if unknown:
        ap.error(f"unknown server(s) {unknown}: pop3d@NAME comes from --baseline NAME=REV")
    # each baseline's column beside pop3d's
    at = names.index("pop3d") + 1 if "pop3d" in names else 0
    names[at:at] = [f"pop3d@{label}" for label in baselines]
    plan = QUICK if args.quick else FULL
    if args.duration or args.idle or args.large_mib:
        plan = Plan(**{**plan.__dict__,
                       "duration": args.duration or plan.duration,
                       "idle_conns": args.idle or plan.idle_conns,
                       "large_size": (args.large_mib << 20) if args.large_mib else plan.large_size})
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.rounds < 1:
        ap.error("--rounds must be 1 or more")
    raise_nofile()
    # SIGTERM (a timeout, a Ctrl-C'd make) unwinds like an exception, so servers get stopped
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="pop3d-bench-", dir="/tmp"))
    work.chmod(0o755)  # Dovecot's mail processes run as the dovecot user
    started = time.time()
    args.trees = {}
    stack = contextlib.ExitStack()
    try:
        for label, commit in baselines.items():
            log(f"pop3d@{label}: checking out {commit[:12]}")
            args.trees[label] = stack.enter_context(
                servers.checkout(commit, work / f"tree-{label}"))
        scheme, hashed = slow_hash()
        log(f"data: {plan.login_users} login, {plan.fetch_users} fetch (100 x 4 KiB), "
            f"{plan.large_users} large ({plan.large_size >> 20} MiB), {plan.idle_conns} idle, "
            f"{plan.storm_users} storm users ({scheme}) in {work}")
        mkdata.build(work / "data", login_users=plan.login_users,
                     fetch_users=plan.fetch_users, large_users=plan.large_users,
                     idle_users=plan.idle_conns, storm_users=plan.storm_users,
                     storm_hash=hashed, large_size=plan.large_size,
                     dots_users=plan.large_users)
        runner = Runner(args, plan, work)
        tls = servers.make_cert(work, args.tls_key)
        results: dict[str, Any] = {name: {} for name in names}
        maildir = [s for s in args.scenarios if s not in MBOX and s not in TWO_WORKERS]
        mbox = [s for s in args.scenarios if s in MBOX]
        two = [s for s in args.scenarios if s in TWO_WORKERS]

        def in_pass(name: str, scenarios: list[str]) -> bool:
            return any(runner.takes_part(name, s) for s in scenarios)

        passes: list[tuple[str, list[str], list[str]]] = [
            ("", [n for n in names if in_pass(n, maildir)], maildir)]
        if mbox:
            mkdata.build_mbox(work / "mboxdata", login_users=plan.login_users,
                              fetch_users=plan.fetch_users, large_users=plan.large_users,
                              large_size=plan.large_size)
            passes.append(("mbox", [n for n in names if _in_passes(n) and in_pass(n, mbox)],
                           mbox))
        if two:
            passes.append(("2w", [n for n in names if _in_passes(n) and in_pass(n, two)], two))
        for kind, pass_names, scenarios in passes:
            if not scenarios or not pass_names:
                continue
            if kind:
                log(f"--- {kind} pass: {', '.join(pass_names)}: {', '.join(scenarios)}")
            data = work / ("mboxdata" if kind == "mbox" else "data")
            under_test: dict[str, tuple[servers.Server, Path]] = {}
            for name in pass_names:
                sdir = work / (f"{name}-{kind}" if kind else name)
                sdir.mkdir()
                # each server gets its own tree (Maildir: hard links, same bytes, separate
                # directories; mbox: copies, Dovecot writes its headers into the files)
                subprocess.run(["cp", "-a" if kind == "mbox" else "-al", str(data / "mail"),
                                str(sdir / "mail")], check=True)
                for f in ("users", "manifest.json"):
                    shutil.copy(data / f, sdir / f)
                under_test[name] = (make_server(name, sdir, args, kind, tls), sdir)
            for name, got in runner.run_servers(under_test, scenarios).items():
                results[name].update(got)
        ceiling, generator, login_ceiling = runner.ceilings()
        tls_ceilings = runner.tls_ceilings()
        text = table(results, names, ceiling, args.scenarios, generator, login_ceiling,
                     tls_ceilings)
        machine = (f"{os.cpu_count()} CPUs ({_cpu_model()}), server on CPU {args.server_cpus}, "
                   f"load generator on CPU {args.loadgen_cpus} "
                   f"({'uvloop venv' if runner.py != sys.executable else 'asyncio'}), "
                   f"{'quick' if args.quick else 'full'} run, {plan.duration:g} s per scenario"
                   + (f", POP3S certificate {args.tls_key.upper()}"
                      if any(s in _TLS for s in args.scenarios) else "")
                   + (f" in {args.rounds} rounds, servers taking turns" if args.rounds > 1 else "")
                   + "".join(f"; pop3d@{label} is {commit[:12]}"
                             for label, commit in baselines.items())
                   + (f" (on {','.join(s for s in SCENARIOS if s in args.baseline_scenarios)}"
                      " only)" if baselines and args.baseline_scenarios is not None else ""))
        text += "\n\n" + TABLE_NOTE
        print(f"\n{machine}\n\n{text}")
        log(f"the run took {(time.time() - started) / 60:.1f} minutes")
        args.results.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
        (args.results / f"{stamp}.json").write_text(json.dumps(
            {"machine": machine, "plan": plan.__dict__, "loopback_mb_s": ceiling,
             "baselines": baselines, "run_s": round(time.time() - started),
             "generator_ceiling": generator, "login_ceiling": login_ceiling,
             "tls_login_ceilings": tls_ceilings,
             "results": results}, indent=2), encoding="utf-8")
        (args.results / "latest.txt").write_text(f"{machine}\n\n{text}\n", encoding="utf-8")
        bad = any(isinstance(r, dict) and r.get("verify_failures")
                  for s in results.values() for r in s.values())
        return 1 if bad else 0
    finally:
        stack.close()  # the baselines' worktrees go first, whatever happened
        if args.keep:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


_SERVERS = ("pop3d", "dovecot", "twisted", "twisted-tuned")


def default_loadgen_cpus() -> str:
    """The highest CPU this process may use: CPU 1 on a 2-CPU machine (shared with the
    second worker in the two-worker rows), one apart from CPUs 0-1 on a bigger one."""
    try:
        return str(max(os.sched_getaffinity(0)))
    except (AttributeError, OSError, ValueError):
        return "1"


def make_server(name: str, sdir: Path, args: argparse.Namespace, kind: str = "",
                tls: tuple[Path, Path] | None = None) -> servers.Server:
    """Server ``name`` for a pass: ``""`` (Maildir, POP3S too), ``"mbox"`` or ``"2w"``.

    ``pop3d@NAME`` is pop3d from the baseline tree ``args.trees[NAME]``.
    """
    port = servers.free_port()
    store = "mbox" if kind == "mbox" else "maildir"
    # two workers: the servers get both CPUs (on a 2-CPU machine the generator shares one)
    cpus = args.two_worker_cpus if kind == "2w" else args.server_cpus
    if name == "pop3d" or name.startswith("pop3d@"):
        label = name.partition("@")[2]
        return servers.Pop3d(sdir, port, cpus, workers="auto" if kind == "2w" else args.workers,
                             tls=tls if not kind else None, store=store,
                             src=args.trees[label] if label else None, label=label)
    if name == "dovecot":
        return servers.Dovecot(sdir, port, cpus, tls=tls if not kind else None, store=store)
    if name == "twisted":
        return servers.Twisted(sdir, port, args.server_cpus)
    if name == "twisted-tuned":
        return servers.TwistedTuned(sdir, port, args.server_cpus)
    raise SystemExit(f"bench: unknown server {name}")


if __name__ == "__main__":
    sys.exit(main())
