"""Hostile and odd input over a real socket: overlong lines, binary bytes, floods, huge mail.

The rules: every bad line gets one ``-ERR`` (never an echo or a traceback), the tail of an
overlong line never runs as a command, pipelined commands are answered in order, a client
that keeps sending garbage is cut off, and a huge RETR costs bounded memory.
"""

from __future__ import annotations

import logging
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from pop3d.testing import Pop3TestServer

from .helpers import WAIT, RawClient, ServeFactory, ServerFactory, greets, wait_until
from .messages import TRICKY, lines, wire

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def session(pop3_server: Pop3TestServer) -> RawClient:
    """alice logged in, with the TRICKY messages; closed (without QUIT) at teardown."""
    for data in TRICKY.values():
        pop3_server.add_message("alice", data)
    client = RawClient(pop3_server.host, pop3_server.port)
    assert client.login(b"alice", b"secret").startswith(b"+OK")
    return client


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert bad == [], [r.getMessage() for r in bad]


OVERLONG = [
    pytest.param([b"A" * 300 + b" QUIT\r\n"], id="300-then-QUIT"),
    pytest.param([b"NOOP " + b"x" * 260 + b" QUIT\r\n"], id="NOOP-padded"),
    pytest.param([b"A" * 100_000, b" QUIT\r\n"], id="100KB-no-CRLF-then-QUIT"),
    pytest.param([b"A" * 250 + b" QUIT\r\n"], id="257-octets"),
    pytest.param([b"A" * 10_000 + b"\n", b"QUIT\r\n"[:0]], id="bare-LF-end"),
]


@pytest.mark.parametrize("writes", OVERLONG)
def test_overlong_line_tail_never_runs(
    pop3_server: Pop3TestServer, session: RawClient, writes: list[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An overlong line is answered once with -ERR; its tail (" QUIT") is never a command."""
    with session:
        assert session.cmd(b"DELE 1").startswith(b"+OK")
        for chunk in writes:
            session.send(chunk)
        assert session.line().startswith(b"-ERR ")
        # Had the tail run as QUIT, UPDATE would delete message 1 and close the session.
        assert session.cmd(b"NOOP") == b"+OK\r\n"
        assert session.cmd(b"STAT").startswith(b"+OK %d " % (len(TRICKY) - 1))
    # Dropped without QUIT: message 1 is still there once the session is gone.
    with RawClient(pop3_server.host, pop3_server.port) as again:
        deadline = time.monotonic() + 10
        while not again.login(b"alice", b"secret").startswith(b"+OK"):
            assert time.monotonic() < deadline
        assert again.cmd(b"STAT").startswith(b"+OK %d " % len(TRICKY))
    assert pop3_server.messages("alice") == list(TRICKY.values())
    no_tracebacks(caplog)


GARBAGE = [
    b"\x00\r\n",
    b"US\x00ER alice\r\n",
    b"RETR \x001\r\n",
    b"\xff\xfe\xfd\xfc\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n",  # a TLS ClientHello's first bytes
    b"GET / HTTP/1.1\r\n",
    b"RETR 1 2 3\r\n",
    b"LIST \xd9\xa1\r\n",  # ARABIC-INDIC DIGIT ONE: int() would take it
    b"RETR +1\r\n",
    b"RETR 1_0\r\n",
    b"TOP 1 -1\r\n",
    b"retr 99999999999999999999\r\n",
    b"\r\n",
    b" \r\n",
]


def test_binary_garbage_gets_err_not_traceback(
    session: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    """NUL, 8-bit, TLS and HTTP bytes, bad numbers: each line one -ERR, the session lives on."""
    with session:
        for line in GARBAGE:
            session.send(line)
            reply = session.line()
            assert reply.startswith(b"-ERR "), (line, reply)
            body = reply[5:]
            # Our text only: the reply never echoes the client's bytes.
            for token in line.split():
                if len(token) > 3:
                    assert token not in body, (line, reply)
            assert session.cmd(b"NOOP") == b"+OK\r\n"  # resets the bad-command count
        assert session.cmd(b"RETR 1").startswith(b"+OK")
        assert session.multiline() == lines(next(iter(TRICKY.values())))
    no_tracebacks(caplog)


def test_random_bytes_never_crash_the_server(
    pop3_server: Pop3TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """256 KB of random bytes: only +OK/-ERR lines come back, and the server still serves."""
    rng = random.Random(1939)
    blob = bytes(rng.getrandbits(8) for _ in range(256 * 1024))
    with RawClient(pop3_server.host, pop3_server.port) as client:
        try:
            client.send(blob)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close on a flood of bad commands
        rest = client.wait_eof(timeout=3)
    for line in rest.split(b"\r\n"):
        assert line == b"" or line.startswith((b"+OK", b"-ERR")), line
    with RawClient(pop3_server.host, pop3_server.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK")
    no_tracebacks(caplog)


def test_pipelined_commands_answered_in_order(session: RawClient) -> None:
    """RFC 2449 PIPELINING: many commands in one write are answered in order, none lost."""
    data = list(TRICKY.values())
    commands = [b"STAT", b"LIST 2", b"UIDL 1", b"RETR 3", b"TOP 1 0", b"NOOP", b"DELE 2",
                b"LIST 2", b"RSET", b"LIST", b"CAPA"] * 5
    with session:
        session.send(b"".join(c + b"\r\n" for c in commands))
        for command in commands:
            status = session.line()
            verb = command.split()[0]
            if command == b"LIST 2" and status.startswith(b"-ERR"):
                continue  # the second LIST 2 comes after DELE 2
            assert status.startswith(b"+OK"), (command, status)
            if verb == b"RETR":
                assert session.multiline() == lines(data[2])
            elif verb == b"TOP":
                assert session.multiline() == lines(data[0])[:3]  # header, blank line
            elif command in (b"LIST", b"CAPA"):
                assert session.multiline()
            elif command == b"STAT":
                assert status == b"+OK %d %d\r\n" % (len(data), sum(len(wire(m)) for m in data))
        assert session.cmd(b"NOOP") == b"+OK\r\n"


def test_pipelined_login_and_quit_in_one_write(pop3_server: Pop3TestServer) -> None:
    """A whole session (USER, PASS, RETR, DELE, QUIT) sent in one write works as if typed."""
    pop3_server.add_message("alice", TRICKY["dots"])
    pop3_server.add_message("alice", TRICKY["plain"])
    with RawClient(pop3_server.host, pop3_server.port) as client:
        client.send(b"CAPA\r\nUSER alice\r\nPASS secret\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n")
        assert client.line().startswith(b"+OK")
        assert client.multiline()
        assert client.line().startswith(b"+OK")
        assert client.line().startswith(b"+OK alice's maildrop has 2 messages")
        assert client.line().startswith(b"+OK")
        assert client.multiline() == lines(TRICKY["dots"])
        assert client.line() == b"+OK message 1 deleted\r\n"
        assert client.line().startswith(b"+OK")
        assert client.wait_eof() == b""
    assert pop3_server.messages("alice") == [TRICKY["plain"]]


def test_twenty_bad_commands_close_the_connection(pop3_server: Pop3TestServer) -> None:
    """20 consecutive bad commands close the connection; 19 do not."""
    with RawClient(pop3_server.host, pop3_server.port) as client:
        client.send(b"BOGUS\r\n" * 19)
        for _ in range(19):
            assert client.line().startswith(b"-ERR ")
        assert client.cmd(b"CAPA").startswith(b"+OK")
        client.multiline()
        client.send(b"BOGUS\r\n" * 20)
        replies = client.wait_eof().split(b"\r\n")
    assert replies[-1] == b""
    assert all(r.startswith(b"-ERR ") for r in replies[:-1])
    assert len(replies) - 1 in (20, 21)  # 20 refusals, maybe a closing notice


# ------------------------------------------------------------------ a huge message

GIB = 1 << 30


def vm_hwm(pid: int) -> int:
    """The process's peak resident set size in octets (/proc/PID/status VmHWM)."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_one_gib_message_streams_in_bounded_memory(serve: ServeFactory) -> None:
    """RETR of a 1 GiB message sends exactly its octets while the server's RSS stays small."""
    proc = serve()
    head = b"Subject: big\n\n"
    tail = b"\n.dot line\nend"
    path = proc.add_message("alice", head)
    try:
        # A sparse file: 1 GiB on the wire, almost nothing on disk.
        with path.open("r+b") as f:
            f.truncate(GIB)
            f.seek(GIB - len(tail))
            f.write(tail)
        wire_size = GIB + 4 + 2  # four LFs become CRLF; no final newline, so CRLF added
        baseline = vm_hwm(proc.pid)
        sock = socket.create_connection((proc.host, proc.port), timeout=30)
        with sock:
            f_in = sock.makefile("rb")
            with f_in:
                assert f_in.readline().startswith(b"+OK")
                sock.sendall(b"USER alice\r\nPASS secret\r\nLIST 1\r\nRETR 1\r\n")
                assert f_in.readline().startswith(b"+OK")
                assert f_in.readline().startswith(b"+OK alice's maildrop has 1 message")
                assert f_in.readline() == b"+OK 1 %d\r\n" % wire_size
                assert f_in.readline() == b"+OK %d octets\r\n" % wire_size
                received = 0
                first = b""
                last = b""
                buf = bytearray(1 << 20)
                view = memoryview(buf)
                expected = wire_size + 1 + 3  # one stuffed dot, then ".\r\n"
                while received < expected:
                    n = f_in.readinto(view[: min(len(buf), expected - received)])
                    assert n, "connection closed early"
                    if received < 64:
                        first += bytes(view[: min(n, 64)])
                    last = (last + bytes(view[max(0, n - 64) : n]))[-64:]
                    received += n
                sock.sendall(b"QUIT\r\n")
                assert f_in.readline().startswith(b"+OK")
        assert first.startswith(b"Subject: big\r\n\r\n\x00\x00")
        assert last.endswith(b"\x00\r\n..dot line\r\nend\r\n.\r\n")
        growth = vm_hwm(proc.pid) - baseline
        print(f"server peak RSS {baseline >> 20} MiB, grew by {growth >> 10} KiB in RETR")
        assert growth < 32 << 20, f"server RSS grew by {growth >> 20} MiB"
    finally:
        for leftover in proc.maildir("alice").glob("*/*"):
            leftover.unlink()  # the 1 GiB file, wherever the server moved it


@pytest.mark.parametrize("with_quit", [True, False], ids=["QUIT", "no-QUIT"])
def test_half_close_finishes_received_commands(
    pop3_server: Pop3TestServer, with_quit: bool
) -> None:
    """Commands sent before the client's EOF are all answered; UPDATE runs only if QUIT came."""
    for data in TRICKY.values():
        pop3_server.add_message("alice", data)
    script = b"USER alice\r\nPASS secret\r\nDELE 1\r\nSTAT\r\n"
    if with_quit:
        script += b"QUIT\r\n"
    with RawClient(pop3_server.host, pop3_server.port) as client:
        client.send(script)
        client.sock.shutdown(socket.SHUT_WR)
        replies = client.wait_eof().split(b"\r\n")
    assert [r[:3] for r in replies[:-1]] == [b"+OK"] * (5 if with_quit else 4), replies
    expected = list(TRICKY.values())[1:] if with_quit else list(TRICKY.values())
    # "+OK ... signing off" is sent after UPDATE, so the Maildir is final by now.
    assert pop3_server.messages("alice") == expected


def test_pipelined_flood_all_answered(pop3_server: Pop3TestServer) -> None:
    """50,000 pipelined NOOPs, written while replies are read: every one answered, in order."""
    n = 50_000
    with RawClient(pop3_server.host, pop3_server.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK")
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                client.send(b"NOOP\r\n" * n + b"STAT\r\n")
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            for _ in range(n):
                assert client.line() == b"+OK\r\n"
            assert client.line() == b"+OK 0 0\r\n"
        finally:
            thread.join(timeout=30)
        assert errors == []


def test_connection_cap_refuses_politely(pop3_server_factory: ServerFactory) -> None:
    """Past max_connections a client gets -ERR [SYS/TEMP] and a close; a slot then frees."""
    srv = pop3_server_factory(max_connections=2)
    first = RawClient(srv.host, srv.port)
    second = RawClient(srv.host, srv.port)
    with first, second:
        assert first.greeting.startswith(b"+OK")
        with RawClient(srv.host, srv.port) as third:
            assert third.greeting.startswith(b"-ERR [SYS/TEMP]")
            assert third.wait_eof() == b""
        assert first.cmd(b"QUIT").startswith(b"+OK")
    assert wait_until(lambda: greets(srv), WAIT), "the slot freed by QUIT never came back"


def test_many_concurrent_sessions(pop3_server: Pop3TestServer) -> None:
    """200 clients connected at once are all greeted and served."""
    pop3_server.add_message("alice", TRICKY["plain"])
    clients = []
    try:
        for _ in range(200):
            clients.append(RawClient(pop3_server.host, pop3_server.port))  # noqa: PERF401
        for client in clients:
            assert client.greeting.startswith(b"+OK")
            assert client.cmd(b"CAPA").startswith(b"+OK")
            client.multiline()
    finally:
        for client in clients:
            client.close()


def test_missing_maildrop_is_one_log_line_and_sys_temp(
    pop3_server: Pop3TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A maildrop that cannot be opened (gone, a broken lock table) is -ERR [SYS/TEMP]
    for the client and one warning naming the cause in the log, not a traceback."""
    shutil.rmtree(pop3_server.maildir("alice"))
    with caplog.at_level(logging.WARNING, logger="pop3d"):
        client = RawClient(pop3_server.host, pop3_server.port)
        with client:
            assert client.login(b"alice", b"secret").startswith(b"-ERR [SYS/TEMP]")
    lines = [r.getMessage() for r in caplog.records if "cannot be opened" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("maildrop of alice cannot be opened: ")
    no_tracebacks(caplog)
