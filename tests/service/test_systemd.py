"""systemd without systemd: socket activation and sd_notify, with the environment it sets.

The test binds the sockets as systemd would, puts them at descriptors 3 and 4 with
LISTEN_FDS/LISTEN_FDNAMES and LISTEN_PID (the pid the exec'd server will have), and reads
the notifications on a datagram socket of its own (NOTIFY_SOCKET).  The shipped units pass
``systemd-analyze verify``.
"""

from __future__ import annotations

import os
import poplib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pop3d import systemd
from tests.integration.tls_support import make_pki

pytestmark = pytest.mark.timeout(90)

UNITS = Path(__file__).parents[2] / "deploy" / "systemd"


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def _notifications(sock: socket.socket, until: str, timeout: float = 20.0) -> list[str]:
    """Datagrams received until one starts with ``until`` (bounded)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if got[-1].startswith(until):
            return got
    raise AssertionError(f"no {until} in {got}")


def test_socket_activation_and_notify(tmp_path: Path) -> None:
    """pop3d serves on the passed sockets (binding none of the config's, which are busy),
    and tells systemd READY, RELOADING (with MONOTONIC_USEC), READY again, STOPPING."""
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    for sub in ("cur", "new", "tmp"):
        (tmp_path / "mail" / "alice" / "Maildir" / sub).mkdir(parents=True)
    busy = _listening()  # the config's addresses: binding them would fail
    busy_address = f"127.0.0.1:{busy.getsockname()[1]}"
    pop3, pop3s = _listening(), _listening()
    config = tmp_path / "pop3d.toml"
    config.write_text(
        f'[server]\nlisten = ["{busy_address}"]\ntls_listen = ["{busy_address}"]\nworkers = 2\n'
        f'[tls]\ncert = "{pki.cert_file}"\nkey = "{pki.key_file}"\n'
        '[auth]\npasswd_file = "users"\nfailure_delay = 0\n'
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    env = {
        **os.environ,
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "pop3:pop3s",
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
    }
    # As systemd does between fork and exec: the sockets at 3 and 4, LISTEN_PID = the pid.
    exec_as_systemd = (
        "import os, sys;"
        " os.dup2(int(os.environ.pop('A')), 3); os.dup2(int(os.environ.pop('B')), 4);"
        " os.environ['LISTEN_PID'] = str(os.getpid());"
        " os.execv(sys.executable, [sys.executable, '-m', 'pop3d', *sys.argv[1:]])"
    )
    env["A"], env["B"] = str(pop3.fileno()), str(pop3s.fileno())
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", exec_as_systemd, "serve", "--config", str(config)],
            env=env, pass_fds=(pop3.fileno(), pop3s.fileno()), stdout=log, stderr=log,
        )
    try:
        assert _notifications(notify, "READY=1")[-1] == "READY=1", log_path.read_text()
        client = poplib.POP3("127.0.0.1", pop3.getsockname()[1], timeout=20)
        client.user("alice")
        assert client.pass_("secret").startswith(b"+OK")
        client.quit()
        secure = poplib.POP3_SSL(
            "127.0.0.1", pop3s.getsockname()[1], context=pki.client_context(), timeout=20
        )
        secure.user("alice")
        assert secure.pass_("secret").startswith(b"+OK")
        secure.quit()

        proc.send_signal(signal.SIGHUP)
        got = _notifications(notify, "READY=1")
        assert got[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert int(got[0].rpartition("=")[2]) > 0
        proc.send_signal(signal.SIGTERM)
        assert _notifications(notify, "STOPPING=1")[-1] == "STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for sock in (busy, pop3, pop3s, notify):
            sock.close()
    text = log_path.read_text()
    assert "socket from systemd" in text
    assert "configuration reloaded" in text
    assert "cannot listen" not in text


def test_listen_fds_are_only_for_the_pid_systemd_started() -> None:
    """LISTEN_PID of another process: the variables are ignored (and removed)."""
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "pop3"}
    assert systemd.listen_fds(env) == []
    assert env == {}
    assert systemd.notify("READY=1", {}) is False


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The shipped service and sockets are valid units (with a pop3d that exists)."""
    pop3d = Path(sys.executable).with_name("pop3d")
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/usr/local/bin/pop3d", str(pop3d))
        (tmp_path / unit.name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no",
         *(f"./{u.name}" for u in sorted(UNITS.iterdir()))],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr
    service = (UNITS / "pop3d.service").read_text()
    for hardening in ("ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                      "ProtectHome=yes", "Type=notify", "CapabilityBoundingSet="):
        assert hardening in service
