"""Three pop3d nodes behind HAProxy sharing one PostgreSQL: the promises of issue 17.

* a second login to a mailbox through another node gets ``[IN-USE]``;
* a node killed mid-session or mid-UPDATE loses and duplicates nothing, and its
  maildrop locks free within the lease bound;
* LMTP through HAProxy, to whichever node, delivers each message once;
* the database restarted under load costs only ``[SYS/TEMP]`` replies while it is down;
* a login costs at most two database round trips.
"""

from __future__ import annotations

import contextlib
import poplib
import re
import smtplib
import socket
import ssl
import time
from pathlib import Path

import psycopg
import pytest

from .conftest import DEPLOY, LOCK_TTL, Cluster, pop3d

PASSWORD = "s3cret"


def login(port: int, user: str, password: str = PASSWORD) -> poplib.POP3:
    """A POP3 session on 127.0.0.1:``port``, logged in (raises poplib.error_proto)."""
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        client.user(user)
        client.pass_(password)
    except BaseException:
        with contextlib.suppress(OSError):
            client.close()
        raise
    return client


def login_error(port: int, user: str) -> str:
    """The -ERR a login gets ('' when it succeeds; the session is then ended)."""
    try:
        client = login(port, user)
    except poplib.error_proto as exc:
        return str(exc.args[0].decode())
    client.quit()
    return ""


def add_user_cli(cluster: Cluster, name: str) -> None:
    """Add a user with the CLI (ARGON2ID; it also creates their maildrop)."""
    cfg = str(cluster.node_config())
    done = pop3d("user", "add", "--config", cfg, "--password-stdin", name, stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr


def add_user(cluster: Cluster, name: str) -> None:
    """Add a user and their maildrop in SQL, with a {PLAIN} password (cheap logins)."""
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute("INSERT INTO users (username, password) VALUES (%s, %s)",
                     (name, "{PLAIN}" + PASSWORD))
        conn.execute("INSERT INTO mailboxes (name) VALUES (%s)", (name,))


def lmtp_front(cluster: Cluster) -> tuple[str, int]:
    """HAProxy's LMTP address, as deploy/postfix/main.cf's transport names it."""
    text = (DEPLOY / "postfix" / "main.cf").read_text()
    match = re.search(r"^virtual_transport = lmtp:inet:\$LMTP_FRONT$", text, re.MULTILINE)
    assert match, "deploy/postfix/main.cf lost its LMTP transport line"
    return "127.0.0.1", cluster.lmtp_front_port


def deliver(cluster: Cluster, rcpt: str, tags: list[str]) -> None:
    """Deliver one message per tag over LMTP through HAProxy, a connection each."""
    host, port = lmtp_front(cluster)
    for tag in tags:
        with smtplib.LMTP(host, port, timeout=20) as lmtp:
            body = f"Message-ID: <{tag}@test>\r\nSubject: {tag}\r\n\r\nbody of {tag}\r\n"
            refused = lmtp.sendmail("sender@example.org", [rcpt], body.encode())
            assert refused == {}


def message_ids(client: poplib.POP3) -> list[str]:
    """The Message-ID of every message of the session, in order."""
    ids = []
    for number in range(1, len(client.list()[1]) + 1):
        header = client.top(number, 0)[1]
        ids += [line.decode().split("<")[1].split("@")[0] for line in header
                if line.lower().startswith(b"message-id:")]
    return ids


def wait_login(port: int, user: str, bound: float) -> float:
    """Retry a login refused [IN-USE] until it succeeds; return how long it took."""
    start = time.monotonic()
    while True:
        error = login_error(port, user)
        if not error:
            return time.monotonic() - start
        assert "[IN-USE]" in error or "[SYS/TEMP]" in error, error
        assert time.monotonic() - start < bound, f"still locked after {bound} s: {error}"
        time.sleep(0.2)


def test_deploy_schema_is_what_pop3d_ships() -> None:
    """deploy/postgresql/schema.sql is the output of `pop3d db schema`."""
    shipped = pop3d("db", "schema")
    assert shipped.returncode == 0
    assert (DEPLOY / "postgresql" / "schema.sql").read_text() == shipped.stdout


def test_user_cli_and_login_through_haproxy(live: Cluster) -> None:
    """`pop3d user add/passwd/list/del` manage the users table; logins go through HAProxy."""
    add_user_cli(live, "walter")
    cfg = str(live.node_config())
    listing = pop3d("user", "list", "--config", cfg)
    assert "walter\tARGON2ID" in listing.stdout
    for _ in range(3):  # round robin: every node
        assert login_error(live.front_port, "walter") == ""
    changed = pop3d("user", "passwd", "--config", cfg, "--password-stdin", "walter",
                    stdin="new-one\n")
    assert changed.returncode == 0, changed.stderr
    assert "[AUTH]" in login_error(live.front_port, "walter")
    gone = pop3d("user", "del", "--config", cfg, "walter")
    assert gone.returncode == 0
    assert "[AUTH]" in login_error(live.front_port, "walter")


def test_lmtp_through_haproxy_delivers_once(live: Cluster) -> None:
    """Each message sent over LMTP through HAProxy (to all three nodes) arrives once."""
    add_user(live, "lena")
    tags = [f"lmtp{i}" for i in range(12)]
    deliver(live, "lena@example.org", tags)
    client = login(live.front_port, "lena")
    try:
        assert message_ids(client) == tags
    finally:
        client.quit()


def test_second_login_through_another_node_is_in_use(live: Cluster) -> None:
    """A mailbox open on node 1 is [IN-USE] on nodes 2 and 3 and through HAProxy."""
    add_user(live, "ines")
    deliver(live, "ines", ["in-use"])
    first = login(live.nodes[0].pop3_port, "ines")
    try:
        for node in live.nodes[1:]:
            assert "[IN-USE]" in login_error(node.pop3_port, "ines")
        for _ in range(3):
            assert "[IN-USE]" in login_error(live.front_port, "ines")
    finally:
        first.quit()
    assert login_error(live.nodes[1].pop3_port, "ines") == ""


def test_killed_node_loses_nothing_and_frees_its_lock(live: Cluster) -> None:
    """SIGKILL of a node mid-session: no UPDATE happened, the lock frees within the TTL."""
    add_user(live, "kurt")
    tags = [f"kill{i}" for i in range(3)]
    deliver(live, "kurt", tags)
    victim, other = live.nodes[0], live.nodes[1]
    client = login(victim.pop3_port, "kurt")
    client.dele(1)
    client.dele(2)
    victim.kill()
    client.close()
    assert "[IN-USE]" in login_error(other.pop3_port, "kurt")
    wait_login(other.pop3_port, "kurt", bound=3 * LOCK_TTL + 5)
    client = login(other.pop3_port, "kurt")
    try:
        assert message_ids(client) == tags
    finally:
        client.quit()


def test_node_killed_mid_update_is_all_or_nothing(live: Cluster) -> None:
    """A node killed right after QUIT deleted every DELE'd message or none, never a part."""
    add_user(live, "uma")
    victim, other = live.nodes[2], live.nodes[0]
    outcomes = set()
    for round_ in range(2):
        tags = [f"upd{round_}-{i}" for i in range(4)]
        deliver(live, "uma", tags)
        wait_login(other.pop3_port, "uma", bound=3 * LOCK_TTL + 5)
        client = login(victim.pop3_port, "uma")
        for number in range(1, len(tags) + 1):
            client.dele(number)
        client.sock.sendall(b"QUIT\r\n")  # and kill without waiting for the reply
        time.sleep(0.002 * round_)
        victim.kill()
        client.close()
        wait_login(other.pop3_port, "uma", bound=3 * LOCK_TTL + 5)
        after = login(other.pop3_port, "uma")
        try:
            left = message_ids(after)
            assert left in ([], tags), f"partial or duplicated UPDATE: {tags} -> {left}"
            outcomes.add(len(left) == 0)
            for number in range(1, len(left) + 1):
                after.dele(number)
        finally:
            after.quit()
        victim.start()
    assert outcomes  # which way each round went is up to the race


def test_database_restart_costs_only_sys_temp(live: Cluster) -> None:
    """PostgreSQL stopped and started under logins: only [SYS/TEMP] while it is down."""
    add_user(live, "dora")
    deliver(live, "dora", ["db-restart"])
    replies: list[str] = []

    def attempt() -> None:
        try:
            replies.append(login_error(live.front_port, "dora") or "+OK")
        except (OSError, poplib.error_proto) as exc:
            replies.append(f"transport: {exc}")

    # Every node's pool connected first (round robin: three logins in a row touch all
    # three); a loaded machine can take longer than DB_TIMEOUT for a first connection.
    deadline, ok = time.monotonic() + 30, 0
    while ok < 3 and time.monotonic() < deadline:
        ok = ok + 1 if login_error(live.front_port, "dora") == "" else 0
    for _ in range(3):
        attempt()
    live.pg.stop()
    down = len(replies)
    for _ in range(4):
        attempt()
    live.pg.start()
    deadline = time.monotonic() + 30
    while replies[-1] != "+OK" and time.monotonic() < deadline:  # the pool reconnects
        attempt()
        time.sleep(0.2)
    for _ in range(3):
        attempt()
    assert replies[:down] == ["+OK"] * down
    assert all(r == "+OK" or r.startswith("-ERR [SYS/TEMP]") for r in replies), replies
    assert any(r.startswith("-ERR [SYS/TEMP]") for r in replies[down:])
    assert replies[-3:] == ["+OK"] * 3
    logs = "".join(node.log.read_text() for node in live.nodes)
    assert "Traceback" not in logs
    assert "database unavailable" in logs  # one line per outage, no traceback


def test_login_costs_at_most_two_round_trips(live: Cluster) -> None:
    """USER+PASS+STAT: the password query and pop3d_leases; QUIT: the lease release
    (alone here: under load, releases ride on the other sessions' pop3d_leases)."""
    add_user(live, "rita")
    deliver(live, "rita", ["rt1", "rt2"])
    port = live.nodes[1].pop3_port
    assert login_error(port, "rita") == ""  # warm the node's pool
    with psycopg.connect(live.url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
        logins = 10
        for _ in range(logins):
            client = login(port, "rita")
            client.stat()
            client.quit()
        rows = conn.execute(
            "SELECT query, calls FROM pg_stat_statements WHERE query NOT LIKE '%%pg_stat%%' "
            "AND query NOT LIKE '%%WHERE node =%%'"
        ).fetchall()
    calls = {query: int(n) for query, n in rows}
    at_login = sum(n for q, n in calls.items() if "maildrop_leases" not in q)
    at_quit = sum(n for q, n in calls.items() if "DELETE FROM maildrop_leases" in q)
    assert at_login / logins <= 2, calls
    assert at_quit / logins <= 1, calls
    print(f"round trips per login {at_login / logins:.1f}, per QUIT {at_quit / logins:.1f}: "
          f"{calls}")


def test_session_cut_off_past_its_lease_cannot_update(live: Cluster) -> None:
    """A session whose node lost the database for longer than the lease TTL gets
    -ERR [SYS/TEMP] at its next command and deletes nothing, even once the database is
    back."""
    add_user(live, "olga")
    deliver(live, "olga", ["cut1", "cut2"])
    client = login(live.nodes[0].pop3_port, "olga")
    client.dele(1)
    live.pg.stop()
    # Every renewal that succeeded began before the stop returned, so the node's lease
    # lapses within LOCK_TTL of it (one system-wide monotonic clock), and the database's
    # copy then too: started any earlier, the heartbeat could renew it.
    # This waits for that moment, on that clock: no machine is too slow for it.
    try:
        time.sleep(LOCK_TTL + 0.1)
    finally:
        live.pg.start()
    try:
        with pytest.raises(poplib.error_proto) as refused:
            client.stat()  # the next command, whatever it is: no more service
    finally:
        client.close()
    assert refused.value.args[0].startswith(b"-ERR [SYS/TEMP]"), refused.value
    wait_login(live.nodes[1].pop3_port, "olga", bound=3 * LOCK_TTL + 5)
    after = login(live.nodes[1].pop3_port, "olga")
    try:
        assert message_ids(after) == ["cut1", "cut2"]
    finally:
        after.quit()


def wait_for_log(node_log: Path, text: str, bound: float) -> None:
    """Wait until ``text`` appears in a node's log (bounded)."""
    deadline = time.monotonic() + bound
    while text not in node_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not logged within {bound} s"
        time.sleep(0.05)


def hold_login(port: int, user: str, bound: float = 20.0) -> poplib.POP3:
    """A login kept open, retried while the node's pool reconnects ([SYS/TEMP])."""
    deadline = time.monotonic() + bound
    while True:
        try:
            return login(port, user)
        except poplib.error_proto as exc:
            if b"[SYS/TEMP]" not in exc.args[0] or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def test_session_whose_lease_was_taken_stops_serving(live: Cluster) -> None:
    """The lease row expired under an open session and another node took the maildrop:
    the first session's next command is -ERR [SYS/TEMP], its connection closes, and its
    DELE is never applied."""
    add_user(live, "lisa")
    deliver(live, "lisa", ["lost1", "lost2"])
    first = hold_login(live.nodes[0].pop3_port, "lisa")
    first.dele(1)
    assert first.stat()[0] == 1
    with psycopg.connect(live.url, autocommit=True) as conn:  # as if its node had stalled
        conn.execute("UPDATE maildrop_leases SET expires = clock_timestamp() - "
                     "interval '1 second' WHERE mailbox = 'lisa'")
    second = hold_login(live.nodes[1].pop3_port, "lisa")  # takes the expired lease over
    try:
        wait_for_log(live.nodes[0].log, "lease of lisa lost", bound=3 * LOCK_TTL)
        with pytest.raises(poplib.error_proto) as refused:
            first.stat()
        assert refused.value.args[0].startswith(b"-ERR [SYS/TEMP]"), refused.value
        assert first.file.readline() == b""  # closed by the node
        first.close()
        assert message_ids(second) == ["lost1", "lost2"]
    finally:
        second.quit()
    again = login(live.nodes[2].pop3_port, "lisa")
    try:
        assert message_ids(again) == ["lost1", "lost2"]
    finally:
        again.quit()


#: The client address each PROXY variant's test connects from (all loopback).
CLIENT_SOURCES = {"send-proxy-v2": "127.0.0.21", "send-proxy": "127.0.0.22",
                  "send-proxy-v2-ssl": "127.0.0.23"}


@pytest.mark.parametrize("variant", list(CLIENT_SOURCES))
def test_nodes_see_the_real_client_address(live: Cluster, variant: str) -> None:
    """Through each HAProxy of deploy/haproxy/haproxy.cfg (PROXY v2, v1, v2 with TLS ended
    at HAProxy), the node's session line and its failed-login line (the address the
    penalty counts) name the client's address, not HAProxy's 127.0.0.2."""
    name = f"px-{variant}"
    add_user(live, name)
    source = CLIENT_SOURCES[variant]
    raw = socket.create_connection(("127.0.0.1", live.fronts[variant]), 20,
                                   source_address=(source, 0))
    if variant.endswith("-ssl"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        raw = context.wrap_socket(raw, server_hostname="localhost")
    port = raw.getsockname()[1]
    with raw, raw.makefile("rb") as replies:
        assert replies.readline().startswith(b"+OK")
        for line, expect in ((f"USER {name}", b"+OK"), ("PASS wrong", b"-ERR [AUTH]"),
                             (f"USER {name}", b"+OK"), (f"PASS {PASSWORD}", b"+OK"),
                             ("QUIT", b"+OK")):
            raw.sendall(line.encode() + b"\r\n")
            assert replies.readline().startswith(expect), line
    logs = [node.log for node in live.nodes]
    wait_for_any_log(logs, f"session peer={source}:{port} user={name}", bound=20)
    wait_for_any_log(logs, f'auth failed: user="{name}" rip={source} ', bound=20)


def wait_for_any_log(node_logs: list[Path], text: str, bound: float) -> None:
    """Wait until ``text`` appears in one of the nodes' logs (bounded)."""
    deadline = time.monotonic() + bound
    while not any(text in log.read_text(errors="replace") for log in node_logs):
        assert time.monotonic() < deadline, f"{text!r} not logged within {bound} s"
        time.sleep(0.05)
