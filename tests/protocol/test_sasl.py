"""SASL: the mechanisms against their RFC examples, and AUTH transcripts through the core."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from pop3d.protocol import (
    AuthRefused,
    NeedData,
    PasswordAuthenticate,
    Pop3Connection,
    Pop3Settings,
    SaslOutcome,
    SaslSecret,
    StartTls,
    sasl,
)
from pop3d.protocol.digests import ScramSecret, cram_md5_context
from pop3d.protocol.replies import RespCode
from pop3d.protocol.states import State
from tests.protocol.driver import FakeDriver


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --------------------------------------------------------------------------- RFC vectors

# RFC 2195 §2 example.
CRAM_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
CRAM_CHALLENGE_B64 = b"PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"
CRAM_RESPONSE_B64 = b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
CRAM_SECRET = cram_md5_context(b"tanstaaftanstaaf")

# RFC 7677 §3 example (user "user", password "pencil").
SCRAM_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SCRAM_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SCRAM_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
SCRAM_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SCRAM_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
SCRAM_SECRET = ScramSecret.derive(
    b"pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096
).encode()


def test_plain_rfc4616_example() -> None:
    """RFC 4616 §4: ``\\0tim\\0tanstaaftanstaaf`` carries user tim and his password."""
    step = sasl.Plain().start(base64.b64decode(b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm"))
    assert step == sasl.CheckPassword("tim", b"tanstaaftanstaaf")


def test_plain_authzid_must_match() -> None:
    """RFC 4616 §4's Ursel-as-Kurt example is refused: a client may only act as itself."""
    step = sasl.Plain().start(b"Ursel\x00Kurt\x00xipj3plmq")
    assert isinstance(step, sasl.Outcome)
    assert not step.success
    assert sasl.Plain().start(b"Kurt\x00Kurt\x00xipj3plmq") == sasl.CheckPassword(
        "Kurt", b"xipj3plmq"
    )


@pytest.mark.parametrize(
    "message", [b"", b"tim", b"\x00tim", b"\x00tim\x00", b"\x00\x00pw", b"a\x00b\x00c\x00d"]
)
def test_plain_malformed(message: bytes) -> None:
    """A PLAIN message without exactly authzid, authcid and a password is malformed."""
    assert isinstance(sasl.Plain().start(message), sasl.Failed)


def test_plain_without_initial_response() -> None:
    """PLAIN without an initial response gets an empty challenge, then the message."""
    mech = sasl.Plain()
    assert mech.start(None) == sasl.Challenge(b"")
    assert mech.step(b"\x00tim\x00pw") == sasl.CheckPassword("tim", b"pw")


def test_login_steps() -> None:
    """LOGIN asks Username: then Password: (and takes the user from an initial response)."""
    mech = sasl.Login()
    assert mech.start(None) == sasl.Challenge(b"Username:")
    assert mech.step(b"tim") == sasl.Challenge(b"Password:")
    assert mech.step(b"pw") == sasl.CheckPassword("tim", b"pw")
    mech = sasl.Login()
    assert mech.start(b"tim") == sasl.Challenge(b"Password:")


def test_cram_md5_rfc2195_example() -> None:
    """RFC 2195 §2: tim's response to the example challenge verifies with his secret."""
    mech = sasl.CramMd5(CRAM_CHALLENGE)
    assert mech.start(None) == sasl.Challenge(CRAM_CHALLENGE)
    assert b64(CRAM_CHALLENGE) == CRAM_CHALLENGE_B64
    assert mech.step(base64.b64decode(CRAM_RESPONSE_B64)) == sasl.NeedSecret("tim", "CRAM-MD5")
    assert mech.secret(CRAM_SECRET) == sasl.Outcome("tim", success=True)


def test_cram_md5_wrong_secret_and_unknown_user() -> None:
    """A wrong secret, or none (unknown user), fails the CRAM-MD5 exchange."""
    for secret in (cram_md5_context(b"other"), None):
        mech = sasl.CramMd5(CRAM_CHALLENGE)
        mech.start(None)
        mech.step(base64.b64decode(CRAM_RESPONSE_B64))
        outcome = mech.secret(secret)
        assert isinstance(outcome, sasl.Outcome)
        assert not outcome.success


def test_cram_md5_refuses_initial_response() -> None:
    """CRAM-MD5 is server-first: an initial response is a protocol error."""
    assert isinstance(sasl.CramMd5(CRAM_CHALLENGE).start(b"tim x"), sasl.Failed)


def test_scram_sha256_rfc7677_example() -> None:
    """RFC 7677 §3: the example exchange, byte for byte, with the server's fixed nonce."""
    mech = sasl.ScramSha256(SCRAM_SERVER_NONCE)
    assert mech.start(SCRAM_CLIENT_FIRST) == sasl.NeedSecret("user", "SCRAM-SHA-256")
    assert mech.secret(SCRAM_SECRET) == sasl.Challenge(SCRAM_SERVER_FIRST)
    assert mech.step(SCRAM_CLIENT_FINAL) == sasl.Challenge(SCRAM_SERVER_FINAL)
    assert mech.step(b"") == sasl.Outcome("user", success=True)


def test_scram_wrong_proof() -> None:
    """A SCRAM proof made with another password fails without a server signature."""
    mech = sasl.ScramSha256(SCRAM_SERVER_NONCE)
    mech.start(SCRAM_CLIENT_FIRST)
    other = ScramSecret.derive(b"crayon", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    mech.secret(other.encode())
    outcome = mech.step(SCRAM_CLIENT_FINAL)
    assert isinstance(outcome, sasl.Outcome)
    assert not outcome.success


@pytest.mark.parametrize(
    "first",
    [
        b"p=tls-unique,,n=user,r=abc",  # channel binding we do not offer
        b"n,,n=user,r=abc,m=ext",  # mandatory extension
        b"n,,r=abc,n=user",  # wrong order
        b"n,,n=us=er,r=abc",  # bad saslname escape
        b"n,,n=user",  # no nonce
        b"x,,n=user,r=abc",
    ],
)
def test_scram_malformed_client_first(first: bytes) -> None:
    """Malformed SCRAM client-first messages are refused before any secret is looked up."""
    assert isinstance(sasl.ScramSha256("srv").start(first), sasl.Failed)


def test_scram_nonce_and_binding_checked() -> None:
    """The client-final must repeat the combined nonce and the gs2 header."""
    for final in (
        SCRAM_CLIENT_FINAL.replace(b"r=rOpr", b"r=XOpr"),
        SCRAM_CLIENT_FINAL.replace(b"c=biws", b"c=eSws"),
    ):
        mech = sasl.ScramSha256(SCRAM_SERVER_NONCE)
        mech.start(SCRAM_CLIENT_FIRST)
        mech.secret(SCRAM_SECRET)
        assert isinstance(mech.step(final), sasl.Failed)


def test_scram_authzid_and_escapes() -> None:
    """SCRAM's a= must name the user itself; =2C and =3D unescape in names."""
    assert sasl.ScramSha256("s").start(b"n,a=u=2Cx,n=u=2Cx,r=abc") == sasl.NeedSecret(
        "u,x", "SCRAM-SHA-256"
    )
    outcome = sasl.ScramSha256("s").start(b"n,a=admin,n=user,r=abc")
    assert isinstance(outcome, sasl.Outcome)
    assert not outcome.success


def test_external_identity() -> None:
    """EXTERNAL accepts an empty authzid or the certificate's own identity, nothing else."""
    assert sasl.External("alice").start(b"") == sasl.Outcome("alice", success=True)
    assert sasl.External("alice").start(b"alice") == sasl.Outcome("alice", success=True)
    assert sasl.External("alice").start(None) == sasl.Challenge(b"")
    outcome = sasl.External("alice").start(b"bob")
    assert isinstance(outcome, sasl.Outcome)
    assert not outcome.success


def test_decode_response() -> None:
    """``=`` is the empty response; invalid base64 is None."""
    assert sasl.decode_response(b"=") == b""
    assert sasl.decode_response(b"") == b""
    assert sasl.decode_response(b"dGlt") == b"tim"
    assert sasl.decode_response(b"dGl!") is None
    assert sasl.decode_response(b"dGl") is None


# --------------------------------------------------------------------------- the core


def sasl_driver(**fields: Any) -> FakeDriver:
    """A driver with the RFC examples' users: tim (PLAIN, CRAM-MD5), user (SCRAM), alice."""
    defaults: dict[str, Any] = {
        "users": {"tim": b"tanstaaftanstaaf"},
        "secrets": {("tim", "CRAM-MD5"): CRAM_SECRET, ("user", "SCRAM-SHA-256"): SCRAM_SECRET},
        "accounts": {"user", "alice"},
    }
    return FakeDriver(**(defaults | fields))


GREETING = b"+OK POP3 server ready\r\n"
ALL = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "EXTERNAL")


def session(
    lines: list[bytes], driver: FakeDriver | None = None, **settings: object
) -> tuple[bytes, FakeDriver, Pop3Connection]:
    """Run ``lines`` whole and byte at a time (the two must agree); return the first run."""
    results = []
    for split in (False, True):
        d = driver or sasl_driver()
        conn = Pop3Connection(Pop3Settings(sasl_mechanisms=ALL, **settings))  # type: ignore[arg-type]
        data = b"".join(lines)
        out = [d.run(conn)]
        for piece in [data[i : i + 1] for i in range(len(data))] if split else [data]:
            conn.receive_data(piece)
            out.append(d.run(conn))
        results.append((b"".join(out), d, conn))
        if driver is not None:
            break
    if len(results) == 2:
        assert results[0][0] == results[1][0]
    return results[0]


def test_auth_plain_initial_response() -> None:
    """AUTH PLAIN with an initial response logs in (RFC 5034 §4, RFC 4616)."""
    out, _, conn = session([b"AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n"])
    assert out == GREETING + b"+OK tim's maildrop has 0 messages (0 octets)\r\n"
    assert conn.state is State.TRANSACTION


def test_auth_plain_continuation() -> None:
    """AUTH PLAIN without an initial response: ``+ `` then the message on its own line."""
    out, _, _ = session([b"AUTH PLAIN\r\n", b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n"])
    assert out == GREETING + b"+ \r\n+OK tim's maildrop has 0 messages (0 octets)\r\n"


def test_auth_login_transcript() -> None:
    """AUTH LOGIN prompts Username:/Password: in base64."""
    out, _, _ = session([b"AUTH LOGIN\r\n", b"dGlt\r\n", b64(b"tanstaaftanstaaf") + b"\r\n"])
    assert out == (
        GREETING + b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n"
        b"+OK tim's maildrop has 0 messages (0 octets)\r\n"
    )


def test_auth_cram_md5_rfc2195_through_core() -> None:
    """RFC 2195's example exchange byte for byte, the challenge made from the settings."""
    out, _, _ = session(
        [b"AUTH CRAM-MD5\r\n", CRAM_RESPONSE_B64 + b"\r\n"],
        sasl_nonce="1896.697170952",
        hostname="postoffice.reston.mci.net",
    )
    assert out == (
        GREETING + b"+ " + CRAM_CHALLENGE_B64 + b"\r\n"
        b"+OK tim's maildrop has 0 messages (0 octets)\r\n"
    )


def test_auth_scram_rfc7677_through_core() -> None:
    """RFC 7677's example exchange byte for byte; the server-final is a last challenge."""
    out, _, _ = session(
        [
            b"AUTH SCRAM-SHA-256 " + b64(SCRAM_CLIENT_FIRST) + b"\r\n",
            b64(SCRAM_CLIENT_FINAL) + b"\r\n",
            b"\r\n",
        ],
        sasl_nonce=SCRAM_SERVER_NONCE,
    )
    assert out == (
        GREETING
        + b"+ "
        + b64(SCRAM_SERVER_FIRST)
        + b"\r\n"
        + b"+ "
        + b64(SCRAM_SERVER_FINAL)
        + b"\r\n"
        + b"+OK user's maildrop has 0 messages (0 octets)\r\n"
    )


def test_auth_scram_wrong_password() -> None:
    """A wrong SCRAM proof is -ERR [AUTH] and no server signature is sent."""
    driver = sasl_driver(
        secrets={("user", "SCRAM-SHA-256"): ScramSecret.derive(b"x", b"salt", 4096).encode()}
    )
    out, d, _ = session(
        [
            b"AUTH SCRAM-SHA-256 " + b64(SCRAM_CLIENT_FIRST) + b"\r\n",
            b64(SCRAM_CLIENT_FINAL.replace(b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0", b"srv")) + b"\r\n",
        ],
        driver,
        sasl_nonce="srv",
    )
    assert out.endswith(b"\r\n-ERR [AUTH] authentication failed\r\n")
    assert b"v=" not in base64.b64decode(out.split(b"+ ")[1].split(b"\r\n")[0])
    assert any(isinstance(e, SaslOutcome) and not e.success for e in d.asked)


def test_cancel_and_bad_base64() -> None:
    """``*`` cancels an exchange and bad base64 ends it, both with -ERR; commands resume."""
    out, _, conn = session(
        [b"AUTH PLAIN\r\n", b"*\r\n", b"AUTH LOGIN\r\n", b"!!!\r\n", b"CAPA\r\n"]
    )
    assert out.startswith(
        GREETING + b"+ \r\n-ERR authentication cancelled\r\n"
        b"+ VXNlcm5hbWU6\r\n-ERR invalid base64 in SASL response\r\n+OK Capability list"
    )
    assert conn.state is State.AUTHORIZATION


def test_unknown_mechanism_and_bad_initial_response() -> None:
    """Unknown mechanisms and undecodable initial responses get -ERR."""
    out, _, _ = session([b"AUTH GSSAPI\r\n", b"AUTH PLAIN @@@\r\n"])
    assert out == (
        GREETING + b"-ERR unsupported authentication mechanism\r\n"
        b"-ERR invalid base64 in initial response\r\n"
    )


def test_auth_without_argument_lists_mechanisms() -> None:
    """``AUTH`` alone lists the usable mechanisms (RFC 1734 clients, as Dovecot)."""
    out, _, _ = session([b"AUTH\r\n"], sasl_nonce="n1")
    assert out == GREETING + b"+OK\r\nPLAIN\r\nLOGIN\r\nCRAM-MD5\r\nSCRAM-SHA-256\r\n.\r\n"


def test_capa_sasl_follows_connection() -> None:
    """CAPA lists PLAIN/LOGIN only where plaintext is allowed, EXTERNAL only with a cert."""
    out, _, _ = session([b"CAPA\r\n"], sasl_nonce="n1", client_identity="alice")
    assert b"\r\nSASL PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256 EXTERNAL\r\n" in out
    out, _, _ = session([b"CAPA\r\n"], sasl_nonce="n1", plaintext_allowed=False)
    assert b"\r\nSASL CRAM-MD5 SCRAM-SHA-256\r\n" in out
    assert b"\r\nUSER\r\n" not in out
    out, _, _ = session([b"CAPA\r\n"], plaintext_allowed=False)
    assert b"SASL" not in out


def test_plaintext_mechanisms_refused_unread() -> None:
    """AUTH PLAIN/LOGIN on an insecure cleartext connection: -ERR [AUTH], nothing checked."""
    out, d, _ = session(
        [b"AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n", b"AUTH LOGIN\r\n"],
        plaintext_allowed=False,
    )
    refusal = b"-ERR [AUTH] plaintext authentication disallowed on non-secure connections\r\n"
    assert out == GREETING + refusal * 2
    assert not any(isinstance(e, PasswordAuthenticate) for e in d.asked)
    assert sum(isinstance(e, AuthRefused) for e in d.asked) == 2


def tls_session(
    identity: str | None, plaintext_allowed: bool = False
) -> tuple[Pop3Connection, FakeDriver]:
    """A connection that has done STLS; the driver reported ``identity`` as the cert's user."""
    driver = sasl_driver()
    conn = Pop3Connection(
        Pop3Settings(sasl_mechanisms=ALL, tls_available=True, plaintext_allowed=plaintext_allowed)
    )
    driver.run(conn)
    conn.receive_data(b"STLS\r\n")
    assert isinstance(conn.next_event(), StartTls)
    assert conn.data_to_send() == b"+OK Begin TLS negotiation now\r\n"
    conn.tls_established(client_identity=identity)
    return conn, driver


def test_plaintext_mechanisms_allowed_after_stls() -> None:
    """After STLS the same connection may use PLAIN (and CAPA says so)."""
    conn, driver = tls_session(None)
    conn.receive_data(b"CAPA\r\nAUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n")
    out = driver.run(conn)
    assert b"\r\nSASL PLAIN LOGIN\r\n" in out
    assert conn.state is State.TRANSACTION


def test_external_needs_certificate() -> None:
    """Without a verified client certificate EXTERNAL is neither listed nor accepted."""
    out, _, _ = session([b"CAPA\r\n", b"AUTH EXTERNAL =\r\n"])
    assert b"EXTERNAL" not in out
    assert out.endswith(b"-ERR unsupported authentication mechanism\r\n")


def test_external_after_stls_with_certificate() -> None:
    """EXTERNAL is offered and works once the driver reports a verified certificate."""
    conn, driver = tls_session("alice")
    conn.receive_data(b"CAPA\r\nAUTH EXTERNAL\r\n=\r\n")
    out = driver.run(conn)
    assert b"\r\nSASL PLAIN LOGIN EXTERNAL\r\n" in out
    assert out.endswith(b"+ \r\n+OK alice's maildrop has 0 messages (0 octets)\r\n")


def test_external_for_someone_else_refused() -> None:
    """EXTERNAL with an authzid other than the certificate's user fails."""
    out, _, _ = session([b"AUTH EXTERNAL " + b64(b"bob") + b"\r\n"], client_identity="alice")
    assert out == GREETING + b"-ERR [AUTH] authentication failed\r\n"


def test_auth_failures_cap_closes() -> None:
    """Failed AUTH attempts count towards max_auth_attempts; the cap closes the session."""
    bad = b"AUTH PLAIN " + b64(b"\x00tim\x00wrong") + b"\r\n"
    out, d, conn = session([bad] * 3 + [b"CAPA\r\n"], max_auth_attempts=3)
    assert out == GREETING + b"-ERR [AUTH] authentication failed\r\n" * 3
    assert d.closed == "auth failures"
    assert conn.state is State.CLOSED


def test_sasl_line_limit() -> None:
    """A SASL response over MAX_SASL_LINE ends the exchange with -ERR; then commands work."""
    out, _, _ = session([b"AUTH PLAIN\r\n", b"A" * 5000 + b"\r\n", b"NOOP\r\n"])
    assert out == GREETING + b"+ \r\n-ERR line too long\r\n-ERR command not valid in this state\r\n"


def test_long_sasl_response_within_limit() -> None:
    """Responses longer than a command line but within MAX_SASL_LINE are accepted."""
    user = "u" * 200
    driver = sasl_driver(users={user: b"p" * 900}, accounts=set())
    msg = b64(b"\x00" + user.encode() + b"\x00" + b"p" * 900)
    assert len(msg) > 255
    out, _, _ = session([b"AUTH PLAIN\r\n", msg + b"\r\n"], driver)
    assert out.endswith(b"'s maildrop has 0 messages (0 octets)\r\n")


def test_later_exchanges_get_fresh_challenges() -> None:
    """Each CRAM-MD5 exchange on a connection gets a different challenge."""
    out, _, _ = session(
        [b"AUTH CRAM-MD5\r\n", b"*\r\n", b"AUTH CRAM-MD5\r\n", b"*\r\n"], sasl_nonce="n1"
    )
    challenges = [line for line in out.split(b"\r\n") if line.startswith(b"+ ")]
    assert len(challenges) == 2
    assert challenges[0] != challenges[1]


def test_secret_lookup_failure_is_sys_temp() -> None:
    """A broken secret backend answers -ERR [SYS/TEMP] and does not count as a failure."""
    conn = Pop3Connection(Pop3Settings(sasl_mechanisms=ALL, sasl_nonce="n"))
    conn.data_to_send()
    conn.receive_data(b"AUTH CRAM-MD5\r\n" + b64(b"tim " + b"0" * 32) + b"\r\n")
    assert isinstance(conn.next_event(), SaslSecret)
    conn.auth_failed(RespCode.SYS_TEMP)
    assert conn.data_to_send().endswith(
        b"-ERR [SYS/TEMP] authentication temporarily unavailable\r\n"
    )
    assert isinstance(conn.next_event(), NeedData)


def test_events_hide_passwords() -> None:
    """Password-carrying events and steps never show the password in their repr."""
    assert "tanstaaf" not in repr(sasl.CheckPassword("tim", b"tanstaaf"))
    assert "tanstaaf" not in repr(PasswordAuthenticate("tim", b"tanstaaf", "PLAIN"))


def test_the_registry_says_what_each_mechanism_needs() -> None:
    """The core offers a mechanism by what its class declares, not by a list of names."""
    assert list(sasl.REGISTRY) == ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN", "EXTERNAL"]
    plaintext = {n for n, m in sasl.REGISTRY.items() if m.plaintext}
    nonce = {n for n, m in sasl.REGISTRY.items() if m.needs_nonce}
    certificate = {n for n, m in sasl.REGISTRY.items() if m.needs_certificate}
    assert (plaintext, nonce, certificate) == (
        {"PLAIN", "LOGIN"}, {"CRAM-MD5", "SCRAM-SHA-256"}, {"EXTERNAL"}
    )
    nothing = {"plaintext_ok": False, "nonce": False, "certificate": False}
    assert not any(sasl.usable(m, **nothing) for m in sasl.REGISTRY.values())
    everything = dict.fromkeys(nothing, True)
    assert all(sasl.usable(m, **everything) for m in sasl.REGISTRY.values())
    setting = sasl.Setting("n1", "example.org", None)
    cram = sasl.REGISTRY["CRAM-MD5"].create(setting)
    assert isinstance(cram, sasl.CramMd5)
    assert cram.challenge == b"<n1@example.org>"
    with pytest.raises(ValueError):
        sasl.REGISTRY["EXTERNAL"].create(setting)  # no certificate
