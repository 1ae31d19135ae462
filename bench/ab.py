"""A/B of pop3d source trees under the load generator, interleaved in one run.

    git archive 87b09bf src | tar -x -C /tmp/old
    .venv/bin/python bench/ab.py --tree old=/tmp/old/src --tree new=src \\
        --scenarios login,fetch --pairs 4 --slice 3

Each tree's ``pop3d serve`` runs side by side (PYTHONPATH pointing at the tree), pinned to
the server CPU, over its own hard-linked copy of the bench data; the scenarios run in
slices, the trees taking turns (A B, B A, ...), so that the shared machine's drift falls on
both alike.  Prints each slice's rate, the server's CPU a session/message, and each tree's
ratio to the first one per pair (the figure to trust: absolute rates move between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import mkdata
import run
import servers

_RATE = {"login": "sessions_per_s", "fetch": "messages_per_s", "retr-large": "mb_per_s",
         "retr-dots": "mb_per_s", "retr-alldots": "mb_per_s"}


class TreePop3d(servers.Pop3d):
    """``pop3d serve`` with ``src`` first on its PYTHONPATH."""

    def __init__(self, work: Path, port: int, cpus: str, src: Path, workers: int) -> None:
        super().__init__(work, port, cpus, workers=workers)
        self.src = src

    def start(self) -> bool:
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(self.src)
        try:
            return super().start()
        finally:
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True,
                    help="NAME=SRC (a folder holding the pop3d package); the first is the base")
    ap.add_argument("--scenarios", default="login,fetch")
    ap.add_argument("--pairs", type=int, default=4, help="rounds, trees taking turns (4)")
    ap.add_argument("--slice", type=float, default=3.0, help="seconds per slice (3)")
    ap.add_argument("--server-cpus", default="0")
    ap.add_argument("--loadgen-cpus", default="1")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--large-mib", type=int, default=20)
    args = ap.parse_args(argv)
    trees = [(n, Path(s).resolve()) for n, _, s in (t.partition("=") for t in args.tree)]
    scenarios = [s for s in args.scenarios.split(",") if s]
    run.raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="pop3d-ab-", dir="/tmp"))
    live: list[servers.Server] = []
    try:
        mkdata.build(work / "data", login_users=200, fetch_users=32, large_users=4, dots_users=4,
                     idle_users=1, storm_users=1, storm_hash="{PLAIN}storm",
                     large_size=args.large_mib << 20)
        ns = argparse.Namespace(loadgen_cpus=args.loadgen_cpus, server_cpus=args.server_cpus,
                                progress=False, scenarios=scenarios, rounds=1)
        runner = run.Runner(ns, run.QUICK, work)
        under: list[tuple[str, servers.Server, Path]] = []
        for name, src in trees:
            sdir = work / name
            sdir.mkdir()
            subprocess.run(["cp", "-al", str(work / "data" / "mail"), str(sdir / "mail")],
                           check=True)
            for f in ("users", "manifest.json"):
                shutil.copy(work / "data" / f, sdir / f)
            srv = TreePop3d(sdir, servers.free_port(), args.server_cpus, src, args.workers)
            if not srv.start():
                raise SystemExit(f"ab: {name}: {srv.error}")
            live.append(srv)
            under.append((name, srv, sdir))
            runner.warm_up(sdir, srv.port, scenarios)
        for scenario in scenarios:
            opt = runner.scenario_opts(scenario)
            opt["duration"] = args.slice
            rates: dict[str, list[float]] = {n: [] for n, _ in trees}
            cpu: dict[str, list[float]] = {n: [] for n, _ in trees}
            for r in range(args.pairs):
                order = under if r % 2 == 0 else under[::-1]
                for name, srv, sdir in order:
                    out: dict[str, Any] = runner.measure(srv, sdir, scenario, dict(opt))
                    if out.get("verify_failures") or out.get("failures"):
                        print(f"ab: {name} {scenario}: failures {json.dumps(out)[:300]}",
                              file=sys.stderr)
                    rate = float(out.get(_RATE[scenario], 0.0))
                    rates[name].append(rate)
                    units = rate * float(out.get("elapsed_s", 0) or 0)
                    cpu[name].append(out["server_cpu_s"] / units * 1e6 if units else 0.0)
            base = trees[0][0]
            print(f"\n{scenario} ({_RATE[scenario]}; server CPU µs per unit)")
            for name, _ in trees:
                ratios = [a / b for a, b in zip(rates[name], rates[base], strict=True) if b]
                print(f"  {name:10} " + " ".join(f"{x:9,.0f}" for x in rates[name])
                      + f"   cpu {statistics.median(cpu[name]):8.1f}"
                      + (f"   /{base}: " + " ".join(f"{x:.3f}" for x in ratios)
                         + f"  median {statistics.median(ratios):.3f}" if name != base else ""))
            sys.stdout.flush()
        return 0
    finally:
        for srv in live:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
