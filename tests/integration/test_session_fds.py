"""Descriptors per session: a logged-in session holds its socket, and its lock costs none.

The server runs in this process (:class:`Pop3TestServer`); the clients run in another
process, so that this process's descriptors are the server's alone.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pop3d.storage.lock_table import SHARDS
from pop3d.testing import Pop3TestServer

SESSIONS = 200

#: Logs every user in (one connection each), says "ready", holds the sessions until its
#: stdin closes, then QUITs them all.
CLIENTS = textwrap.dedent(
    """
    import socket, sys

    def reply(sock):
        data = b""
        while not data.endswith(b"\\r\\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise SystemExit("connection closed")
            data += chunk
        return data

    port, count = int(sys.argv[1]), int(sys.argv[2])
    sessions = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        reply(sock)
        sock.sendall(b"USER user%d\\r\\n" % i)
        reply(sock)
        sock.sendall(b"PASS secret\\r\\n")
        answer = reply(sock)
        if not answer.startswith(b"+OK"):
            raise SystemExit(f"login {i}: {answer!r}")
        sessions.append(sock)
    print("ready", flush=True)
    sys.stdin.read()
    for sock in sessions:
        sock.sendall(b"QUIT\\r\\n")
        reply(sock)
        sock.close()
    print("done", flush=True)
    """
)


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("lock_table", "per_session"), [("default", 1), ("per-mailbox", 2)])
def test_a_logged_in_session_holds_one_descriptor(
    tmp_path: Path, lock_table: str, per_session: int
) -> None:
    """200 sessions in TRANSACTION raise the server's descriptors by about 200, not 400.

    With the lock table every session's lock is a byte of one of the table's SHARDS
    files, opened once per process; with per-mailbox lock files each session holds its
    own.
    """
    users = {f"user{i}": "secret" for i in range(SESSIONS)}
    storage = {} if lock_table == "default" else {"storage": {"lock_table": lock_table}}
    with Pop3TestServer(tmp_path, users=users, sections=storage) as srv:
        # One session first, so that what a server opens once (the table, the executor,
        # the passwd-file watcher) is counted in the baseline.
        warm = subprocess.run(
            [sys.executable, "-c", CLIENTS, str(srv.port), "1"],
            input="", capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert warm.stdout == "ready\ndone\n"
        before = open_fds()
        clients = subprocess.Popen(
            [sys.executable, "-c", CLIENTS, str(srv.port), str(SESSIONS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert clients.stdout is not None
            assert clients.stdout.readline() == "ready\n"
            added = open_fds() - before
        finally:
            assert clients.stdin is not None
            clients.stdin.close()
            clients.wait(timeout=60)
            assert clients.stdout is not None
            clients.stdout.close()
        assert clients.returncode == 0
    print(f"{SESSIONS} sessions ({lock_table} locks): {added} more descriptors")
    # The table's files are opened as sessions first fall in them: at most SHARDS more.
    files = SHARDS if lock_table == "default" else 0
    assert SESSIONS * per_session <= added <= SESSIONS * per_session + files + 5
