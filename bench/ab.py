"""A/B of pop3d source trees under the load generator, interleaved in one run.

    .venv/bin/python bench/ab.py --tree old=87b09bf --tree new=src \\
        --scenarios login,fetch --pairs 4 --slice 3

A tree is a git revision (checked out into a temporary worktree, removed afterwards) or a
folder holding the ``pop3d`` package.  Each tree's ``pop3d serve`` runs side by side
(``servers.Pop3d`` with its ``src``, as ``bench/run.py --baseline`` starts one), pinned to
the server CPU, over its own hard-linked copy of the bench data; the scenarios run in
slices, the trees taking turns (A B, B A, ...: ``run.Runner.run_servers``), so that the
shared machine's drift falls on both alike.  Prints each slice's rate, the server's CPU a
session/message, and each tree's ratio to the first one per pair (the figure to trust:
absolute rates move between runs).  ``bench/run.py --baseline`` gives the same turns inside
the whole table, beside Dovecot.
"""

from __future__ import annotations

import argparse
import contextlib
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


def tree_src(name: str, spec: str, work: Path, stack: contextlib.ExitStack) -> Path:
    """The ``src`` folder of tree ``spec``: a folder as given, else a git revision's."""
    if Path(spec).is_dir():
        return Path(spec).resolve()
    commit = servers.resolve_rev(spec)
    return stack.enter_context(servers.checkout(commit, work / f"tree-{name}"))


def slices(result: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    """Each slice's rate and the server's CPU µs a unit (session, message, MB) in it."""
    parts = result.get("slices") or [result]
    rates = [float(p.get(key) or 0.0) for p in parts]
    cpu = [float(p.get("server_cpu_util") or 0.0) / r * 1e6 if r else 0.0
           for p, r in zip(parts, rates, strict=True)]
    return rates, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True,
                    help="NAME=REV (a git revision) or NAME=SRC (a folder holding the pop3d "
                         "package); the first is the base")
    ap.add_argument("--scenarios", default="login,fetch")
    ap.add_argument("--pairs", type=int, default=4, help="rounds, trees taking turns (4)")
    ap.add_argument("--slice", type=float, default=3.0, help="seconds per slice (3)")
    ap.add_argument("--server-cpus", default="0")
    ap.add_argument("--loadgen-cpus", default=run.default_loadgen_cpus())
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--large-mib", type=int, default=20)
    args = ap.parse_args(argv)
    specs = [(n, s) for n, _, s in (t.partition("=") for t in args.tree)]
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(_RATE)
    if unknown:
        ap.error(f"unknown scenario(s) {sorted(unknown)}: {', '.join(_RATE)}")
    run.raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="pop3d-ab-", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            try:
                trees = [(n, tree_src(n, s, work, stack)) for n, s in specs]
            except servers.CheckoutError as exc:
                ap.error(str(exc))
            mkdata.build(work / "data", login_users=200, fetch_users=32, large_users=4,
                         dots_users=4, idle_users=1, storm_users=1,
                         storm_hash="{PLAIN}storm", large_size=args.large_mib << 20)
            ns = argparse.Namespace(loadgen_cpus=args.loadgen_cpus, progress=False,
                                    server_cpus=args.server_cpus, rounds=args.pairs,
                                    no_ceilings=True)
            plan = run.Plan(**{**run.QUICK.__dict__, "duration": args.slice * args.pairs})
            runner = run.Runner(ns, plan, work)
            under: dict[str, tuple[servers.Server, Path]] = {}
            for name, src in trees:
                sdir = work / name
                sdir.mkdir()
                subprocess.run(["cp", "-al", str(work / "data" / "mail"), str(sdir / "mail")],
                               check=True)
                for f in ("users", "manifest.json"):
                    shutil.copy(work / "data" / f, sdir / f)
                under[f"pop3d@{name}"] = (servers.Pop3d(sdir, servers.free_port(),
                                                        args.server_cpus, args.workers,
                                                        src=src, label=name), sdir)
            results = runner.run_servers(under, scenarios)
        base = f"pop3d@{trees[0][0]}"
        for scenario in scenarios:
            key = _RATE[scenario]
            print(f"\n{scenario} ({key}; server CPU µs per unit)")
            base_rates, _ = slices(results[base].get(scenario, {}), key)
            for name in under:
                got = results[name].get(scenario, {})
                if "n/a" in got:
                    print(f"  {name:16} n/a: {got['n/a']}")
                    continue
                rates, cpu = slices(got, key)
                ratios = [a / b for a, b in zip(rates, base_rates, strict=False) if b]
                print(f"  {name:16} " + " ".join(f"{x:9,.0f}" for x in rates)
                      + f"   cpu {statistics.median(cpu):8.1f}"
                      + (f"   /{base}: " + " ".join(f"{x:.3f}" for x in ratios)
                         + f"  median {statistics.median(ratios):.3f}"
                         if name != base and ratios else ""))
            sys.stdout.flush()
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
