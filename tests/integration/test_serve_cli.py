"""``pop3d serve`` as a user meets it: the embedded demo, --version, bad configs (exit 78)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pop3d import __version__
from pop3d.testing import wait_for_port

pytestmark = pytest.mark.timeout(60)

DEMO_PORT = 1110
#: pop3d serve's exit status when it cannot bind.
EX_OSERR = 71


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def pop3d(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pop3d", *args],
        capture_output=True, text=True, timeout=30, cwd=cwd, check=False,
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_embedded_default_serves_demo_mail(tmp_path: Path) -> None:
    """`pop3d serve` without a config serves a ready demo mailbox on 127.0.0.1:1110."""
    if port_busy(DEMO_PORT):
        pytest.skip(f"127.0.0.1:{DEMO_PORT} is in use on this machine; the demo needs it")
    data = tmp_path / "data"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pop3d", "serve", "--data", str(data)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=tmp_path,
        )
    try:
        # Our own process must be the one listening (not another suite's demo on 1110).
        deadline = time.monotonic() + 15
        while f"listening on 127.0.0.1:{DEMO_PORT}" not in log_path.read_text():
            if proc.poll() == EX_OSERR:
                pytest.skip(f"127.0.0.1:{DEMO_PORT} was taken while the demo started")
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        wait_for_port("127.0.0.1", DEMO_PORT, 15, process=proc)
        printed = log_path.read_text()
        assert f"curl pop3://demo:demo@127.0.0.1:{DEMO_PORT}/1" in printed
        done = subprocess.run(
            ["curl", "--silent", "--show-error", "--max-time", "20",
             f"pop3://demo:demo@127.0.0.1:{DEMO_PORT}/1"],
            capture_output=True, timeout=30, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert b"Subject: Welcome to pop3d" in done.stdout
        assert done.stdout.endswith(b"\r\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert (data / "users").is_file()


def test_version() -> None:
    """`python -m pop3d --version` prints the version and exits 0."""
    done = pop3d("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"pop3d {__version__}"


#: name -> (config text, what the message must mention)
BAD_CONFIGS = {
    "not-toml": ("[server\nlisten = 1", "pop3d.toml"),
    "unknown-key": ('[server]\nlisten = ["127.0.0.1:0"]\nlisen = 1\n', "lisen"),
    "bad-address": ('[server]\nlisten = ["localhost"]\n', "localhost"),
    "missing-passwd-file": (
        '[auth]\npasswd_file = "nope"\n[storage]\nmaildir = "m/%u"\n', "nope"
    ),
    "both-storages": ('[storage]\nmaildir = "m/%u"\nmbox = "b/%u"\n', "maildir"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_exits_78_with_message(tmp_path: Path, name: str) -> None:
    """A bad config file: exit 78 (EX_CONFIG), a clear message on stderr, no traceback."""
    path = tmp_path / "pop3d.toml"
    text, mention = BAD_CONFIGS[name]
    path.write_text(text)
    done = pop3d("serve", "--config", str(path), cwd=tmp_path)
    assert done.returncode == 78, done.stderr
    assert "configuration" in done.stderr
    assert mention in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    """A config path that does not exist is EX_CONFIG and names the file."""
    done = pop3d("serve", "--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 78
    assert "absent.toml" in done.stderr
