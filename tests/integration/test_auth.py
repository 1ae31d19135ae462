"""Authentication over a real socket: no user enumeration, a delay that blocks no one,
a passwd-file re-read on change, and no password ever in the log.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time

import pytest

from pop3d.testing import Pop3TestServer

from .helpers import WAIT, RawClient, ServeFactory, ServerFactory

pytestmark = pytest.mark.timeout(60)


def attempt(srv: Pop3TestServer, user: bytes, password: bytes) -> tuple[bytes, bytes]:
    """USER + PASS on a fresh connection; return both replies."""
    with RawClient(srv.host, srv.port) as client:
        return client.cmd(b"USER " + user), client.cmd(b"PASS " + password)


def test_unknown_user_and_wrong_password_get_identical_replies(
    pop3_server: Pop3TestServer,
) -> None:
    """USER is +OK for anyone, and PASS fails with the same bytes for unknown user or password."""
    wrong_password = attempt(pop3_server, b"alice", b"not-her-password")
    unknown_user = attempt(pop3_server, b"mallory", b"not-her-password")
    assert wrong_password == unknown_user
    assert wrong_password[0].startswith(b"+OK")
    assert wrong_password[1] == b"-ERR [AUTH] invalid password\r\n"


def test_apop_unknown_user_and_wrong_digest_identical(pop3_server_factory: ServerFactory) -> None:
    """With APOP on, a wrong digest and an unknown user get the same -ERR."""
    srv = pop3_server_factory(apop=True)
    replies = []
    for user in (b"alice", b"mallory"):
        with RawClient(srv.host, srv.port) as client:
            match = re.search(rb"<[^>]+>", client.greeting)
            assert match
            digest = hashlib.md5(match.group() + b"wrong").hexdigest().encode()
            replies.append(client.cmd(b"APOP " + user + b" " + digest))
    assert replies[0] == replies[1]
    assert replies[0].startswith(b"-ERR")


def test_three_failed_logins_close_the_connection(pop3_server: Pop3TestServer) -> None:
    """After repeated failed logins on one connection the server hangs up."""
    with RawClient(pop3_server.host, pop3_server.port) as client:
        for _ in range(3):
            assert client.cmd(b"USER alice").startswith(b"+OK")
            assert client.cmd(b"PASS wrong").startswith(b"-ERR")
        farewell = client.wait_eof()  # bounded: fails the test if the server never hangs up
    assert farewell == b"" or re.fullmatch(rb"-ERR [^\r\n]*\r\n", farewell), farewell


def test_failure_delay_blocks_no_other_session(pop3_server_factory: ServerFactory) -> None:
    """A failed PASS is answered after the delay; meanwhile another session is served.

    Bob's NOOP is answered while Alice's refusal is still held: the order of the replies
    says it, not a stopwatch.  The delay itself is a lower bound, which a slow machine
    cannot break.
    """
    srv = pop3_server_factory(failure_delay=1.0)
    with RawClient(srv.host, srv.port) as bob, RawClient(srv.host, srv.port) as alice:
        assert bob.login(b"bob", b"hunter2").startswith(b"+OK")
        assert alice.cmd(b"USER alice").startswith(b"+OK")
        start = time.monotonic()
        alice.send(b"PASS wrong\r\n")
        assert bob.cmd(b"NOOP") == b"+OK\r\n"
        assert not alice.has_data()  # Alice's refusal is still held
        assert alice.line().startswith(b"-ERR")
        alice_answered = time.monotonic() - start
    assert alice_answered >= 0.95, alice_answered


def test_good_login_is_not_delayed(pop3_server_factory: ServerFactory) -> None:
    """The failure delay applies only to failures: a right password is answered at once.

    The delay is far longer than the client waits for a reply (its read timeout), so a
    delayed answer fails the login.
    """
    srv = pop3_server_factory(failure_delay=600)
    with RawClient(srv.host, srv.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK")


def login_within(srv: Pop3TestServer, user: bytes, password: bytes) -> None:
    """Poll (bounded) until ``user`` can log in: the server re-reads the file on its own."""
    deadline = time.monotonic() + WAIT
    while True:
        reply = attempt(srv, user, password)[1]
        if reply.startswith(b"+OK"):
            return
        assert time.monotonic() < deadline, f"{user!r} never accepted: {reply!r}"
        time.sleep(0.05)


def test_passwd_file_reread_when_changed(pop3_server: Pop3TestServer) -> None:
    """A user added and a password changed in the passwd-file work without a restart."""
    pop3_server.set_user("carol", "c4rol")
    login_within(pop3_server, b"carol", b"c4rol")
    pop3_server.set_user("alice", "new-secret")
    login_within(pop3_server, b"alice", b"new-secret")
    assert attempt(pop3_server, b"alice", b"secret")[1].startswith(b"-ERR")


PASSWORD = "Zebra-Quartz-91731"
WRONG = "Wrong-Xylophone-5521"


def test_no_password_in_log(serve: ServeFactory) -> None:
    """Neither a right nor a wrong password (plain or base64) ever appears in the log."""
    proc = serve(users={"alice": PASSWORD}, extra_args=["--log-level", "DEBUG"])
    proc.add_message("alice", b"Subject: x\n\nbody\n")
    with RawClient(proc.host, proc.port) as client:
        assert client.login(b"alice", WRONG.encode()).startswith(b"-ERR")
        assert client.login(b"alice", PASSWORD.encode()).startswith(b"+OK")
        assert client.cmd(b"QUIT").startswith(b"+OK")
    plain = base64.b64encode(b"\0alice\0" + PASSWORD.encode())
    with RawClient(proc.host, proc.port) as client:
        # SASL PLAIN, when offered; either way the bytes must not be logged
        client.cmd(b"AUTH PLAIN " + plain)
        client.cmd(b"QUIT")
    with RawClient(proc.host, proc.port) as client:
        client.cmd(b"PASS " + WRONG.encode())  # PASS without USER
        client.cmd(b"USER " + b"alice")
        client.send(b"PASS " + PASSWORD.encode() + b"x" * 300 + b"\r\n")  # overlong
        client.line()
    assert proc.stop() == 0
    log = proc.log_text()
    assert "session peer=" in log  # the log did record the sessions
    for secret in (PASSWORD, WRONG, plain.decode(), base64.b64encode(PASSWORD.encode()).decode()):
        assert secret not in log, secret
