"""PostgreSQL scenario: login and fetch through HAProxy to 1, 2 and 3 pop3d nodes.

    .venv/bin/python bench/cluster.py [--nodes 1,2,3] [--duration 5] [--login-users 200]

Builds the bench data (bench/mkdata.py: the `login` and `fetch` groups), starts a
throwaway PostgreSQL (tests/pgserver.py), creates the schema with ``pop3d db init``, loads
the users into its ``users`` table and their Maildirs with ``pop3d import``, then for each
node count starts that many ``pop3d serve`` nodes from deploy/pop3d/node.toml behind
HAProxy from deploy/haproxy/haproxy.cfg and runs ``pop3d bench login`` and ``fetch``
through HAProxy, every byte checked against the manifest.  Each row also gives the
database statements per session, counted by ``pg_stat_statements``.

The figures mean something only on an otherwise idle machine with the nodes, HAProxy,
PostgreSQL and the load generator on separate cores (``--loadgen-cpus``); the Dovecot
``pgsql`` comparison of issue 17 is not part of this script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from tests.haproxy import start_haproxy  # noqa: E402
from tests.pgserver import start_or_skip  # noqa: E402

import mkdata  # noqa: E402
from pop3d.testing import free_port, wait_for_port  # noqa: E402

DEPLOY = REPO / "deploy"
PY = sys.executable


def _wait(port: int) -> None:
    wait_for_port("127.0.0.1", port, 30.0, expect=b"")


def _pop3d(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run([PY, "-m", "pop3d", *args], input=stdin, text=True,
                          capture_output=True, check=False)
    if done.returncode:
        raise SystemExit(f"pop3d {' '.join(args)}: {done.stderr.strip()}")


def _load(url: str, work: Path, users: dict[str, str], config: Path) -> None:
    import psycopg  # noqa: PLC0415

    _pop3d("db", "init", "--config", str(config))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        with conn.cursor().copy("COPY users (username, password) FROM STDIN") as copy:
            for name, password in users.items():
                copy.write_row((name, password))
    subprocess.run([PY, "-m", "pop3d", "import", "--config", str(config), "--maildir",
                    "mail/%u/Maildir", "--all-users"], cwd=work, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Nodes:
    """N pop3d nodes and HAProxy in front."""

    def __init__(self, work: Path, url: str, count: int, cpus: str | None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        template = string.Template((DEPLOY / "pop3d" / "node.toml").read_text())
        pop3, lmtp = [], []
        for i in range(count):
            p, lm = free_port(), free_port()
            cfg = work / f"node{i}.toml"
            cfg.write_text(template.substitute(
                POP3_LISTEN=f"127.0.0.1:{p}", LMTP_LISTEN=f"127.0.0.1:{lm}", DATABASE_URL=url,
                LOCK_TTL=30, DB_TIMEOUT=5))  # fmt: skip
            pin = ["taskset", "-c", cpus] if cpus else []
            log = (work / f"node{i}.log").open("ab")
            self.procs.append(subprocess.Popen(
                [*pin, PY, "-m", "pop3d", "serve", "--config", str(cfg), "--log-level",
                 "WARNING"], stdout=log, stderr=log))  # fmt: skip
            pop3.append(p)
            lmtp.append(lm)
        for p in pop3:
            _wait(p)
        self.front = free_port()
        lmtp_front = free_port()
        env = {"POP3D_FRONT": f"127.0.0.1:{self.front}",
               "POP3D_LMTP_FRONT": f"127.0.0.1:{lmtp_front}"}
        for i in range(3):  # fewer nodes than server lines: the lines repeat the nodes
            env[f"POP3D_NODE{i + 1}"] = f"127.0.0.1:{pop3[i % count]}"
            env[f"POP3D_LMTP{i + 1}"] = f"127.0.0.1:{lmtp[i % count]}"
        self.procs.append(start_haproxy(
            DEPLOY / "haproxy" / "haproxy.cfg", env, work / "haproxy.log", [self.front]))
        time.sleep(1.5)

    def stop(self) -> None:
        """Stop HAProxy and the nodes."""
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _statements(url: str) -> int:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                           "WHERE query NOT LIKE '%%pg_stat_statements%%'").fetchone()
        return int(row[0]) if row else 0


def _reset(url: str) -> None:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def main() -> int:
    """Run the scenario; print one row per (nodes, scenario)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="1,2,3", help="node counts to run (1,2,3)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per scenario (5)")
    ap.add_argument("--login-users", type=int, default=200)
    ap.add_argument("--fetch-users", type=int, default=64)
    ap.add_argument("--node-cpus", help="taskset CPU list for the nodes")
    ap.add_argument("--loadgen-cpus", help="taskset CPU list for the load generator")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pop3d-bench-pg-"))
    ds = mkdata.build(work, login_users=args.login_users, fetch_users=args.fetch_users,
                      large_users=0, idle_users=0, storm_users=0, storm_hash="{PLAIN}x",
                      large_size=1)
    pg = start_or_skip(preload=("pg_stat_statements",))
    rows: list[dict[str, Any]] = []
    try:
        url = pg.create_database("pop3d")
        config = work / "load.toml"
        config.write_text(f'[auth]\nbackend = "postgresql"\n[storage]\nbackend = "postgresql"\n'
                          f'[database]\nurl = "{url}"\n')
        _load(url, work, ds.users, config)
        for count in (int(n) for n in args.nodes.split(",")):
            nodes = Nodes(work, url, count, args.node_cpus)
            try:
                for scenario, users, conc in (("login", ("login%d", args.login_users), 32),
                                              ("fetch", ("fetch%d", args.fetch_users), 16)):
                    _reset(url)
                    pin = ["taskset", "-c", args.loadgen_cpus] if args.loadgen_cpus else []
                    res = subprocess.run(
                        [*pin, PY, "-m", "pop3d.bench", scenario, "-p", str(nodes.front),
                         "--manifest", str(work / "manifest.json"), "--json",
                         "--users", users[0], "--user-count", str(users[1]),
                         "--password", "pw-%u", "--concurrency", str(conc),
                         "--duration", str(args.duration)],
                        capture_output=True, text=True, check=False)  # fmt: skip
                    out = json.loads(res.stdout) if res.stdout.strip() else {}
                    sessions = int(out.get("sessions", 0)) or 1
                    rows.append({"nodes": count, "scenario": scenario, **{
                        k: out.get(k) for k in ("sessions_per_s", "messages_per_s",
                                                "failures", "verify_failures")},
                        "p99_ms": (out.get("latency") or {}).get("p99_ms"),
                        "errors": out.get("errors"),
                        "db_statements_per_session": round(_statements(url) / sessions, 2)})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                nodes.stop()
    finally:
        pg.destroy()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
