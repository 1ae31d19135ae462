"""A/B of pop3d source trees on the PostgreSQL login: node CPU and statements per login.

    .venv/bin/python bench/cluster_ab.py --tree old=/tmp/old/src --tree new=src \\
        [--rounds 3] [--duration 5]

Starts a throwaway PostgreSQL with the bench's users and mail (as bench/cluster.py),
one pop3d node (or ``--nodes N``) per tree behind its own HAProxy (``PYTHONPATH`` picks
the tree), and runs ``pop3d bench login`` (32 clients) against each in turn, round after
round.  Each row gives the nodes' CPU per login (their workers' user and system time
apart) and the database statements per login (``pg_stat_statements``): per-unit
figures that a shared machine moves less than sessions/s.
``git archive HEAD src | tar -x -C /tmp/old`` makes the old tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from tests.pgserver import start_or_skip  # noqa: E402

import cluster  # noqa: E402
import mkdata  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def _worker_times(supervisor: int) -> tuple[float, float]:
    """User and system CPU seconds of the node's first worker."""
    kid = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()[0]
    fields = Path(f"/proc/{kid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def main() -> int:
    """Run the rounds; print one JSON row per (round, tree) and the medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=SRC_FOLDER")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--nodes", type=int, default=1, help="nodes per tree behind HAProxy")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    work = Path(tempfile.mkdtemp(prefix="pop3d-bench-pgab-"))
    ds = mkdata.build(work, login_users=200, fetch_users=2, large_users=0, idle_users=0,
                      storm_users=0, storm_hash="{PLAIN}x", large_size=1)
    pg = start_or_skip(preload=("pg_stat_statements",))
    setups: dict[str, cluster.Nodes] = {}
    try:
        url = pg.create_database("pop3d")
        config = work / "load.toml"
        config.write_text(f'[auth]\nbackend = "postgresql"\n[storage]\nbackend = '
                          f'"postgresql"\n[database]\nurl = "{url}"\n')
        cluster.load_data(url, work, ds.users, config)
        for name, src in trees.items():
            os.environ["PYTHONPATH"] = str(Path(src).resolve())
            try:
                setups[name] = cluster.Nodes(work, url, args.nodes, None)
            finally:
                del os.environ["PYTHONPATH"]
        opts = argparse.Namespace(loadgen_cpus=None, login_users=200, duration=1.0)
        for setup in setups.values():  # warm-up: pools, prepared statements
            cluster.run_login(setup.front, opts, work)
        opts.duration = args.duration
        per: dict[str, list[dict[str, Any]]] = {name: [] for name in setups}
        for round_ in range(args.rounds):
            for name, setup in setups.items():
                supervisors = [p.pid for p in setup.procs[:-1]]  # the last is HAProxy
                cluster.reset_statements(url)
                user0, sys0 = map(sum, zip(*map(_worker_times, supervisors), strict=True))
                before = cluster.tree_cpu(supervisors)
                out = cluster.run_login(setup.front, opts, work)
                cpu = cluster.tree_cpu(supervisors) - before
                user1, sys1 = map(sum, zip(*map(_worker_times, supervisors), strict=True))
                n = int(out.get("sessions", 0)) or 1
                row = {"round": round_, "tree": name, "sessions": out.get("sessions"),
                       "failures": out.get("failures"),
                       "cpu_us_per_login": round(cpu / n * 1e6),
                       "user_us": round((user1 - user0) / n * 1e6),
                       "sys_us": round((sys1 - sys0) / n * 1e6),
                       "db_statements_per_login": round(cluster.statements(url) / n, 2)}
                per[name].append(row)
                print(json.dumps(row), flush=True)
        for name, rows in per.items():
            values = sorted(r["cpu_us_per_login"] for r in rows)
            print(json.dumps({"summary": name, "median_cpu_us_per_login":
                              values[len(values) // 2], "all": values}), flush=True)
    finally:
        for setup in setups.values():
            setup.stop()
        pg.destroy()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
