"""Mail is sacred: only QUIT in TRANSACTION deletes, and nothing ever loses a kept message.

Every ending other than QUIT (a dropped connection, the idle timer, SIGTERM, kill -9)
must leave the Maildir as it was; a kill -9 in the middle of UPDATE may leave some of the
messages marked for deletion, but never removes or damages one that was not marked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3d.storage import maildir
from pop3d.testing import Pop3ServeProcess, Pop3TestServer

from .helpers import WAIT, RawClient, ServeFactory, ServerFactory, wait_until
from .messages import wire

pytestmark = pytest.mark.timeout(90)

MESSAGES = [b"Subject: m%d\n\nbody of message %d\n" % (i, i) for i in range(1, 6)]


def fill(srv: Pop3TestServer | Pop3ServeProcess, user: str = "alice") -> None:
    for data in MESSAGES:
        srv.add_message(user, data)


def _refuses(port: int) -> bool:
    """Whether a connection to ``port`` is refused (the listener is closed)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    except OSError:
        return True
    return False


def login_when_free(srv: Pop3TestServer | Pop3ServeProcess) -> RawClient:
    """Log alice in, retrying while the previous session still holds the lock (bounded)."""
    deadline = time.monotonic() + WAIT
    while True:
        client = RawClient(srv.host, srv.port)
        reply = client.login(b"alice", b"secret")
        if reply.startswith(b"+OK"):
            return client
        client.close()
        assert b"[IN-USE]" in reply, reply
        assert time.monotonic() < deadline, "the maildrop lock was never released"
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_drop_after_dele_deletes_nothing(pop3_server: Pop3TestServer, how: str) -> None:
    """A client that vanishes after DELE (FIN or RST) deletes nothing: no QUIT, no UPDATE."""
    fill(pop3_server)
    client = RawClient(pop3_server.host, pop3_server.port)
    assert client.login(b"alice", b"secret").startswith(b"+OK")
    for n in (1, 2, 5):
        assert client.cmd(b"DELE %d" % n).startswith(b"+OK")
    if how == "reset":
        client.abort()
    else:
        client.close()
    again = login_when_free(pop3_server)  # the old session is over and its lock released
    with again:
        assert again.cmd(b"STAT") == b"+OK 5 %d\r\n" % sum(len(wire(m)) for m in MESSAGES)
    assert pop3_server.messages("alice") == MESSAGES


@pytest.mark.parametrize("state", ["authorization", "transaction"])
def test_idle_timeout_closes_without_update(
    pop3_server_factory: ServerFactory, state: str
) -> None:
    """The inactivity timer closes the connection without UPDATE: DELE, go idle, nothing lost."""
    srv = pop3_server_factory(idle_timeout=1)
    fill(srv)
    with RawClient(srv.host, srv.port) as client:
        if state == "transaction":
            assert client.login(b"alice", b"secret").startswith(b"+OK")
            assert client.cmd(b"DELE 1").startswith(b"+OK")
        start = time.monotonic()
        tail = client.wait_eof(timeout=WAIT)
        elapsed = time.monotonic() - start
    assert tail.startswith(b"-ERR"), tail
    assert 0.8 <= elapsed < WAIT
    login_when_free(srv).close()
    assert srv.messages("alice") == MESSAGES


def test_activity_resets_idle_timer(pop3_server_factory: ServerFactory) -> None:
    """Commands keep a session alive past the idle timeout (the timer is for inactivity)."""
    srv = pop3_server_factory(idle_timeout=1)
    fill(srv)
    with RawClient(srv.host, srv.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK")
        end = time.monotonic() + 2.0
        while time.monotonic() < end:  # twice the idle timeout, in short steps
            assert client.cmd(b"NOOP") == b"+OK\r\n"
            time.sleep(0.05)  # client think time, far under the 1 s timeout
        assert client.cmd(b"DELE 1").startswith(b"+OK")
        assert client.cmd(b"QUIT").startswith(b"+OK")
    assert srv.messages("alice") == MESSAGES[1:]


def test_sigterm_exits_zero_and_closes_sessions_without_update(
    serve: ServeFactory,
) -> None:
    """SIGTERM: exit status 0 within seconds; open sessions are closed and nothing is deleted."""
    proc = serve()
    fill(proc)
    fill(proc, "bob")
    trans = RawClient(proc.host, proc.port)
    assert trans.login(b"alice", b"secret").startswith(b"+OK")
    assert trans.cmd(b"DELE 1").startswith(b"+OK")
    auth = RawClient(proc.host, proc.port)
    assert auth.cmd(b"USER bob").startswith(b"+OK")
    status = proc.stop(signal.SIGTERM, timeout=15)  # bounded: fails if it takes longer
    assert status == 0, proc.log_text()
    for client in (trans, auth):
        with client:
            rest = client.wait_eof(timeout=5)
            assert rest in (b"", b"-ERR [SYS/TEMP] server shutting down\r\n"), rest
    assert proc.messages("alice") == MESSAGES
    assert proc.messages("bob") == MESSAGES
    assert "Traceback" not in proc.log_text()


def test_delivery_during_session_is_invisible_and_survives(pop3_server: Pop3TestServer) -> None:
    """A message delivered mid-session is not seen by it, and its UPDATE does not delete it."""
    pop3_server.add_message("alice", MESSAGES[0])
    pop3_server.add_message("alice", MESSAGES[1])
    with RawClient(pop3_server.host, pop3_server.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK")
        late = pop3_server.add_message("alice", MESSAGES[2])
        sizes = [len(wire(m)) for m in MESSAGES[:2]]
        assert client.cmd(b"STAT") == b"+OK 2 %d\r\n" % sum(sizes)
        assert client.cmd(b"LIST").startswith(b"+OK")
        assert client.multiline() == [b"1 %d" % sizes[0], b"2 %d" % sizes[1]]
        assert client.cmd(b"UIDL").startswith(b"+OK")
        assert len(client.multiline()) == 2
        assert client.cmd(b"RETR 3").startswith(b"-ERR")
        assert client.cmd(b"DELE 3").startswith(b"-ERR")
        assert client.cmd(b"DELE 1").startswith(b"+OK")
        assert client.cmd(b"DELE 2").startswith(b"+OK")
        assert client.cmd(b"QUIT").startswith(b"+OK")
        assert client.wait_eof() == b""
    assert late.exists()
    assert pop3_server.messages("alice") == [MESSAGES[2]]


def test_second_session_gets_in_use(pop3_server: Pop3TestServer) -> None:
    """One session per maildrop: the second login gets -ERR [IN-USE]; after QUIT it works."""
    fill(pop3_server)
    first = RawClient(pop3_server.host, pop3_server.port)
    assert first.login(b"alice", b"secret").startswith(b"+OK")
    with RawClient(pop3_server.host, pop3_server.port) as second:
        assert second.login(b"alice", b"secret") == b"-ERR [IN-USE] maildrop already locked\r\n"
        # bob's maildrop is another lock
        with RawClient(pop3_server.host, pop3_server.port) as bob:
            assert bob.login(b"bob", b"hunter2").startswith(b"+OK")
        assert first.cmd(b"QUIT").startswith(b"+OK")
        first.close()
    login_when_free(pop3_server).close()


@pytest.mark.parametrize("lock_table", ["default", "per-mailbox"])
def test_lock_holds_across_processes_and_dies_with_kill9(
    serve: ServeFactory, lock_table: str
) -> None:
    """The maildrop lock holds across server processes and dies with a kill -9'd holder.

    By default both servers lock in the shared lock table (``mail/.pop3d-locks``); with
    ``lock_table = "per-mailbox"`` in each Maildir's ``pop3d.lock``.
    """
    storage = {} if lock_table == "default" else {"storage": {"lock_table": lock_table}}
    one = serve(sections=storage)
    fill(one)
    holder = RawClient(one.host, one.port)
    assert holder.login(b"alice", b"secret").startswith(b"+OK")
    assert holder.cmd(b"DELE 1").startswith(b"+OK")
    assert (one.root / "mail" / ".pop3d-locks").exists() == (lock_table == "default")
    assert (one.maildir("alice") / "pop3d.lock").exists() == (lock_table == "per-mailbox")
    two = serve(root=one.root, sections=storage)
    with RawClient(two.host, two.port) as other:
        assert other.login(b"alice", b"secret").startswith(b"-ERR [IN-USE]")
    one.kill()
    with holder:
        holder.wait_eof()
    # The holder's worker dies of its parent's death (PDEATHSIG) and closes its socket
    # before its lock file: the lock goes a moment after the EOF, not before it.
    with login_when_free(two) as other:
        assert other.cmd(b"STAT").startswith(b"+OK 5 ")
    assert two.messages("alice") == MESSAGES


# ------------------------------------------------------------------ kill -9 during UPDATE

BIG = 3000
KEEP_EVERY = 50


def big_message(i: int) -> bytes:
    return b"Subject: message %d\n\n%s\n" % (i, b"line of message %d\n" % i * 5)


def maildir_files(root: Path) -> dict[str, bytes]:
    """Message files by their key (the name before ``:``) -> contents."""
    out: dict[str, bytes] = {}
    for sub in ("new", "cur"):
        # Closed even when a read fails (a message the server is moving): an iterator
        # left open is a ResourceWarning at a random later test.
        with os.scandir(root / sub) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                out[entry.name.split(":", 1)[0]] = Path(entry.path).read_bytes()
    return out


def count_messages(root: Path) -> int:
    return sum(len(os.listdir(root / sub)) for sub in ("new", "cur"))  # noqa: PTH208 (fast)


@pytest.mark.parametrize("kill_at", ["first-unlink", "half", "quit-sent"])
def test_kill9_during_update_loses_no_kept_message(
    serve: ServeFactory, tmp_path: Path, kill_at: str
) -> None:
    """kill -9 while UPDATE unlinks: every undeleted message survives intact, the lock dies."""
    proc = serve(root=tmp_path / "srv")
    originals: dict[str, bytes] = {}
    for i in range(BIG):
        path = proc.add_message("alice", big_message(i))
        originals[path.name] = big_message(i)
    root = proc.maildir("alice")
    kept = {name for i, name in enumerate(originals) if i % KEEP_EVERY == 0}
    client = RawClient(proc.host, proc.port)
    assert client.login(b"alice", b"secret").startswith(b"+OK")
    # Pipelined DELEs (RFC 2449 PIPELINING), then read all the replies.
    client.send(b"".join(b"DELE %d\r\n" % (i + 1) for i in range(BIG) if i % KEEP_EVERY))
    for _ in range(BIG - len(kept)):
        assert client.line().startswith(b"+OK")
    client.send(b"QUIT\r\n")
    target = {"first-unlink": BIG - 1, "half": BIG // 2, "quit-sent": BIG}[kill_at]
    deadline = time.monotonic() + WAIT
    while count_messages(root) > target and time.monotonic() < deadline:
        pass  # spin: UPDATE takes milliseconds, and we must catch it in the act
    os.kill(proc.pid, signal.SIGKILL)
    proc.kill()  # reap
    client.close()
    left = maildir_files(root)
    # Every kept message is there, byte for byte; every file left is an intact original.
    assert kept <= left.keys()
    for key, data in left.items():
        assert data == originals[key], key
    assert list((root / "tmp").iterdir()) == []
    # The lock died with the server: a new one serves the same Maildir at once.
    again = serve(root=tmp_path / "srv")
    with RawClient(again.host, again.port) as client2:
        reply = client2.login(b"alice", b"secret")
        assert reply.startswith(b"+OK alice's maildrop has %d messages" % len(left)), reply
        assert client2.cmd(b"QUIT").startswith(b"+OK")
    if kill_at == "half":
        # Not a guarantee of the server, but a check that the test caught UPDATE mid-way.
        assert len(kept) < len(left) < BIG, "UPDATE was not interrupted; make it longer"


@contextlib.contextmanager
def stalled_retr(
    srv: Pop3TestServer | Pop3ServeProcess, fill: bytes
) -> Iterator[tuple[RawClient, bytes]]:
    """Alice gets a 32 MiB message (lines of ``fill``) and MESSAGES[0]; a client with a
    small receive buffer logs in, DELEs 2, sends RETR 1 and never reads the answer.
    Yield the client and the big message."""
    big = b"Subject: big\n\n" + (fill * 1023 + b"\n") * 32 * 1024
    srv.add_message("alice", big)
    srv.add_message("alice", MESSAGES[0])
    with RawClient(srv.host, srv.port) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert client.login(b"alice", b"secret").startswith(b"+OK")
        assert client.cmd(b"DELE 2").startswith(b"+OK")
        client.send(b"RETR 1\r\n")
        yield client, big


def test_stalled_reader_is_cut_by_idle_timer(pop3_server_factory: ServerFactory) -> None:
    """A client that stops reading mid-RETR is closed by the idle timer; nothing is deleted."""
    srv = pop3_server_factory(idle_timeout=1)
    with stalled_retr(srv, b"y") as (_, big):
        # The server must give up on its own: the lock comes free without our help.
        login_when_free(srv).close()
    assert srv.messages("alice") == [big, MESSAGES[0]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_signal_during_stalled_retr(serve: ServeFactory, sig: int) -> None:
    """SIGTERM/SIGINT while a RETR is stuck on a non-reading client still exits 0 promptly."""
    proc = serve()
    with stalled_retr(proc, b"z") as (client, big):
        assert client.line().startswith(b"+OK")  # the transfer has begun
        assert proc.stop(sig, timeout=15) == 0, proc.log_text()  # bounded
    assert proc.messages("alice") == [big, MESSAGES[0]]
    assert "Traceback" not in proc.log_text()


def test_uidl_stable_across_restart(serve: ServeFactory, tmp_path: Path) -> None:
    """UIDLs stay the same across server restarts (and the new/ to cur/ move at login)."""
    first = serve(root=tmp_path / "srv")
    fill(first)

    def uidls(proc: Pop3ServeProcess) -> list[bytes]:
        with RawClient(proc.host, proc.port) as client:
            assert client.login(b"alice", b"secret").startswith(b"+OK")
            assert client.cmd(b"UIDL").startswith(b"+OK")
            listing = client.multiline()
            assert client.cmd(b"QUIT").startswith(b"+OK")
            return listing

    before = uidls(first)
    assert first.stop() == 0
    second = serve(root=tmp_path / "srv")
    assert uidls(second) == before
    assert len(set(before)) == len(MESSAGES)


def test_message_removed_by_another_program(pop3_server: Pop3TestServer) -> None:
    """A message file removed under the session gets -ERR for it; the rest is served."""
    fill(pop3_server)
    with RawClient(pop3_server.host, pop3_server.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK")
        victim = pop3_server.message_paths("alice")[1]
        victim.unlink()
        assert client.cmd(b"RETR 2").startswith(b"-ERR")
        assert client.cmd(b"RETR 3").startswith(b"+OK")
        assert client.multiline() == MESSAGES[2].rstrip(b"\n").split(b"\n")
        assert client.cmd(b"DELE 2").startswith(b"+OK")
        assert client.cmd(b"DELE 1").startswith(b"+OK")
        assert client.cmd(b"QUIT").startswith(b"+OK")
    assert pop3_server.messages("alice") == MESSAGES[2:]


def test_missing_maildir_is_sys_temp_not_empty(pop3_server: Pop3TestServer) -> None:
    """A user whose Maildir is missing gets -ERR [SYS/TEMP] at login, never an empty mailbox."""
    shutil.rmtree(pop3_server.maildir("bob"))
    with RawClient(pop3_server.host, pop3_server.port) as client:
        reply = client.login(b"bob", b"hunter2")
        assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
    assert not (pop3_server.root / "mail" / "bob" / "Maildir" / "cur").exists()


def test_stop_during_update_lets_it_finish_and_signs_off(
    pop3_server: Pop3TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that arrives while an UPDATE runs lets it finish, and QUIT's +OK still goes out."""
    entered, release = threading.Event(), threading.Event()
    real_commit = maildir._commit_sync

    def slow_commit(*args: object) -> None:
        entered.set()
        assert release.wait(WAIT)
        real_commit(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir, "_INLINE_COMMIT", 0)  # the commit runs in a thread
    monkeypatch.setattr(maildir, "_commit_sync", slow_commit)
    fill(pop3_server)
    client = RawClient(pop3_server.host, pop3_server.port)
    assert client.login(b"alice", b"secret").startswith(b"+OK")
    assert client.cmd(b"DELE 2").startswith(b"+OK")
    client.send(b"QUIT\r\n")
    assert entered.wait(WAIT)
    stopper = threading.Thread(target=pop3_server.stop)
    stopper.start()
    # The stop is under way (the listener is closed) while the UPDATE still waits.
    assert wait_until(lambda: _refuses(pop3_server.port))
    assert stopper.is_alive()
    release.set()
    with client:
        assert client.line().startswith(b"+OK"), "the sign-off of QUIT was lost"
        assert client.wait_eof() == b""
    stopper.join(WAIT)
    assert pop3_server.messages("alice") == [MESSAGES[0], *MESSAGES[2:]]


def test_idle_timeout_never_cuts_an_update(
    pop3_server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An UPDATE that outlasts the idle timeout finishes, and QUIT's +OK goes out."""
    release = threading.Event()
    real_commit = maildir._commit_sync

    def slow_commit(*args: object) -> None:
        assert release.wait(WAIT)
        real_commit(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir, "_INLINE_COMMIT", 0)
    monkeypatch.setattr(maildir, "_commit_sync", slow_commit)
    srv = pop3_server_factory(idle_timeout=1)
    fill(srv)
    with RawClient(srv.host, srv.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK")
        assert client.cmd(b"DELE 1").startswith(b"+OK")
        client.send(b"QUIT\r\n")
        # A connection opened now is closed by the idle sweep after the QUIT's deadline
        # has passed too: then the UPDATE has outlasted the idle timeout.
        with RawClient(srv.host, srv.port) as idle:
            assert idle.wait_eof(timeout=WAIT).startswith(b"-ERR")
        release.set()
        assert client.line().startswith(b"+OK"), "the idle timeout cut the UPDATE"
    assert srv.messages("alice") == MESSAGES[1:]


def test_idle_sweep_closes_every_idle_session_and_only_those(
    pop3_server_factory: ServerFactory,
) -> None:
    """Many idle sessions are all closed near the timeout; an active one stays."""
    srv = pop3_server_factory(idle_timeout=1)
    idle = [RawClient(srv.host, srv.port) for _ in range(20)]
    with RawClient(srv.host, srv.port) as active:
        assert active.login(b"alice", b"secret").startswith(b"+OK")
        deadline = time.monotonic() + WAIT
        while not all(client.has_data() for client in idle):  # their farewells (bounded)
            assert time.monotonic() < deadline, "the idle sessions were not closed"
            assert active.cmd(b"NOOP") == b"+OK\r\n"
            time.sleep(0.05)
        for client in idle:
            with client:
                assert client.wait_eof(timeout=WAIT).startswith(b"-ERR")
        assert active.cmd(b"NOOP") == b"+OK\r\n"
