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
PostgreSQL and the load generator on separate cores (``--loadgen-cpus``).

``--versus-dovecot`` runs ``login`` and ``fetch`` (``--scenarios``) in interleaved
rounds: through HAProxy (PROXY v2) to 1, 2 and 3 nodes, then straight to Dovecot 2.3
whose ``passdb { driver = sql }`` (Debian's ``dovecot-pgsql``) reads the very same
``users`` rows, and its mail from the Maildirs the PostgreSQL store was imported from:
the same messages, each RETR checked against the same manifest (size and CRC of the
stuffed body; UIDLs for form and uniqueness, the manifest having none).  Each row gives
the server side's CPU seconds (the nodes' processes, or Dovecot's master and all its
children) and logins (or messages) per CPU second: on a shared machine that per-core
figure compares, where sessions/s swings.  Both sides are counted alike: every process
of the server, those that exited during the round included (Dovecot's per-session
``pop3``, and its auth, anvil, log, config and stats processes; pop3d's supervisors and
workers), and both log each session (the nodes run at INFO, pop3d's default, as Dovecot
logs its logins).  HAProxy (pop3d's side only) is not counted; PostgreSQL's CPU per
login (or message) is a column of its own.  The summary gives each round's ratio
against the Dovecot row of the same round.  ``--concurrency`` sets the login clients
(32) and ``--fetch-concurrency`` the fetch clients (16, at most one a fetch user: a
second session on a maildrop gets ``[IN-USE]``), shared by the nodes: each of 3 nodes
sees a third of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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


def load_data(url: str, work: Path, users: dict[str, str], config: Path) -> None:
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

    def __init__(self, work: Path, url: str, count: int, cpus: str | None,
                 log_level: str = "WARNING") -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        template = string.Template((DEPLOY / "pop3d" / "node.toml").read_text())
        pop3, lmtp = [], []
        for i in range(count):
            p, lm = free_port(), free_port()
            cfg = work / f"node{count}-{i}.toml"
            cfg.write_text(template.substitute(
                POP3_LISTEN=f"127.0.0.1:{p}", LMTP_LISTEN=f"127.0.0.1:{lm}", DATABASE_URL=url,
                LOCK_TTL=30, DB_TIMEOUT=5, PROXY_FROM="127.0.0.2/32"))  # fmt: skip
            pin = ["taskset", "-c", cpus] if cpus else []
            log = (work / f"node{count}-{i}.log").open("ab")
            self.procs.append(subprocess.Popen(
                [*pin, PY, "-m", "pop3d", "serve", "--config", str(cfg), "--log-level",
                 log_level], stdout=log, stderr=log))  # fmt: skip
            pop3.append(p)
            lmtp.append(lm)
        for p in pop3:
            _wait(p)
        self.front = free_port()
        env = {"POP3D_FRONT": f"127.0.0.1:{self.front}",
               "POP3D_LMTP_FRONT": f"127.0.0.1:{free_port()}",
               "POP3D_SOURCE": "127.0.0.2"}
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


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root_pids: list[int]) -> float:
    """CPU seconds of the process trees under ``root_pids``: each live process's own
    user+system time, plus what the roots' reaped children used (Dovecot's per-session
    processes that have exited)."""
    stats: dict[int, tuple[int, list[str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), fields)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total = 0
    todo = list(root_pids)
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        fields = stats[pid][1]
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        todo += children.get(pid, [])
    return total / _TICK


class Dovecot:
    """Dovecot 2.3 with passdb { driver = sql } (dovecot-pgsql) on the same database."""

    def __init__(self, work: Path, pg: Any, cpus: str | None, reuse: int = 1) -> None:
        """``reuse``: sessions a ``pop3`` process serves (its ``service_count``); 1 is
        Dovecot's default, a process a session; more reuses a process for the next
        session of the same uid (every user here), Dovecot's tuning for virtual users."""
        self.root = work / ("dovecot" if reuse == 1 else f"dovecot-reuse{reuse}")
        self.root.mkdir()
        work.chmod(0o711)  # mkdtemp's 0700: Dovecot's mail processes run as "dovecot"
        (self.root / "run").mkdir()
        (self.root / "state").mkdir()
        self.port = free_port()
        sql = self.root / "dovecot-sql.conf.ext"
        # The same users table and rows pop3d reads (its {SCHEME} prefix is Dovecot's).
        sql.write_text(
            f"driver = pgsql\n"
            f"connect = host={pg.socket_dir} port={pg.port} dbname=pop3d user={pg.user}\n"
            "default_pass_scheme = PLAIN\n"
            "password_query = SELECT username AS user, password FROM users "
            "WHERE username = '%u'\n")
        # The bench's Maildirs (already copied into PostgreSQL for pop3d): same messages,
        # checked by the same manifest.  Dovecot's mail processes run as "dovecot".
        mail = work / "mail"
        subprocess.run(["chown", "-R", "dovecot:dovecot", str(mail)], check=True)
        conf = self.root / "dovecot.conf"
        conf.write_text(f"""
protocols = pop3
listen = 127.0.0.1
base_dir = {self.root}/run
state_dir = {self.root}/state
instance_name = popbench-pg-{self.port}
log_path = {self.root}/dovecot.log
default_internal_user = root
default_internal_group = root
default_login_user = dovenull
first_valid_uid = 0
first_valid_gid = 0
default_process_limit = 2000
default_client_limit = 4000
mail_max_userip_connections = 100000
auth_failure_delay = 0
disable_plaintext_auth = no
auth_mechanisms = plain login
ssl = no
passdb {{
  driver = sql
  args = {sql}
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={mail}/%u
}}
mail_location = maildir:~/Maildir
pop3_uidl_format = %08Xu%08Xv
pop3_lock_session = yes
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
  service_count = 0
  process_min_avail = 2
}}
service pop3 {{
  service_count = {reuse}
  process_min_avail = {0 if reuse == 1 else 4}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")
        pin = ["taskset", "-c", cpus] if cpus else []
        dovecot = shutil.which("dovecot") or "/usr/sbin/dovecot"
        subprocess.run([*pin, dovecot, "-c", str(conf)], check=True)
        _wait(self.port)
        pidfile = self.root / "run" / "master.pid"
        for _ in range(100):
            if pidfile.exists():
                break
            time.sleep(0.1)
        self.pid = int(pidfile.read_text().split()[0])

    def stop(self) -> None:
        """Stop the master (it stops its children); its errors go to stderr."""
        with contextlib.suppress(OSError):
            errors = [line for line in (self.root / "dovecot.log").read_text().splitlines()
                      if "Error" in line or "Fatal" in line]
            if errors:
                print(f"dovecot: {len(errors)} errors, last: {errors[-1]}", file=sys.stderr)
        with contextlib.suppress(OSError):
            os.kill(self.pid, 15)
        for _ in range(100):
            if not Path(f"/proc/{self.pid}").exists():
                return
            time.sleep(0.1)


def statements(url: str) -> int:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                           "WHERE query NOT LIKE '%%pg_stat_statements%%'").fetchone()
        return int(row[0]) if row else 0


def reset_statements(url: str) -> None:
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
    ap.add_argument("--versus-dovecot", action="store_true",
                    help="interleaved rounds: pop3d through HAProxy to each node count, "
                         "and Dovecot with its pgsql passdb on the same users and messages")
    ap.add_argument("--scenarios", default="login,fetch",
                    help="with --versus-dovecot: login, fetch or both (login,fetch)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    ap.add_argument("--dovecot-reuse", type=int, default=1, metavar="N",
                    help="also run a Dovecot whose pop3 processes serve N sessions each "
                         "(service_count; 1, Dovecot's default, runs none)")
    ap.add_argument("--concurrency", type=int, default=32,
                    help="login clients, shared by the nodes (32)")
    ap.add_argument("--fetch-concurrency", type=int, default=16,
                    help="fetch clients, at most one a fetch user (16)")
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
        load_data(url, work, ds.users, config)
        if args.versus_dovecot:
            _versus_dovecot(args, work, pg, url)
            return 0
        for count in (int(n) for n in args.nodes.split(",")):
            nodes = Nodes(work, url, count, args.node_cpus)
            try:
                for scenario in ("login", "fetch"):
                    reset_statements(url)
                    out = run_load(scenario, nodes.front, args, work)
                    sessions = int(out.get("sessions", 0)) or 1
                    rows.append({"nodes": count, "scenario": scenario, **{
                        k: out.get(k) for k in ("sessions_per_s", "messages_per_s",
                                                "failures", "verify_failures")},
                        "p99_ms": (out.get("latency") or {}).get("p99_ms"),
                        "errors": out.get("errors"),
                        "db_statements_per_session": round(statements(url) / sessions, 2)})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                nodes.stop()
    finally:
        pg.destroy()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _load(scenario: str, args: argparse.Namespace) -> tuple[str, int, int]:
    """Users pattern, user count and clients of ``scenario``: fetch gets at most one
    client a user, as two sessions on one maildrop would get ``[IN-USE]``."""
    if scenario == "login":
        return "login%d", args.login_users, getattr(args, "concurrency", 32)
    return ("fetch%d", args.fetch_users,
            max(1, min(getattr(args, "fetch_concurrency", 16), args.fetch_users)))


def run_load(scenario: str, port: int, args: argparse.Namespace, work: Path,
             count: int | None = None) -> dict[str, Any]:
    """``pop3d bench SCENARIO`` against ``port`` for ``args.duration`` seconds (or
    ``count`` sessions), every message checked against the manifest; its JSON."""
    users, user_count, clients = _load(scenario, args)
    pin = ["taskset", "-c", args.loadgen_cpus] if args.loadgen_cpus else []
    length = (["--count", str(count), "--timeout", "300"] if count
              else ["--duration", str(args.duration)])
    res = subprocess.run(
        [*pin, PY, "-m", "pop3d.bench", scenario, "-p", str(port),
         "--manifest", str(work / "manifest.json"), "--json", "--users", users,
         "--user-count", str(user_count), "--password", "pw-%u",
         "--concurrency", str(clients), *length],
        capture_output=True, text=True, check=False)  # fmt: skip
    out: dict[str, Any] = json.loads(res.stdout) if res.stdout.strip() else {}
    return out


def run_login(port: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    return run_load("login", port, args, work)


#: What a row counts per CPU second in each scenario, and the name of that unit.
_UNIT = {"login": "login", "fetch": "message"}


def _versus_dovecot(args: argparse.Namespace, work: Path, pg: Any, url: str) -> None:
    """Interleaved rounds of each scenario: pop3d (1, 2, 3 nodes) and Dovecot, same users
    table, same messages (pop3d's in PostgreSQL, Dovecot's in the Maildirs they came from).

    Each row gives the server side's CPU seconds (every process of the nodes, or of
    Dovecot's master and children; HAProxy and PostgreSQL not included) and the logins
    (or messages) per CPU second, the per-core figure that a shared, noisy machine can
    still compare.
    """
    counts = [int(n) for n in args.nodes.split(",")]
    scenarios = [s for s in args.scenarios.split(",") if s]
    if unknown := set(scenarios) - set(_UNIT):
        raise SystemExit(f"--scenarios: unknown {', '.join(sorted(unknown))}")
    setups: dict[int, Nodes] = {}
    dovecots: list[Dovecot] = []
    per: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        for n in counts:
            # INFO, pop3d's default: one line per session, as Dovecot logs its two.
            setups[n] = Nodes(work, url, n, args.node_cpus, log_level="INFO")
        dovecots.append(Dovecot(work, pg, args.node_cpus))
        targets: list[tuple[str, int, list[int]]] = [
            (f"pop3d-{n}-node", setups[n].front, [p.pid for p in setups[n].procs[:-1]])
            for n in counts
        ] + [("dovecot-pgsql", dovecots[0].port, [dovecots[0].pid])]
        if args.dovecot_reuse > 1:
            dovecots.append(Dovecot(work, pg, args.node_cpus, reuse=args.dovecot_reuse))
            targets.append((f"dovecot-pgsql-reuse{args.dovecot_reuse}", dovecots[1].port,
                            [dovecots[1].pid]))
        # PostgreSQL's CPU (postmaster and backends), shown apart: not a server core of
        # either side, but each side's statements cost it.
        postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
        for _name, port, _ in targets:
            # Warm-up: pools, Dovecot's login processes, and one pass over every fetch
            # mailbox so that Dovecot's indexes and uidlists exist before the rounds.
            for scenario in scenarios:
                count = args.fetch_users if scenario == "fetch" else None
                run_load(scenario, port, argparse.Namespace(**{**vars(args), "duration": 1.0}),
                         work, count=count)
        for round_ in range(args.rounds):
            for scenario in scenarios:
                unit = _UNIT[scenario]
                for name, port, pids in targets:
                    reset_statements(url)
                    before, db_before = tree_cpu(pids), tree_cpu([postmaster])
                    out = run_load(scenario, port, args, work)
                    cpu = tree_cpu(pids) - before
                    db_cpu = tree_cpu([postmaster]) - db_before
                    sessions = int(out.get("sessions", 0))
                    units = sessions if scenario == "login" else int(out.get("messages", 0))
                    row: dict[str, Any] = {
                        "round": round_, "scenario": scenario, "server": name,
                        "sessions_per_s": out.get("sessions_per_s")}
                    if scenario == "fetch":
                        row.update(messages_per_s=out.get("messages_per_s"),
                                   verified=out.get("verified"),
                                   verify_failures=out.get("verify_failures"))
                    row.update({
                        "failures": out.get("failures"), "errors": out.get("errors"),
                        "server_cpu_s": round(cpu, 2),
                        f"{unit}s_per_cpu_s": round(units / cpu, 1) if cpu else None,
                        ("db_statements_per_login" if scenario == "login"
                         else "db_statements_per_session"):
                            round(statements(url) / (sessions or 1), 2),
                        f"db_cpu_us_per_{unit}": round(db_cpu / (units or 1) * 1e6)})
                    per.setdefault((scenario, name), []).append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for dovecot in dovecots:
            dovecot.stop()
        for setup in setups.values():
            setup.stop()
    _summary(per, scenarios, [name for name, _, _ in targets], args.dovecot_reuse)


def _summary(per: dict[tuple[str, str], list[dict[str, Any]]], scenarios: list[str],
             names: list[str], reuse_n: int) -> None:
    """A line per (scenario, server): medians, and the per-CPU ratio against Dovecot."""

    def median(values: list[float]) -> float:
        values = sorted(values)
        return values[len(values) // 2]

    def column(scenario: str, name: str, key: str) -> list[float]:
        return [float(r[key] or 0) for r in per.get((scenario, name), [])]

    reuse = f"dovecot-pgsql-reuse{reuse_n}"
    for scenario in scenarios:
        key = f"{_UNIT[scenario]}s_per_cpu_s"
        # Each round's ratio against the Dovecot row of the same round (the same load on
        # the machine, within seconds): their spread, beside the ratio of the medians.
        base = median(column(scenario, "dovecot-pgsql", key)) or 1.0
        for name in names:
            mine = column(scenario, name, key)
            ratios = sorted(round(p / b, 2) for p, b in zip(
                mine, column(scenario, "dovecot-pgsql", key), strict=True) if b)
            line: dict[str, Any] = {
                "summary": name, "scenario": scenario,
                "median_sessions_per_s": median(column(scenario, name, "sessions_per_s"))}
            if scenario == "fetch":
                line["median_messages_per_s"] = median(column(scenario, name,
                                                              "messages_per_s"))
            line.update({f"median_{key}": median(mine),
                         "per_cpu_ratio_vs_dovecot": round(median(mine) / base, 2),
                         "round_ratios": ratios})
            if (scenario, reuse) in per:
                line["per_cpu_ratio_vs_dovecot_reuse"] = round(
                    median(mine) / (median(column(scenario, reuse, key)) or 1.0), 2)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
