"""[metrics] listen: Prometheus text at /metrics, correct across worker processes.

A real ``pop3d serve`` with two workers is scraped while sessions are open on both; the
seams are exercised in forked processes and added up; ``promtool check metrics`` (from
Debian's ``prometheus``) accepts the exposition.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pop3d.testing import Pop3ServeProcess, free_port

from .conftest import children, wait_until

pytestmark = pytest.mark.timeout(90)

SESSIONS = 8


def scrape(port: int, accept: str = "") -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept} if accept else {}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return str(answer.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def promtool_accepts(text: str) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def login(host: str, port: int, user: str) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=20)
    try:
        with sock.makefile("rb") as f:
            assert f.readline().startswith(b"+OK")
            sock.sendall(f"USER {user}\r\nPASS secret\r\n".encode())
            assert f.readline().startswith(b"+OK")
            assert f.readline().startswith(b"+OK")
    except BaseException:
        sock.close()
        raise
    return sock


def test_scrape_counts_open_sessions_across_two_workers(tmp_path: Path) -> None:
    """Sessions open on both workers are summed; every series is there from the start;
    promtool accepts the text; OpenMetrics is served when asked for."""
    metrics_port = free_port()
    with Pop3ServeProcess(
        tmp_path / "srv", users={f"user{i}": "secret" for i in range(SESSIONS)}, workers=2,
        sections={"metrics": {"listen": f"127.0.0.1:{metrics_port}"}},
    ) as proc:
        assert wait_until(lambda: "metrics listening" in proc.log_text())
        open_sessions: list[socket.socket] = []
        try:
            for i in range(SESSIONS):  # one at a time: those made are closed below
                sock = login(proc.host, proc.port, f"user{i}")
                open_sessions.append(sock)
            assert wait_until(
                lambda: value(scrape(metrics_port), "pop3d_sessions_open") == SESSIONS
            )
            text = scrape(metrics_port)
            promtool_accepts(text)
            openmetrics = scrape(metrics_port, "application/openmetrics-text; version=1.0.0")
            assert openmetrics.rstrip().endswith("# EOF")
            for name in ("pop3d_sessions_total", "pop3d_logins_total",
                         "pop3d_auth_seconds_bucket", "pop3d_retrieved_bytes_total",
                         "pop3d_retrieved_messages_total", "pop3d_deleted_messages_total",
                         "pop3d_lock_conflicts_total", "pop3d_tls_handshakes_total",
                         "pop3d_connections_refused_total", "pop3d_lmtp_deliveries_total"):
                assert name in text, name
        finally:
            for sock in open_sessions:
                sock.close()
        assert wait_until(lambda: value(scrape(metrics_port), "pop3d_sessions_open") == 0)
        # The transport's own calls, summed over both workers: every login and every end.
        text = scrape(metrics_port)
        assert value(text, "pop3d_logins_total", mechanism="USER", result="ok") == SESSIONS
        # (plus the readiness probe of Pop3ServeProcess, which connects and hangs up)
        assert SESSIONS <= value(text, "pop3d_sessions_total", result="disconnect") <= SESSIONS + 1
        workers = children(proc.pid)
        assert len(workers) == 3  # two workers and the metrics process
        assert proc.stop() == 0


def test_seams_add_up_across_processes(tmp_path: Path) -> None:
    """Every seam, called in two forked processes, is summed in one scrape; labels outside
    their vocabulary become "other" (a client cannot grow the series)."""
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from pop3d import metrics
        folder = Path({str(tmp_path / "m")!r})
        folder.mkdir()
        metrics.enable(folder)
        pids = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                for _ in range(3):
                    metrics.login("PLAIN", "ok", 0.004)
                metrics.login("USER", "failed", 0.2)
                metrics.login("AUTH-BY-HACKER", "failed", 0.2)
                metrics.session_ended("quit")
                metrics.session_ended("timeout")
                metrics.retrieved(1000)
                metrics.deleted(2)
                metrics.lock_conflict()
                metrics.tls_handshake(True)
                metrics.tls_handshake(False)
                metrics.connection_refused("per_ip")
                metrics.lmtp_delivery("ok")
                metrics.lmtp_delivery("unknown_user")
                metrics.sessions_open(5)
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        metrics.process_dead(pids[0])
        print(metrics.exposition(folder)[0].decode())
        """
    )
    text = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert value(text, "pop3d_logins_total", mechanism="PLAIN", result="ok") == 6
    assert value(text, "pop3d_logins_total", mechanism="USER", result="failed") == 2
    assert value(text, "pop3d_logins_total", mechanism="other", result="failed") == 2
    assert value(text, "pop3d_auth_seconds_count") == 10
    assert value(text, "pop3d_auth_seconds_bucket", le="0.005") == 6
    assert value(text, "pop3d_sessions_total", result="quit") == 2
    assert value(text, "pop3d_sessions_total", result="timeout") == 2
    assert value(text, "pop3d_retrieved_messages_total") == 2
    assert value(text, "pop3d_retrieved_bytes_total") == 2000
    assert value(text, "pop3d_deleted_messages_total") == 4
    assert value(text, "pop3d_lock_conflicts_total") == 2
    assert value(text, "pop3d_tls_handshakes_total", result="ok") == 2
    assert value(text, "pop3d_tls_handshakes_total", result="failed") == 2
    assert value(text, "pop3d_connections_refused_total", cap="per_ip") == 2
    assert value(text, "pop3d_lmtp_deliveries_total", result="ok") == 2
    assert value(text, "pop3d_lmtp_deliveries_total", result="unknown_user") == 2
    # sessions_open is a live sum: the process marked dead no longer counts.
    assert value(text, "pop3d_sessions_open") == 5
    promtool_accepts(text)
