"""Start the cluster of deploy/: a throwaway PostgreSQL, three ``pop3d serve`` nodes, HAProxy.

Every configuration comes from deploy/ (templated addresses), so the files operators
copy are the files tested.  All servers listen on 127.0.0.1 only, on free ports.
"""

from __future__ import annotations

import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pop3d.testing import LOOPBACK, free_port, wait_for_port
from tests.haproxy import haproxy_binary, start_haproxy, wait_servers_up
from tests.pgserver import PgServer, start_or_skip

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: Seconds a maildrop lease outlives its node's last heartbeat, in the suite.
LOCK_TTL = 5.0
#: [database] timeout of the nodes.
DB_TIMEOUT = 1.0
#: HAProxy's address towards the nodes (POP3D_SOURCE), their proxy_protocol_from; the
#: tests connect to the nodes directly from 127.0.0.1, which sends no header.
PROXY_SOURCE = "127.0.0.2"
#: A user every node can log in as, to see that it works (cheap {PLAIN} password).
PROBE_USER, PROBE_PASSWORD = "probe", "probe-pw"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=2):
            return True
    except OSError:
        return False


def wait_port(port: int) -> None:
    """Wait until something accepts on 127.0.0.1:``port`` (a node, or HAProxy)."""
    wait_for_port(LOOPBACK, port, 20.0, expect=b"")


def pop3d(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``pop3d`` command line."""
    return subprocess.run(
        [sys.executable, "-m", "pop3d", *args], input=stdin, capture_output=True, text=True,
        check=False, timeout=60,
    )  # fmt: skip


@dataclass
class Node:
    """One ``pop3d serve`` process."""

    name: str
    config: Path
    pop3_port: int
    lmtp_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the node and wait until it listens."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pop3d", "serve", "--config", str(self.config)],
                stdout=log, stderr=log,
            )  # fmt: skip
        wait_port(self.pop3_port)
        wait_port(self.lmtp_port)

    def kill(self) -> None:
        """SIGKILL the node (a crash: nothing is cleaned up).

        Returns once its worker is gone too: the kernel kills the worker when the
        supervisor dies, but on a busy machine it may still accept for a moment, and a
        ``start`` right after would take that for the new node listening.
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        for _ in range(200):  # bounded: 20 s
            if not _accepts(self.pop3_port) and not _accepts(self.lmtp_port):
                return
            time.sleep(0.1)
        raise AssertionError("the killed node's worker still accepts")

    def stop(self) -> None:
        """SIGTERM the node and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Cluster:
    """PostgreSQL + three nodes + HAProxy, and how to reach them."""

    pg: PgServer
    url: str
    root: Path
    nodes: list[Node]
    front_port: int
    lmtp_front_port: int
    haproxy: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: HAProxy's POP3 front per PROXY variant: send-proxy-v2 (front_port), send-proxy,
    #: send-proxy-v2-ssl (TLS ended at HAProxy).
    fronts: dict[str, int] = field(default_factory=dict)
    proxies: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: The PostgreSQL process the nodes' pools were last seen working with.
    settled_pg: object = None

    def node_config(self) -> Path:
        """A node's config file (any node's: they share users and mail)."""
        return self.nodes[0].config

    def settle(self) -> None:
        """After PostgreSQL restarted: wait until every node's pool works again.

        A node's idle connections broke with the server; each node answers a login of
        the probe user once its pool has replaced them (bounded).
        """
        import poplib  # noqa: PLC0415

        for node in self.nodes:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client = poplib.POP3(LOOPBACK, node.pop3_port, timeout=20)
                    try:
                        client.user(PROBE_USER)
                        client.pass_(PROBE_PASSWORD)
                        client.quit()
                    finally:
                        client.close()
                    break
                except (poplib.error_proto, OSError):
                    assert time.monotonic() < deadline, f"{node.name} did not recover"
                    time.sleep(0.1)
        self.settled_pg = self.pg._proc

    def ensure_nodes(self) -> None:
        """Restart any node a test killed; wait until HAProxy sees all of them."""
        restarted = False
        for node in self.nodes:
            if not node.alive():
                node.start()
                restarted = True
        if restarted:
            self.wait_proxies()

    def wait_proxies(self) -> None:
        """Wait until every HAProxy's health checks have found every node up."""
        for send_proxy in self.fronts:
            if send_proxy != "send-proxy-v2-ssl":  # a backend of the send-proxy-v2 HAProxy
                wait_servers_up(stats_socket(self.root, send_proxy))


def stats_socket(root: Path, send_proxy: str) -> Path:
    """The stats socket of the HAProxy sending ``send_proxy`` headers."""
    return root / f"haproxy-{send_proxy}.sock"


def _start_haproxy(cluster: Cluster, send_proxy: str, front: int, lmtp_front: int,
                   offload: tuple[int, Path] | None = None) -> subprocess.Popen[bytes]:
    """One HAProxy from deploy/haproxy/haproxy.cfg, sending ``send_proxy`` headers."""
    if haproxy_binary() is None:
        pytest.skip("haproxy is not installed (scripts/setup.sh installs it)")
    env = {
        "POP3D_FRONT": f"127.0.0.1:{front}",
        "POP3D_LMTP_FRONT": f"127.0.0.1:{lmtp_front}",
        "POP3D_SOURCE": PROXY_SOURCE,
        "POP3D_SEND_PROXY": send_proxy,
    }
    if offload is not None:
        env["POP3D_OFFLOAD"] = f"127.0.0.1:{offload[0]}"
        env["POP3D_CERT"] = str(offload[1])
    for i, node in enumerate(cluster.nodes, start=1):
        env[f"POP3D_NODE{i}"] = f"127.0.0.1:{node.pop3_port}"
        env[f"POP3D_LMTP{i}"] = f"127.0.0.1:{node.lmtp_port}"
    return start_haproxy(
        DEPLOY / "haproxy" / "haproxy.cfg", env, cluster.root / f"haproxy-{send_proxy}.log",
        [front], stats=stats_socket(cluster.root, send_proxy),
    )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The running cluster, its schema created with ``pop3d db init``."""
    pg = start_or_skip(preload=("pg_stat_statements",))
    root = tmp_path_factory.mktemp("cluster")
    try:
        url = pg.create_database("pop3d")
        nodes = []
        template = string.Template((DEPLOY / "pop3d" / "node.toml").read_text())
        for i in range(1, 4):
            pop3_port, lmtp_port = free_port(), free_port()
            config = root / f"node{i}.toml"
            config.write_text(template.substitute(
                POP3_LISTEN=f"127.0.0.1:{pop3_port}", LMTP_LISTEN=f"127.0.0.1:{lmtp_port}",
                DATABASE_URL=url, LOCK_TTL=LOCK_TTL, DB_TIMEOUT=DB_TIMEOUT,
                PROXY_FROM=f"{PROXY_SOURCE}/32",
            ))  # fmt: skip
            nodes.append(Node(f"node{i}", config, pop3_port, lmtp_port, root / f"node{i}.log"))
        init = pop3d("db", "init", "--config", str(nodes[0].config))
        assert init.returncode == 0, init.stderr
        import psycopg  # noqa: PLC0415

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("INSERT INTO users (username, password) VALUES (%s, %s)",
                         (PROBE_USER, "{PLAIN}" + PROBE_PASSWORD))
            conn.execute("INSERT INTO mailboxes (name) VALUES (%s)", (PROBE_USER,))
        cluster = Cluster(pg, url, root, nodes, free_port(), free_port())
        for node in nodes:
            node.start()
        from tests.integration.tls_support import make_pki  # noqa: PLC0415

        cert, key = make_pki(root / "pki").issue("haproxy", "localhost")
        pem = root / "haproxy.pem"
        pem.write_bytes(cert.read_bytes() + key.read_bytes())
        offload = free_port()
        cluster.haproxy = _start_haproxy(cluster, "send-proxy-v2", cluster.front_port,
                                         cluster.lmtp_front_port, (offload, pem))
        v1 = free_port()
        cluster.proxies = [cluster.haproxy,
                           _start_haproxy(cluster, "send-proxy", v1, free_port())]
        cluster.fronts = {"send-proxy-v2": cluster.front_port, "send-proxy": v1,
                          "send-proxy-v2-ssl": offload}
        wait_port(cluster.lmtp_front_port)
        wait_port(offload)
        cluster.wait_proxies()  # the first health checks
        yield cluster
    finally:
        if "cluster" in locals():
            for proxy in cluster.proxies:
                proxy.terminate()
                proxy.wait(10)
            for node in cluster.nodes:
                node.stop()
        pg.destroy()


@pytest.fixture
def live(cluster: Cluster) -> Cluster:
    """The cluster with every node running (a test before may have killed one)."""
    if cluster.pg._proc is None:
        cluster.pg.start()
    cluster.ensure_nodes()
    if cluster.settled_pg is not cluster.pg._proc:  # first use, or restarted by a test
        cluster.settle()
    return cluster
