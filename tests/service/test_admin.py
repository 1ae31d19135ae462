"""``pop3d who`` and ``pop3d kick USER`` through the workers' root-only admin sockets."""

from __future__ import annotations

import json
import os
import poplib
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pop3d.testing import Pop3ServeProcess

from .conftest import is_root, wait_until

pytestmark = pytest.mark.timeout(90)

USERS = {f"user{i}": "secret" for i in range(4)}


def pop3d(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pop3d", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )


def test_who_lists_and_kick_ends_sessions_without_update(tmp_path: Path) -> None:
    """who shows every session of both workers (user, address, since, state); kick ends
    one user's sessions without UPDATE (a DELE is not applied); the others go on."""
    with Pop3ServeProcess(tmp_path / "srv", users=USERS, workers=2) as proc:
        proc.add_message("user0", b"Subject: kept\r\n\r\nbody\r\n")
        clients = []
        try:
            for user in USERS:
                client = poplib.POP3(proc.host, proc.port, timeout=20)
                clients.append(client)
                client.user(user)
                client.pass_("secret")
            anonymous = poplib.POP3(proc.host, proc.port, timeout=20)
            clients.append(anonymous)
            clients[0].dele(1)
            config = str(proc.config_path)

            def listed() -> list[dict[str, object]]:
                done = pop3d("who", "--config", config, "--json")
                assert done.returncode == 0, done.stderr
                rows: list[dict[str, object]] = json.loads(done.stdout)["sessions"]
                return rows

            assert wait_until(lambda: len(listed()) == len(USERS) + 1)
            rows = listed()
            assert {r["user"] for r in rows} == {*USERS, None}
            assert {r["state"] for r in rows} == {"transaction", "authorization"}
            assert all(str(r["address"]).startswith("127.0.0.1:") for r in rows)
            assert all(isinstance(r["since"], float) for r in rows)
            assert len({r["pid"] for r in rows}) in (1, 2)
            table = pop3d("who", "--config", config)
            assert table.returncode == 0
            assert "user3" in table.stdout
            assert "transaction" in table.stdout

            done = pop3d("kick", "--config", config, "user0")
            assert done.returncode == 0, done.stderr
            assert "ended 1 session(s) of user0" in done.stdout
            with pytest.raises((poplib.error_proto, OSError, EOFError)):
                clients[0].noop()  # the farewell, read as the answer to NOOP, or a reset
            assert len(proc.messages("user0")) == 1  # no UPDATE: the DELE was not applied
            assert clients[1].stat()[0] == 0  # the others go on
            assert pop3d("kick", "--config", config, "nobody-here").returncode == 1
            assert wait_until(lambda: "user0" not in {r["user"] for r in listed()})
        finally:
            for client in clients:
                client.close()
        assert "result=kicked" in proc.log_text()
        assert proc.stop() == 0


@pytest.mark.skipif(not is_root(), reason="the sockets are root's: checked as root")
def test_admin_sockets_are_root_only(tmp_path: Path) -> None:
    """Each worker's socket is root's, mode 0600, in a 0700 folder of root's."""
    with Pop3ServeProcess(tmp_path / "srv", users=USERS, workers=2) as proc:
        folder = proc.root / "run" / "admin"
        assert wait_until(lambda: len(list(folder.glob("*.sock"))) == 2)
        info = folder.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o700)
        for sock in folder.glob("*.sock"):
            info = sock.stat()
            assert stat.S_ISSOCK(info.st_mode)
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
        assert proc.stop() == 0
        assert wait_until(lambda: not list(folder.glob("*.sock")))
    assert os.geteuid() == 0
