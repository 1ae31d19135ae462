"""``pop3d deliver`` into PostgreSQL: stored whole, and never hung by a slow database.

Each delivery is a real ``pop3d deliver`` process, as an MTA runs it.  Against a server
that is down (its postmaster stopped with SIGSTOP: connections are accepted by the kernel
and never answered) or that stalls in the middle of a delivery (the backend serving it
stopped), the command exits 75 (EX_TEMPFAIL: the MTA retries) within ``[database]
deliver_timeout`` plus a bounded grace, and nothing of the message is stored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from pop3d.database import Database
from tests.pgserver import PgServer

from .test_import import _pg_listing

#: [database] deliver_timeout of these tests, and timeout (a statement, a connect).
DELIVER_TIMEOUT = 2.0
DB_TIMEOUT = 1.0
#: A stalled delivery exits by then at the latest (plus process start-up, generously).
BOUND = DELIVER_TIMEOUT + DB_TIMEOUT + 20


def _config(tmp_path: Path, url: str) -> Path:
    cfg = tmp_path / "pop3d.toml"
    cfg.write_text(f'[auth]\nbackend = "postgresql"\n[storage]\nbackend = "postgresql"\n'
                   f'[database]\nurl = "{url}"\ntimeout = {DB_TIMEOUT}\n'
                   f"deliver_timeout = {DELIVER_TIMEOUT}\n")
    return cfg


def _deliver(cfg: Path, user: str, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # type: ignore[no-any-return]
        [sys.executable, "-m", "pop3d", "deliver", "--config", str(cfg), user, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,  # type: ignore[call-overload]
    )  # fmt: skip


def _add_user(url: str, name: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO users (username, password) VALUES (%s, '{PLAIN}x')", (name,))


def _messages(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
        assert row is not None
        return int(row[0])


@contextmanager
def _stopped(pid: int, group: int | None = None) -> Iterator[None]:
    """``pid`` stopped meanwhile; resumed after, with its process ``group``: runuser,
    postgres' parent when the tests run as root, stops itself when its child stops."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        if group is not None:
            os.killpg(group, signal.SIGCONT)


def _postmaster(server: PgServer) -> int:
    return int((server.data / "postmaster.pid").read_text().split()[0])


def test_pop3d_deliver_into_postgresql(tmp_path: Path, database: Database) -> None:
    """`pop3d deliver` stores into the PostgreSQL store (67 for an unknown user)."""
    _add_user(database.config.url, "carol")
    cfg = _config(tmp_path, database.config.url)
    message = tmp_path / "msg"
    message.write_bytes(b"From sender@example.org Mon Jan  1 00:00:00 2024\nSubject: hi\n\nbody\n")
    for user, status in (("carol@example.org", 0), ("nobody", 67)):
        proc = _deliver(cfg, user, str(message))
        _, err = proc.communicate(timeout=BOUND)
        assert proc.returncode == status, err
    [(_, size, body)] = _pg_listing(database, "carol")
    assert body == b"Subject: hi\r\n\r\nbody\r\n"
    assert size == len(body)


def test_deliver_to_a_stopped_server_exits_75_in_bounded_time(
    tmp_path: Path, database: Database, pg_server: PgServer
) -> None:
    """The postmaster stopped (SIGSTOP): no connection is ever answered; exit 75."""
    _add_user(database.config.url, "dave")
    cfg = _config(tmp_path, database.config.url)
    message = tmp_path / "msg"
    message.write_bytes(b"Subject: x\n\nbody\n")
    assert pg_server._proc is not None
    with _stopped(_postmaster(pg_server), pg_server._proc.pid):
        proc = _deliver(cfg, "dave", str(message))
        _, err = proc.communicate(timeout=BOUND)
    assert proc.returncode == 75, err
    assert b"temporary failure" in err
    assert b"Traceback" not in err
    assert _messages(database.config.url) == 0


def test_delivery_stalled_mid_message_exits_75_and_stores_nothing(
    tmp_path: Path, database: Database
) -> None:
    """The backend serving a big delivery stops mid-COPY: exit 75, nothing stored, even
    after the backend resumes (the transaction died with the connection)."""
    url = database.config.url
    _add_user(url, "erin")
    cfg = _config(tmp_path, url)
    proc = _deliver(cfg, "erin", stdin=subprocess.PIPE)
    assert proc.stdin is not None
    head = b"Subject: big\n\n" + b"x" * 1000 + b"\n"
    body = b"y" * 1000 + b"\n"
    proc.stdin.write(head + body * 400)  # past one chunk row: the streaming path
    proc.stdin.flush()
    with psycopg.connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + BOUND
        while True:  # wait for the delivery's backend: the event, not a sleep
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                "AND (state LIKE 'idle in transaction%%' OR query LIKE 'COPY%%')"
            ).fetchall()
            if rows:
                break
            assert time.monotonic() < deadline, "the delivery never began its transaction"
            time.sleep(0.02)
    [(backend,)] = rows
    with _stopped(int(backend)):
        # 8 MiB more than any socket buffer holds: the COPY cannot finish meanwhile.
        feeder = threading.Thread(target=_feed, args=(proc, body, 8 * 1024), daemon=True)
        feeder.start()
        _, err = proc.communicate(timeout=BOUND)
    feeder.join(BOUND)
    assert proc.returncode == 75, err
    assert b"deadline" in err
    assert b"Traceback" not in err
    with psycopg.connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + BOUND
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                           (backend,)).fetchone() != (0,):
            assert time.monotonic() < deadline, "the stalled backend never ended"
            time.sleep(0.05)
    assert _messages(url) == 0


def _feed(proc: subprocess.Popen[bytes], line: bytes, count: int) -> None:
    assert proc.stdin is not None
    try:
        for _ in range(count):
            proc.stdin.write(line)
        proc.stdin.close()
    except (BrokenPipeError, ValueError):
        pass  # the delivery gave up first: what it was meant to do


def test_deliver_timeout_must_cover_one_statement(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[storage]\nbackend = "postgresql"\n[database]\nurl = "postgresql:///x"\n'
                   "timeout = 5\ndeliver_timeout = 1\n")
    proc = _deliver(cfg, "x", str(cfg))
    _, err = proc.communicate(timeout=BOUND)
    assert proc.returncode == 78
    assert b"deliver_timeout" in err


@pytest.fixture(autouse=True)
def _no_stopped_postgres(pg_server: PgServer) -> Iterator[None]:
    """Whatever a test did, the session's server runs afterwards."""
    yield
    os.kill(_postmaster(pg_server), signal.SIGCONT)
    if pg_server._proc is not None:
        os.killpg(pg_server._proc.pid, signal.SIGCONT)
