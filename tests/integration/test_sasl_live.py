"""SASL AUTH over real sockets with real clients; EXTERNAL; brute-force defences."""

from __future__ import annotations

import base64
import logging
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pop3d.auth.schemes import hash_password
from pop3d.session import FailureDelays
from pop3d.testing import Pop3TestServer
from tests.integration.helpers import RawClient, need
from tests.integration.tls_support import Pki, TlsRawClient, make_pki

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"Subject: sasl\r\n\r\nauthenticated hello\r\n"
USERS = {
    "alice": "secret",
    "carol": hash_password("SCRAM-SHA-256", b"scram pw"),  # Dovecot's {SCRAM-SHA-256} form
    "dave": hash_password("SHA512-CRYPT", b"crypt pw"),  # no CRAM-MD5/SCRAM secret possible
    "erin@example.org": "erin pw",
}

Factory = Callable[..., Pop3TestServer]

#: Every mechanism pop3d has (the default offers only PLAIN, LOGIN and EXTERNAL).
ALL_MECHANISMS = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "EXTERNAL"]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def server(pop3_server_factory: Factory, pki: Pki) -> Pop3TestServer:
    """STLS on the cleartext port, POP3S on ``tls_port``, client certificates from ``pki``."""
    srv = pop3_server_factory(
        users=USERS,
        sections={"tls": pki.tls_section(client_ca=str(pki.ca_file))},
        tls_listen=["127.0.0.1:0"],
        mechanisms=ALL_MECHANISMS,
    )
    for user in USERS:
        srv.add_message(user, MESSAGE)
    return srv


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --------------------------------------------------------------------------- curl


@pytest.mark.client
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest.mark.parametrize("sasl_ir", [False, True])
def test_curl_sasl_over_stls(
    server: Pop3TestServer, pki: Pki, mechanism: str, sasl_ir: bool
) -> None:
    """curl logs in with each mechanism it knows, with and without initial responses."""
    curl = need("curl")
    done = subprocess.run(
        [curl, "-s", "-S", "-v", "--max-time", "20", "--ssl-reqd", "--cacert", str(pki.ca_file),
         "-u", "alice:secret", "--login-options", f"AUTH={mechanism}",
         *(["--sasl-ir"] if sasl_ir else []), f"pop3://127.0.0.1:{server.port}/1"],
        capture_output=True, timeout=30, check=False,
    )
    log = done.stderr.decode(errors="replace")
    assert done.returncode == 0, log
    assert f"> AUTH {mechanism}" in log
    assert done.stdout == MESSAGE


@pytest.mark.client
def test_curl_external_with_client_certificate(
    server: Pop3TestServer, pki: Pki
) -> None:
    """curl with a client certificate logs in by SASL EXTERNAL, no password at all."""
    curl = need("curl")
    cert, key = pki.issue("alice-client", "alice@example.org", common_name="alice")
    done = subprocess.run(
        [curl, "-s", "-S", "-v", "--max-time", "20", "--cacert", str(pki.ca_file),
         "--cert", str(cert), "--key", str(key), "-u", "alice:",
         "--login-options", "AUTH=EXTERNAL", f"pop3s://127.0.0.1:{server.tls_port}/1"],
        capture_output=True, timeout=30, check=False,
    )
    log = done.stderr.decode(errors="replace")
    assert done.returncode == 0, log
    assert "> AUTH EXTERNAL" in log
    assert done.stdout == MESSAGE


# --------------------------------------------------------------------------- mpop (GNU SASL)


def _mpop(tmp: Path, port: int, pki: Pki, user: str, password: str, auth: str,
          starttls: bool = True) -> subprocess.CompletedProcess[bytes]:
    mpop = need("mpop")
    maildir = tmp / "fetched"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    rc = tmp / "mpoprc"
    rc.write_text(
        f"account t\nhost 127.0.0.1\nport {port}\nuser {user}\npassword {password}\n"
        f"auth {auth}\ntls on\ntls_starttls {'on' if starttls else 'off'}\n"
        f"tls_trust_file {pki.ca_file}\ndelivery maildir {maildir}\n"
        f"uidls_file {tmp / 'uidls'}\nkeep on\nonly_new off\n"
    )
    rc.chmod(0o600)
    return subprocess.run([mpop, "-C", str(rc), "-a", "-d"], capture_output=True, timeout=60,
                          check=False, stdin=subprocess.DEVNULL)


@pytest.mark.client
@pytest.mark.parametrize(
    ("user", "password", "auth"),
    [
        ("alice", "secret", "scram-sha-256"),  # PLAIN storage: keys derived, stable salt
        ("carol", "scram pw", "scram-sha-256"),  # stored {SCRAM-SHA-256} secret
        ("alice", "secret", "cram-md5"),
        ("alice", "secret", "plain"),
    ],
)
def test_mpop_sasl(
    server: Pop3TestServer, pki: Pki, tmp_path: Path, user: str, password: str, auth: str
) -> None:
    """mpop (GNU SASL) authenticates with SCRAM-SHA-256, CRAM-MD5 and PLAIN and fetches."""
    done = _mpop(tmp_path / "mpop", server.port, pki, user, password, auth)
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert done.returncode == 0, out
    assert f"--> AUTH {auth.upper()}" in out
    (got,) = (tmp_path / "mpop" / "fetched" / "new").iterdir()
    assert got.read_bytes().endswith(MESSAGE.replace(b"\r\n", b"\n"))


@pytest.mark.client
def test_mpop_scram_wrong_password(server: Pop3TestServer, pki: Pki, tmp_path: Path) -> None:
    """A wrong SCRAM password fails, and the user's mail is not fetched."""
    done = _mpop(tmp_path / "mpop", server.port, pki, "carol", "wrong", "scram-sha-256")
    assert done.returncode != 0
    assert not list((tmp_path / "mpop" / "fetched" / "new").iterdir())


# --------------------------------------------------------------------------- raw exchanges


def _caps(client: RawClient) -> list[bytes]:
    client.send(b"CAPA\r\n")
    assert client.line().startswith(b"+OK")
    return client.multiline()


def test_scram_unknown_user_gets_a_stable_fake_salt(server: Pop3TestServer) -> None:
    """An unknown user gets a SCRAM challenge like a real one, with the same salt each time."""
    salts = []
    for _ in range(2):
        with RawClient(server.host, server.port) as client:
            reply = client.cmd(b"AUTH SCRAM-SHA-256 " + b64(b"n,,n=nobody,r=abcdef"))
            assert reply.startswith(b"+ ")
            first = base64.b64decode(reply[2:])
            attrs = dict(part.split(b"=", 1) for part in first.split(b","))
            assert attrs[b"r"].startswith(b"abcdef")
            salts.append(attrs[b"s"])
            assert client.cmd(b"*") == b"-ERR authentication cancelled\r\n"
    assert salts[0] == salts[1]


def test_cram_md5_refused_for_hashed_password(server: Pop3TestServer) -> None:
    """CRAM-MD5 fails for a user whose stored hash cannot give the CRAM secret."""
    with RawClient(server.host, server.port) as client:
        reply = client.cmd(b"AUTH CRAM-MD5")
        assert base64.b64decode(reply[2:]).startswith(b"<")  # RFC 2195 <unique@host>
        assert client.cmd(b64(b"dave " + b"0" * 32)) == b"-ERR [AUTH] authentication failed\r\n"
        assert client.login(b"dave", b"crypt pw").startswith(b"+OK dave's maildrop")


def test_external_over_pop3s(server: Pop3TestServer, pki: Pki) -> None:
    """A verified client certificate enables EXTERNAL for its user, and only that user."""
    cert, key = pki.issue("alice-client", "alice@example.org", common_name="alice")
    ctx = pki.client_context()
    ctx.load_cert_chain(cert, key)
    with TlsRawClient("127.0.0.1", server.tls_port, context=ctx) as client:
        assert b"SASL PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256 EXTERNAL" in _caps(client)
        assert client.cmd(b"AUTH EXTERNAL " + b64(b"bob")) == (
            b"-ERR [AUTH] authentication failed\r\n"
        )
        assert client.cmd(b"AUTH EXTERNAL =").startswith(b"+OK alice's maildrop has 1 message")


def test_external_after_stls(server: Pop3TestServer, pki: Pki) -> None:
    """EXTERNAL is offered after STLS; a CN-less certificate is named by its e-mail SAN."""
    cert, key = pki.issue("mail-client", "erin@example.org")  # no CN
    ctx = pki.client_context()
    ctx.load_cert_chain(cert, key)
    with TlsRawClient("127.0.0.1", server.port) as client:
        assert b"EXTERNAL" not in b" ".join(_caps(client))
        assert client.cmd(b"STLS").startswith(b"+OK")
        client.start_tls(ctx)
        assert b"EXTERNAL" in b" ".join(_caps(client))
        assert client.cmd(b"AUTH EXTERNAL =").startswith(b"+OK erin@example.org's maildrop")


def test_external_needs_a_trusted_certificate(
    server: Pop3TestServer, pki: Pki, tmp_path: Path
) -> None:
    """Without a certificate EXTERNAL is not offered; one from another CA fails the handshake."""
    with TlsRawClient("127.0.0.1", server.tls_port, context=pki.client_context()) as client:
        assert b"EXTERNAL" not in b" ".join(_caps(client))
        assert client.cmd(b"AUTH EXTERNAL =") == b"-ERR unsupported authentication mechanism\r\n"
    other = make_pki(tmp_path / "other")
    cert, key = pki.issue("rogue", "alice@example.org", ca=other.ca, common_name="alice")
    ctx = pki.client_context()
    ctx.load_cert_chain(cert, key)
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        TlsRawClient("127.0.0.1", server.tls_port, context=ctx) as client,
    ):
        _caps(client)  # TLS 1.3: the server's alert arrives with the first read


def test_external_not_offered_without_client_ca(pop3_server_factory: Factory, pki: Pki) -> None:
    """Without [tls] client_ca no certificate is asked for and EXTERNAL is never offered."""
    srv = pop3_server_factory(sections={"tls": pki.tls_section()}, tls_listen=["127.0.0.1:0"])
    cert, key = pki.issue("alice-client", "alice@example.org", common_name="alice")
    ctx = pki.client_context()
    ctx.load_cert_chain(cert, key)
    with TlsRawClient("127.0.0.1", srv.tls_port, context=ctx) as client:
        assert b"EXTERNAL" not in b" ".join(_caps(client))


# --------------------------------------------------------------------------- brute force


def test_auth_attempt_cap_closes_the_connection(
    server: Pop3TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """After max_auth_attempts failed AUTHs the server closes; failures are logged, no secret."""
    caplog.set_level(logging.INFO, logger="pop3d")
    with RawClient(server.host, server.port) as client:
        for _ in range(3):
            reply = client.cmd(b"AUTH PLAIN " + b64(b"\x00alice\x00hunter2-wrong"))
            assert reply == b"-ERR [AUTH] authentication failed\r\n"
        assert client.wait_eof() == b""
    failures = [r.getMessage() for r in caplog.records if "auth failed" in r.getMessage()]
    assert len(failures) == 3
    assert all("127.0.0.1" in m and "PLAIN" in m for m in failures)
    assert "hunter2-wrong" not in caplog.text
    assert "result=auth failures" in caplog.text


def test_failure_delay_doubles_per_address_without_blocking_others(
    pop3_server_factory: Factory,
) -> None:
    """Failures from one address wait longer each time; other sessions are served meanwhile.

    The delays are checked as lower bounds, which load cannot break; that another session
    is served while the attacker waits is checked during the longest delay (1.6 s), not
    inside the first one.
    """
    srv = pop3_server_factory(failure_delay=0.2, max_failure_delay=1.6)
    durations = []
    for round_ in range(4):
        with RawClient(srv.host, srv.port) as attacker:
            attacker.send(b"USER alice\r\nPASS wrong\r\n")
            assert attacker.line() == b"+OK send PASS\r\n"
            started = time.monotonic()
            if round_ == 3:
                with RawClient(srv.host, srv.port) as other:
                    assert other.cmd(b"NOOP") == b"-ERR command not valid in this state\r\n"
                    assert not attacker.has_data()  # its answer is still being delayed
            assert attacker.line() == b"-ERR [AUTH] invalid password\r\n"
            durations.append(time.monotonic() - started)
    # 0.2, 0.4, 0.8, 1.6: lower bounds only, so load cannot flake them.
    assert durations[0] >= 0.19
    assert durations[1] >= 0.39
    assert durations[2] >= 0.79
    assert durations[3] >= 1.59


def test_failure_delays_policy() -> None:
    """FailureDelays doubles per address up to the cap, resets a user's own on success and
    everything after expiry."""
    now = [0.0]
    delays = FailureDelays(base=0.05, cap=0.4, forget_after=60, clock=lambda: now[0])
    assert [delays.delay_for("a") for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    assert delays.delay_for("b") == 0.05  # another address is unaffected
    delays.failed("b", "alice")
    delays.succeeded("b", "alice")  # alice's own failures are forgotten, not the address's
    assert delays.penalty("b") == 0.1
    now[0] = 61.0
    assert delays.delay_for("a") == 0.05  # forgotten after a quiet minute
    for _ in range(5000):  # a long attack cannot overflow the arithmetic
        delays.delay_for("c")
    assert delays.delay_for("c") == 0.4
    assert FailureDelays(base=0, cap=1).delay_for("a") == 0.0
