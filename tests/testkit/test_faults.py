"""Each fault of the catalogue met by real clients: poplib, curl and fetchmail.

What each client does is asserted as observed (curl 7.88, fetchmail 6.4, Python's poplib):
some of it is a client bug the fault exists to show (curl takes a cut RETR for a whole
message), the rest is the handling a client's own tests should expect.
"""

from __future__ import annotations

import poplib
import socket
import ssl
from pathlib import Path
from types import TracebackType
from typing import cast

import pytest

from pop3d.testing.scripted import ScriptedPop3Server

from .clients import curl, fetchmail

pytestmark = [pytest.mark.timeout(60), pytest.mark.client]

BODY_ONE = "Subject: one\n\nbody one\n"


@pytest.fixture
def srv(pop3_server: ScriptedPop3Server) -> ScriptedPop3Server:
    pop3_server.deliver("alice", BODY_ONE)
    pop3_server.deliver("alice", "Subject: two\n\nbody two\n")
    return pop3_server


def _refused(call: object, text: str) -> None:
    """``call()`` raises poplib.error_proto whose reply contains ``text``."""
    with pytest.raises(poplib.error_proto) as caught:
        call()  # type: ignore[operator]
    tb: TracebackType | None = caught.tb
    while tb is not None:  # a constructor that raised leaves its socket open: close it
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, poplib.POP3) and tb.tb_frame.f_code.co_name == "__init__":
            owner.close()
        tb = tb.tb_next
    reply = caught.value.args[0]
    assert text in (reply.decode() if isinstance(reply, bytes) else reply)


def _poplib_login(srv: ScriptedPop3Server, timeout: float = 10) -> poplib.POP3:
    client = poplib.POP3(srv.host, srv.port, timeout=timeout)
    try:
        client.user("alice")
        client.pass_(srv.password("alice"))
    except BaseException:
        client.close()
        raise
    return client


@pytest.mark.parametrize(
    ("code", "fetchmail_status"),
    [("AUTH", 3), ("IN-USE", 9), ("SYS/TEMP", 9), ("LOGIN-DELAY", 9), ("SYS/PERM", 9)],
)
def test_login_refusals(srv: ScriptedPop3Server, tmp_path: Path, code: str,
                        fetchmail_status: int) -> None:
    srv.faults.add("login", code=code, user="alice")
    _refused(lambda: _poplib_login(srv), f"[{code}]")
    assert curl(srv, "alice", "1").status == 67  # "Login denied", whatever the code
    run, got = fetchmail(srv, "alice", tmp_path / "fm")
    assert (run.status, got) == (fetchmail_status, [])  # 3 AUTHFAIL, 9 LOCKBUSY
    assert f"[{code}]" in run.err
    assert len(srv.mailbox("alice")) == 2


def test_login_fault_for_one_user_and_times(srv: ScriptedPop3Server, tmp_path: Path) -> None:
    srv.faults.add("login", code="IN-USE", user="alice", times=1)
    srv.deliver("bob", BODY_ONE)
    srv.client("bob").quit()  # another user: untouched
    _refused(lambda: _poplib_login(srv), "IN-USE")
    run, got = fetchmail(srv, "alice", tmp_path / "fm", "keep")  # the retry succeeds
    assert run.status == 0
    assert len(got) == 2


def test_cut_retr(srv: ScriptedPop3Server, tmp_path: Path) -> None:
    srv.faults.add("cut_retr", after=20)
    client = _poplib_login(srv)
    _refused(lambda: client.retr(1), "EOF")
    client.close()
    srv.wait_idle()
    # curl's bug: a RETR cut short is a success (exit 0) with a truncated message.
    run = curl(srv, "alice", "1")
    assert run.status == 0
    assert run.out == "Subje"
    srv.wait_idle()
    run, got = fetchmail(srv, "alice", tmp_path / "fm")  # nokeep: must delete nothing
    assert (run.status, got) == (2, [])
    srv.wait_idle()
    assert len(srv.mailbox("alice")) == 2


def test_latency(srv: ScriptedPop3Server, tmp_path: Path) -> None:
    srv.faults.add("latency", command="RETR", seconds=3)
    client = _poplib_login(srv, timeout=0.5)
    assert client.stat()[0] == 2  # other commands answer at once
    with pytest.raises(TimeoutError):
        client.retr(1)
    client.close()
    assert curl(srv, "alice", "1", timeout=0.5).status == 28
    srv.faults.add("latency", command="STAT", seconds=3)
    run, got = fetchmail(srv, "alice", tmp_path / "fm", timeout=1)
    assert (run.status, got) == (2, [])
    assert "timeout" in run.out + run.err
    srv.faults.clear()
    srv.wait_idle()
    assert len(srv.mailbox("alice")) == 2


def test_latency_short_is_only_slow(srv: ScriptedPop3Server) -> None:
    srv.faults.add("latency", seconds=0.05)
    client = _poplib_login(srv)
    assert client.retr(2)[1][-1] == b"body two"
    client.quit()
    assert "reply delayed" in str(srv.transcript)


def test_list_size(srv: ScriptedPop3Server, tmp_path: Path) -> None:
    srv.faults.add("list_size", delta=50)
    client = _poplib_login(srv)
    sizes = [int(line.split()[1]) for line in client.list()[1]]
    one = cast("bytes", client.list(1))  # typeshed: a tuple, as LIST without an argument
    assert int(one.split()[2]) == sizes[0]
    assert client.retr(1)[1][-1] == b"body one"  # poplib reads to the terminator
    client.quit()
    assert curl(srv, "alice", "1").out == BODY_ONE
    assert "1 76" in curl(srv, "alice", "").out
    run, got = fetchmail(srv, "alice", tmp_path / "fm", "keep")
    assert run.status == 0
    assert len(got) == 2
    assert got[0].endswith(b"body one\n")


def test_uidl_duplicate(srv: ScriptedPop3Server, tmp_path: Path) -> None:
    srv.faults.add("uidl_duplicate")
    client = _poplib_login(srv)
    uids = [line.split()[1] for line in client.uidl()[1]]
    client.quit()
    assert uids[0] == uids[1]
    run = curl(srv, "alice", "", "-X", "UIDL")
    assert run.out.count(uids[0].decode()) == 2
    run, got = fetchmail(srv, "alice", tmp_path / "fm", "keep")
    assert run.status == 0
    assert len(got) == 2
    run, got = fetchmail(srv, "alice", tmp_path / "fm", "keep")  # both uids "seen"
    assert run.status == 1
    assert len(got) == 2


def test_uidl_change(srv: ScriptedPop3Server, tmp_path: Path) -> None:
    srv.faults.add("uidl_change")
    seen = []
    for _ in range(2):
        client = _poplib_login(srv)
        seen.append(client.uidl()[1])
        client.quit()
        srv.wait_idle()
    assert seen[0] != seen[1]
    assert curl(srv, "alice", "", "-X", "UIDL").out != curl(srv, "alice", "", "-X", "UIDL").out
    # fetchmail with keep fetches everything again: every uid is new each time.
    work = tmp_path / "fm"
    assert fetchmail(srv, "alice", work, "keep")[0].status == 0
    run, got = fetchmail(srv, "alice", work, "keep")
    assert run.status in (0, 1)
    assert len(got) >= 2


def test_garbage_greeting(srv: ScriptedPop3Server, tmp_path: Path) -> None:
    srv.faults.add("garbage")
    _refused(lambda: poplib.POP3(srv.host, srv.port, timeout=10), "garbage")
    assert curl(srv, "alice", "1", timeout=1).status == 28  # waits for a greeting
    run, got = fetchmail(srv, "alice", tmp_path / "fm")
    assert (run.status, got) == (4, [])  # PROTOCOL


def test_garbage_reply(srv: ScriptedPop3Server) -> None:
    srv.faults.add("garbage", command="STAT", text="OK maybe")
    client = _poplib_login(srv)
    _refused(client.stat, "OK maybe")
    client.quit()


def test_overlong_lines(srv: ScriptedPop3Server, tmp_path: Path) -> None:
    srv.faults.add("overlong", length=4096)
    _refused(lambda: poplib.POP3(srv.host, srv.port, timeout=10), "line too long")
    assert curl(srv, "alice", "1").out == BODY_ONE  # curl takes it
    run, got = fetchmail(srv, "alice", tmp_path / "fm")
    assert (run.status, got) == (2, [])
    assert len(srv.mailbox("alice")) == 2


@pytest.mark.parametrize("hidden", ["UIDL", "TOP"])
def test_capa_hide_command(srv: ScriptedPop3Server, tmp_path: Path, hidden: str) -> None:
    srv.faults.add("capa", hide=[hidden], add=["XTEST"])
    client = _poplib_login(srv)
    caps = client.capa()
    assert hidden not in caps
    assert "XTEST" in caps
    _refused(client.uidl if hidden == "UIDL" else lambda: client.top(1, 0), "unknown command")
    client.quit()
    command = "UIDL" if hidden == "UIDL" else "TOP 1 0"
    assert curl(srv, "alice", "", "-X", command).status == 8  # weird server reply
    run, got = fetchmail(srv, "alice", tmp_path / "fm", "keep")
    assert run.status == 0
    assert len(got) == 2


def test_capa_hide_stls_and_sasl(srv: ScriptedPop3Server, tmp_path: Path) -> None:
    srv.faults.add("capa", hide=["STLS", "SASL PLAIN"])
    client = poplib.POP3(srv.host, srv.port, timeout=10)
    caps = client.capa()
    assert "STLS" not in caps
    assert "PLAIN" not in caps.get("SASL", [])
    _refused(lambda: client.stls(srv.client_context()), "STLS")
    client.quit()
    assert curl(srv, "alice", "", "--ssl-reqd").status == 64  # refuses cleartext: good
    assert curl(srv, "alice", "", "--login-options", "AUTH=PLAIN").status != 0
    run, got = fetchmail(srv, "alice", tmp_path / "fm", tls="stls")
    assert (run.status, got) == (2, [])  # no STLS, no login: good


def test_capa_hidden_entirely(srv: ScriptedPop3Server, tmp_path: Path) -> None:
    srv.faults.add("capa", hide=["CAPA"])
    client = _poplib_login(srv)
    with pytest.raises(poplib.error_proto):
        client.capa()
    client.quit()
    assert curl(srv, "alice", "1").out == BODY_ONE  # an RFC 1939 server is fine
    # fetchmail 6.4 without CAPA does not log in at all (AUTHFAIL): what it would do
    # against an RFC 1939-only server.
    run, got = fetchmail(srv, "alice", tmp_path / "fm", "keep")
    assert (run.status, got) == (3, [])


@pytest.mark.parametrize("problem", ["expired", "wrong-host"])
def test_certificate(srv: ScriptedPop3Server, tmp_path: Path, problem: str) -> None:
    srv.faults.add("certificate", problem=problem)
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(srv.host, srv.tls_port, timeout=10, context=srv.client_context())
    assert curl(srv, "alice", "1", scheme="pop3s").status == 60
    run, got = fetchmail(srv, "alice", tmp_path / "fm", tls="implicit")
    assert (run.status, got) == (2, [])
    srv.faults.clear()  # the good certificate is back
    client = srv.client("alice", tls="implicit")
    client.quit()


def test_faults_change_while_a_session_runs(srv: ScriptedPop3Server) -> None:
    client = _poplib_login(srv)
    fault = srv.faults.add("garbage", command="NOOP", text="-ERR nope")
    with pytest.raises(poplib.error_proto):
        client.noop()
    srv.faults.remove(fault)
    assert client.noop().startswith(b"+OK")
    client.quit()
    with socket.create_connection((srv.host, srv.port), timeout=5) as s:
        assert s.recv(100).startswith(b"+OK")
