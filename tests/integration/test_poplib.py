"""Python's poplib (stdlib) against pop3d: every RFC 1939 command, APOP, CAPA."""

from __future__ import annotations

import base64
import hashlib
import poplib
import re
from collections.abc import Callable

import pytest

from pop3d.testing import Pop3TestServer

from .helpers import ServerFactory
from .messages import TRICKY, lines, wire

pytestmark = pytest.mark.timeout(60)


def refused(call: Callable[[], object]) -> bytes:
    """Run a poplib call that must fail; return the server's -ERR line."""
    with pytest.raises(poplib.error_proto) as info:
        call()
    reply = info.value.args[0]
    assert isinstance(reply, bytes)
    assert reply.startswith(b"-ERR ")
    return reply


def connect(srv: Pop3TestServer, user: str = "alice", password: str = "secret") -> poplib.POP3:
    client = poplib.POP3(srv.host, srv.port, timeout=10)
    client.user(user)
    client.pass_(password)
    return client


@pytest.fixture
def loaded(pop3_server: Pop3TestServer) -> Pop3TestServer:
    for data in TRICKY.values():
        pop3_server.add_message("alice", data)
    return pop3_server


def test_login_reports_count_and_size(loaded: Pop3TestServer) -> None:
    """PASS answers with the seed's summary: count and exact wire octets."""
    client = poplib.POP3(loaded.host, loaded.port, timeout=10)
    try:
        assert client.getwelcome().startswith(b"+OK")
        client.user("alice")
        reply = client.pass_("secret")
        total = sum(len(wire(m)) for m in TRICKY.values())
        assert reply == f"+OK alice's maildrop has {len(TRICKY)} messages ({total} octets)".encode()
    finally:
        client.quit()


def test_stat_and_list_give_wire_sizes(loaded: Pop3TestServer) -> None:
    """STAT/LIST sizes are the CRLF octet counts of each message, in delivery order."""
    client = connect(loaded)
    try:
        sizes = [len(wire(m)) for m in TRICKY.values()]
        assert client.stat() == (len(sizes), sum(sizes))
        _, listing, _ = client.list()
        assert listing == [b"%d %d" % (i + 1, s) for i, s in enumerate(sizes)]
        one: object = client.list(2)  # with an argument, poplib returns the status line
        assert one == b"+OK 2 %d" % sizes[1]
    finally:
        client.quit()


def test_retr_returns_every_message_byte_for_byte(loaded: Pop3TestServer) -> None:
    """RETR sends each stored message intact (poplib un-stuffs), with the listed octet count."""
    client = connect(loaded)
    try:
        for n, data in enumerate(TRICKY.values(), start=1):
            reply, got, octets = client.retr(n)
            assert got == lines(data), n
            assert reply.startswith(b"+OK")
            assert octets == len(wire(data))  # poplib counts un-stuffed octets
    finally:
        client.quit()


def test_uidl_is_stable_and_valid(loaded: Pop3TestServer) -> None:
    """UIDL values are unique, 1-70 chars of 0x21-0x7E, and the same in the next session."""
    client = connect(loaded)
    first = client.uidl()[1]
    one = client.uidl(1)
    client.quit()
    uids = [line.split(b" ", 1)[1] for line in first]
    assert len(set(uids)) == len(uids) == len(TRICKY)
    for uid in uids:
        assert re.fullmatch(rb"[\x21-\x7e]{1,70}", uid)
    assert one == b"+OK 1 " + uids[0]
    client = connect(loaded)
    try:
        assert client.uidl()[1] == first
    finally:
        client.quit()


def test_top_sends_headers_and_n_body_lines(loaded: Pop3TestServer) -> None:
    """TOP n k returns the header, the blank line and k body lines, un-stuffed."""
    client = connect(loaded)
    try:
        dots = list(TRICKY).index("dots") + 1
        assert client.top(dots, 0)[1] == [b"Subject: dots", b""]
        assert client.top(dots, 3)[1] == [b"Subject: dots", b"", b".leading dot", b"..two dots",
                                          b"."]
        assert client.top(dots, 1000)[1] == lines(TRICKY["dots"])
    finally:
        client.quit()


def test_dele_quit_removes_only_deleted(loaded: Pop3TestServer) -> None:
    """DELE marks; QUIT (UPDATE) removes exactly the marked messages from the Maildir."""
    client = connect(loaded)
    client.dele(1)
    client.dele(3)
    refused(lambda: client.retr(1))
    refused(lambda: client.dele(1))
    assert client.stat()[0] == len(TRICKY) - 2
    assert b"signing off" in client.quit()
    remaining = [d for i, d in enumerate(TRICKY.values(), start=1) if i not in (1, 3)]
    assert loaded.messages("alice") == remaining


def test_rset_undeletes(loaded: Pop3TestServer) -> None:
    """RSET restores messages marked deleted; QUIT then removes nothing."""
    client = connect(loaded)
    client.dele(1)
    client.dele(2)
    assert client.rset().startswith(b"+OK")
    assert client.stat()[0] == len(TRICKY)
    assert client.retr(1)[1] == lines(TRICKY["plain"])
    client.quit()
    assert loaded.messages("alice") == list(TRICKY.values())


def test_noop_and_errors_keep_session(loaded: Pop3TestServer) -> None:
    """NOOP is +OK; RETR of a missing number is -ERR and the session goes on."""
    client = connect(loaded)
    try:
        assert client.noop().startswith(b"+OK")
        for bad in ("0", str(len(TRICKY) + 1), "+1", "1_0", "abc"):
            refused(lambda bad=bad: client.retr(bad))  # type: ignore[misc]
        assert client.stat()[0] == len(TRICKY)
    finally:
        client.quit()


def test_capa_lists_extensions(pop3_server: Pop3TestServer) -> None:
    """CAPA (RFC 2449) advertises TOP, UIDL, RESP-CODES, PIPELINING, USER, IMPLEMENTATION."""
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    try:
        caps = client.capa()
        for name in ("TOP", "UIDL", "RESP-CODES", "PIPELINING", "USER", "AUTH-RESP-CODE"):
            assert name in caps, name
        assert caps["EXPIRE"] == ["NEVER"]
        assert caps["IMPLEMENTATION"][0] == "pop3d"
        assert "STLS" not in caps  # no [tls] section
        client.user("alice")
        client.pass_("secret")
        assert "USER" in client.capa()  # RFC 2449 §5: announced in both states
    finally:
        client.quit()


def test_quit_in_authorization_is_ok(pop3_server: Pop3TestServer) -> None:
    """QUIT before login signs off without touching any maildrop."""
    pop3_server.add_message("alice", TRICKY["plain"])
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    assert client.quit().startswith(b"+OK")
    assert pop3_server.messages("alice") == [TRICKY["plain"]]


def test_apop_with_plain_password(pop3_server_factory: ServerFactory) -> None:
    """[auth] apop = true: the greeting has a timestamp and APOP logs in a PLAIN user."""
    srv = pop3_server_factory(apop=True)
    srv.add_message("alice", TRICKY["plain"])
    client = poplib.POP3(srv.host, srv.port, timeout=10)
    try:
        assert re.search(rb"<[\x21-\x7e]+@[\x21-\x7e]+>", client.getwelcome())
        assert client.apop("alice", "secret").startswith(b"+OK alice's maildrop has 1 message")
        assert client.retr(1)[1] == lines(TRICKY["plain"])
    finally:
        client.quit()


def test_apop_refused_for_hashed_password(pop3_server_factory: ServerFactory) -> None:
    """APOP of a user whose password is hashed is refused cleanly; PASS still works."""
    digest = hashlib.sha256(b"s3cret").digest()
    stored = "{SHA256}" + base64.b64encode(digest).decode()
    srv = pop3_server_factory(apop=True, users={"carol": stored})
    client = poplib.POP3(srv.host, srv.port, timeout=10)
    try:
        assert refused(lambda: client.apop("carol", "s3cret")) == b"-ERR [AUTH] invalid password"
        assert client.user("carol").startswith(b"+OK")
        assert client.pass_("s3cret").startswith(b"+OK")
    finally:
        client.quit()


def test_apop_not_offered_by_default(pop3_server: Pop3TestServer) -> None:
    """Without [auth] apop, the greeting has no timestamp and APOP is -ERR."""
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    try:
        assert b"<" not in client.getwelcome()
        client.sock.sendall(b"APOP alice 0123456789abcdef0123456789abcdef\r\n")
        assert client.file.readline().startswith(b"-ERR ")
    finally:
        client.quit()
