"""LOGIN-DELAY end to end: advertised, enforced across worker processes, seen by clients."""

from __future__ import annotations

import poplib
import shutil
import subprocess

import pytest

from pop3d.testing import Pop3ServeProcess

from .helpers import RawClient, ServeFactory

pytestmark = pytest.mark.timeout(90)


def _login(proc: Pop3ServeProcess, user: str, password: str) -> bytes:
    """USER/PASS with Python's poplib; the server's answer to PASS."""
    client = poplib.POP3(proc.host, proc.port, timeout=10)
    try:
        client.user(user)
        try:
            return client.pass_(password)
        except poplib.error_proto as exc:
            reply = exc.args[0]
            assert isinstance(reply, bytes)
            return reply
    finally:
        client.quit()


def test_a_second_login_too_soon_is_refused_on_every_worker(serve: ServeFactory) -> None:
    """Each worker sees the stamp the other wrote; only good credentials learn of the delay."""
    proc = serve(workers=2, login_delay=600)
    with RawClient(proc.host, proc.port) as raw:
        assert raw.cmd(b"CAPA").startswith(b"+OK")
        assert b"LOGIN-DELAY 600" in raw.multiline()
    assert _login(proc, "alice", "secret").startswith(b"+OK")
    # Eight connections: with two workers on one SO_REUSEPORT port, both take some.
    for _ in range(8):
        assert _login(proc, "alice", "secret") == (
            b"-ERR [LOGIN-DELAY] wait 600 seconds between logins"
        )
        assert _login(proc, "alice", "wrong").startswith(b"-ERR [AUTH]")
    assert _login(proc, "bob", "hunter2").startswith(b"+OK")
    assert proc.stop() == 0  # INFO lines are written in batches: all of them by the stop
    log = proc.log_text()
    assert "Traceback" not in log
    assert log.count("login of 'alice' refused: last login less than 600 s ago") == 8


def test_without_a_delay_nothing_is_advertised_or_refused(serve: ServeFactory) -> None:
    proc = serve()
    with RawClient(proc.host, proc.port) as raw:
        assert raw.cmd(b"CAPA").startswith(b"+OK")
        assert not any(line.startswith(b"LOGIN-DELAY") for line in raw.multiline())
    for _ in range(3):
        assert _login(proc, "alice", "secret").startswith(b"+OK")
    assert not (proc.root / "login-stamps").exists()


@pytest.mark.client
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_reports_the_refusal_as_a_denied_login(serve: ServeFactory) -> None:
    proc = serve(login_delay=600)
    url = f"pop3://alice:secret@{proc.host}:{proc.port}/"
    first = subprocess.run(
        ["curl", "-sS", "--max-time", "20", url], capture_output=True, timeout=30, check=False
    )
    assert first.returncode == 0, first.stderr
    again = subprocess.run(
        ["curl", "-sS", "--max-time", "20", url], capture_output=True, timeout=30, check=False
    )
    assert again.returncode == 67, again.stderr  # CURLE_LOGIN_DENIED
