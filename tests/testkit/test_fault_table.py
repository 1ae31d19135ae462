"""The fault table: what a fault may say, whom it hits, how often; and where it acts."""

from __future__ import annotations

import poplib

import pytest

import pop3d.testing
from pop3d.server.context import ServerContext
from pop3d.testing import Pop3TestServer
from pop3d.testing.faults import FaultError, FaultTable, parse
from pop3d.testing.scripted import ScriptedPop3Server

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"kind": "nope"}, "kind must be one of"),
        ({"kind": "login", "code": "MAYBE"}, "code must be one of"),
        ({"kind": "latency", "seconds": -1}, "seconds must be between"),
        ({"kind": "latency", "seconds": True}, "seconds must be a number"),
        ({"kind": "cut_retr", "after": 1.5}, "after must be an integer"),
        ({"kind": "capa"}, "capa needs hide or add"),
        ({"kind": "capa", "hide": ["APOP"]}, "cannot hide"),
        ({"kind": "capa", "add": ["X\r\nY"]}, "one-line strings"),
        ({"kind": "capa", "hide": ["STLS"], "user": "alice"}, "takes no user"),
        ({"kind": "certificate", "problem": "revoked"}, "problem must be one of"),
        ({"kind": "overlong", "length": 100}, "length must be between"),
        ({"kind": "garbage", "text": "a\nb"}, "one-line string"),
        ({"kind": "login", "times": 0}, "times must be between"),
        ({"kind": "uidl_change", "colour": "red"}, "unknown parameter(s) of uidl_change"),
    ],
)
def test_bad_faults_are_refused_clearly(spec: dict[str, object], complaint: str) -> None:
    with pytest.raises(FaultError) as refused:
        parse(spec)
    assert complaint in str(refused.value)


def test_defaults_and_json_round_trip() -> None:
    fault = parse({"kind": "garbage", "command": "stat"})
    assert fault.params["command"] == "STAT"
    again = parse(fault.to_json())
    assert (again.kind, again.params, again.user, again.times) == (
        fault.kind, fault.params, fault.user, fault.times)


def test_take_counts_times_and_respects_user() -> None:
    table = FaultTable()
    changes: list[int] = []
    table.on_change = lambda: changes.append(len(table))
    table.add("login", code="IN-USE", user="alice", times=2)
    assert table.take("login", "bob") is None
    assert table.take("login", "alice") is not None
    assert table.take("login", "alice") is not None
    assert table.take("login", "alice") is None  # used up, gone
    assert len(table) == 0
    forever = table.add("latency", seconds=0.1)
    assert table.take("latency", "anyone") is forever
    assert table.take("latency", None) is forever
    assert table.remove(forever)
    assert not table.remove(forever)
    assert changes == [1, 1, 0]  # add, add, remove (the used-up fault goes silently)


def test_wire_faults_hit_only_the_named_user(pop3_server: ScriptedPop3Server) -> None:
    for user in ("alice", "bob"):
        pop3_server.deliver(user, "Subject: s\n\nsized\n")
    pop3_server.faults.add("list_size", delta=1000, user="bob")
    sizes = {}
    for user in ("alice", "bob"):
        client = pop3_server.client(user)
        sizes[user] = int(client.list()[1][0].split()[1])
        client.quit()
    assert sizes["bob"] == sizes["alice"] + 1000


def test_production_server_has_no_wire(tmp_path: object) -> None:
    """Only the test server installs a wire: a plain server's context has none."""
    assert ServerContext.wire is None
    with Pop3TestServer(str(tmp_path), users={"alice": "pw"}) as srv:
        assert srv.context is not None
        assert type(srv.context) is ServerContext
        assert srv.context.wire is None
        client = poplib.POP3(srv.host, srv.port, timeout=10)
        client.quit()
    assert pop3d.testing.ScriptedPop3Server is ScriptedPop3Server
