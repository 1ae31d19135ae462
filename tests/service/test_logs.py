"""Logs an operator feeds to tools: the audit line, [log] targets and formats, fail2ban.

fail2ban-regex (Debian's ``fail2ban``) runs the shipped filter against the lines of real
``pop3d serve`` sessions with wrong passwords (text on stderr, JSON in a file, syslog
datagrams) and against the audit shape for every reason.
"""

from __future__ import annotations

import json
import poplib
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pop3d.testing import Pop3ServeProcess, free_port, wait_for_port
from tests.integration.tls_support import make_pki

from .conftest import wait_until

pytestmark = pytest.mark.timeout(90)

FILTER = Path(__file__).parents[2] / "deploy" / "fail2ban" / "filter.d" / "pop3d.conf"
JAIL = Path(__file__).parents[2] / "deploy" / "fail2ban" / "jail.d" / "pop3d.conf"
REASONS = (
    "bad-password", "unknown-mech", "cleartext-refused", "too-many-attempts", "malformed",
    "cancelled", "tempfail",
)

needs_fail2ban = pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None, reason="fail2ban-regex is not installed"
)


def fail2ban_ips(log: Path) -> list[str]:
    """The addresses the shipped filter finds in ``log``, one per matched line."""
    done = subprocess.run(
        ["fail2ban-regex", "-o", "ip", str(log), str(FILTER)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return done.stdout.split()


def wrong_logins(host: str, port: int) -> int:
    """Three wrong USER/PASS and two wrong AUTH PLAIN on one connection each; the count."""
    for _ in range(3):
        client = poplib.POP3(host, port, timeout=20)
        client.user("alice")
        with pytest.raises(poplib.error_proto):
            client.pass_("wrong")
        client.quit()
    for _ in range(2):
        with socket.create_connection((host, port), timeout=20) as sock, sock.makefile("rb") as f:
            assert f.readline().startswith(b"+OK")
            sock.sendall(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n")  # \0alice\0wrong
            assert f.readline().startswith(b"-ERR")
            sock.sendall(b"QUIT\r\n")
            f.readline()
    return 5


@needs_fail2ban
def test_fail2ban_matches_a_real_session_log(tmp_path: Path) -> None:
    """Wrong passwords of a real server: every one matched, at the client's address; the
    session line says whether TLS was used and its version."""
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    with Pop3ServeProcess(
        tmp_path / "srv", users={"alice": "secret"}, sections={"tls": pki.tls_section()},
        tls_listen=[f"127.0.0.1:{tls_port}"], workers=2,
    ) as proc:
        count = wrong_logins(proc.host, proc.port)
        client = poplib.POP3_SSL("127.0.0.1", tls_port, context=pki.client_context(), timeout=20)
        client.user("alice")
        client.pass_("secret")
        client.quit()
        assert wait_until(lambda: "tls=TLSv1" in proc.log_text())
        assert proc.stop() == 0
    text = proc.log_text()
    assert text.count("auth failed: ") == count
    assert fail2ban_ips(proc.log_path) == ["127.0.0.1"] * count
    assert "user=alice via=USER tls=TLSv1.3 result=quit" in text
    assert "tls=no result=" in text


@needs_fail2ban
def test_audit_shape_for_every_reason(tmp_path: Path) -> None:
    """One audit line per reason: the filter counts all but tempfail (our fault), and a
    user name made to look like another address never moves the ban."""
    log = tmp_path / "audit.log"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from pop3d import audit, logsetup
        from pop3d.config import LogConfig
        logsetup.configure(LogConfig(target="file", file=Path({str(log)!r})))
        for i, reason in enumerate({REASONS!r}):
            audit.auth_failed("user" + str(i), "192.0.2." + str(i + 1), "PLAIN", reason, None)
        audit.auth_failed('x" rip=6.6.6.6 mech=USER reason=bad-password tls=no',
                          "198.51.100.7", "USER", "malformed", "TLSv1.3")
        audit.auth_failed("v6", "2001:db8::5", "APOP", "bad-password", None)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    ips = fail2ban_ips(log)
    expected = [f"192.0.2.{i + 1}" for i, r in enumerate(REASONS) if r != "tempfail"]
    assert ips == [*expected, "198.51.100.7", "2001:db8::5"]
    assert "6.6.6.6" not in ips


def _serve_raw(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pop3d", "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@needs_fail2ban
def test_json_lines_to_a_file(tmp_path: Path) -> None:
    """[log] target = "file", format = "json": one object a line with stable keys; the
    LMTP and metrics listeners are logged at start; fail2ban reads the JSON too."""
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    port, lmtp_port, metrics_port = free_port(), free_port(), free_port()
    config = tmp_path / "pop3d.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nworkers = 1\n'
        '[auth]\npasswd_file = "users"\nfailure_delay = 0\n'
        '[storage]\nmaildir = "mail/%u/Maildir"\n'
        f'[lmtp]\nlisten = ["127.0.0.1:{lmtp_port}"]\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        '[log]\ntarget = "file"\nfile = "pop3d.jsonl"\nformat = "json"\n'
    )
    proc = _serve_raw(config)
    try:
        wait_for_port("127.0.0.1", port, 20, process=proc)
        count = wrong_logins("127.0.0.1", port)
        log = tmp_path / "pop3d.jsonl"
        assert wait_until(lambda: log.read_text().count('"event":"session"') >= count)
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for record in records:
        assert {"time", "level", "logger", "pid", "message"} <= record.keys()
    failures = [r for r in records if r.get("event") == "auth_failed"]
    assert len(failures) == count
    assert {r["mech"] for r in failures} == {"USER", "PLAIN"}
    assert all(
        (r["user"], r["rip"], r["reason"], r["tls"], r["level"])
        == ("alice", "127.0.0.1", "bad-password", "no", "warning")
        for r in failures
    )
    sessions = [r for r in records if r.get("event") == "session"]
    assert all(r["tls"] == "no" and r["peer"].startswith("127.0.0.1:") for r in sessions)
    messages = [r["message"] for r in records]
    assert f"LMTP listening on 127.0.0.1:{lmtp_port}" in messages
    assert f"metrics listening on http://127.0.0.1:{metrics_port}/metrics" in messages
    assert fail2ban_ips(log) == ["127.0.0.1"] * count


def test_syslog_target(tmp_path: Path) -> None:
    """[log] target = "syslog": datagrams with the mail facility and a pop3d[pid] tag."""
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    dev_log = tmp_path / "log.sock"
    port = free_port()
    config = tmp_path / "pop3d.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nworkers = 1\n'
        '[auth]\npasswd_file = "users"\nfailure_delay = 0\n'
        f'[log]\ntarget = "syslog"\nsyslog_socket = "{dev_log}"\n'
    )
    received: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(dev_log))
        syslog.settimeout(0.2)
        proc = _serve_raw(config)
        try:
            wait_for_port("127.0.0.1", port, 20, process=proc)
            client = poplib.POP3("127.0.0.1", port, timeout=20)
            client.user("alice")
            with pytest.raises(poplib.error_proto):
                client.pass_("wrong")
            client.quit()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any("auth failed" in r for r in received):
                try:
                    received.append(syslog.recv(65536).decode())
                except TimeoutError:
                    continue
        finally:
            proc.terminate()
            assert proc.wait(20) == 0
    [audit_line] = [r for r in received if "auth failed:" in r]
    # <20>: facility mail (2) * 8 + warning (4)
    assert audit_line.startswith("<20>pop3d[")
    assert 'WARNING pop3d.auth: auth failed: user="alice" rip=127.0.0.1 mech=USER' in audit_line


def test_jail_names_the_filter() -> None:
    """The shipped jail uses the shipped filter on the POP3 ports."""
    text = JAIL.read_text()
    assert "filter   = pop3d" in text
    assert "port     = pop3,pop3s" in text
