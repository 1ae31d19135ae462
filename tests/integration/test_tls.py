"""POP3S (RFC 8314), STLS (RFC 2595), the plaintext policy, SNI, reload, connection limits."""

from __future__ import annotations

import logging
import poplib
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pop3d.testing import Pop3ServeProcess, Pop3TestServer, free_port
from tests.integration.helpers import WAIT, RawClient, greets, need, wait_until
from tests.integration.tls_support import Pki, TlsRawClient, make_pki

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"Subject: over TLS\r\n\r\nencrypted hello\r\n"

Factory = Callable[..., Pop3TestServer]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_server(pop3_server_factory: Factory, pki: Pki) -> Pop3TestServer:
    """A server with STLS on its cleartext port and implicit TLS on ``tls_port``."""
    srv = pop3_server_factory(sections={"tls": pki.tls_section()}, tls_listen=["127.0.0.1:0"])
    srv.add_message("alice", MESSAGE)
    return srv


# --------------------------------------------------------------------------- real clients


@pytest.mark.client
def test_curl_pop3s_lists_and_retrieves(tls_server: Pop3TestServer, pki: Pki) -> None:
    """curl over implicit TLS (pop3s://) verifies our certificate and gets the message."""
    curl = need("curl")
    url = f"pop3s://alice:secret@127.0.0.1:{tls_server.tls_port}/"
    base = [curl, "-s", "-S", "--max-time", "20", "--cacert", str(pki.ca_file)]
    listing = subprocess.run([*base, url], capture_output=True, check=True, timeout=30)
    assert listing.stdout == b"1 %d\r\n" % len(MESSAGE)
    body = subprocess.run([*base, url + "1"], capture_output=True, check=True, timeout=30)
    assert body.stdout == MESSAGE


@pytest.mark.client
def test_curl_ssl_reqd_uses_stls(tls_server: Pop3TestServer, pki: Pki) -> None:
    """curl --ssl-reqd on pop3:// upgrades with STLS before sending credentials."""
    curl = need("curl")
    url = f"pop3://alice:secret@127.0.0.1:{tls_server.port}/1"
    done = subprocess.run(
        [curl, "-v", "-s", "-S", "--max-time", "20", "--ssl-reqd", "--cacert", str(pki.ca_file),
         url],
        capture_output=True, check=True, timeout=30,
    )
    assert done.stdout == MESSAGE
    log = done.stderr.decode(errors="replace")
    assert "> STLS" in log
    # Nothing secret went out before the STLS (curl logs its commands in order).
    before = log.split("> STLS", 1)[0]
    assert "secret" not in before
    assert "> AUTH" not in before
    assert "> USER" not in before


def test_poplib_pop3_ssl(tls_server: Pop3TestServer, pki: Pki) -> None:
    """poplib.POP3_SSL logs in over implicit TLS; CAPA there offers no STLS."""
    client = poplib.POP3_SSL(
        "127.0.0.1", tls_server.tls_port, context=pki.client_context(), timeout=WAIT
    )
    try:
        caps = client.capa()
        assert "STLS" not in caps
        assert "USER" in caps
        client.user("alice")
        client.pass_("secret")
        assert client.stat() == (1, len(MESSAGE))
        assert client.retr(1)[1] == [b"Subject: over TLS", b"", b"encrypted hello"]
    finally:
        client.quit()


def test_big_message_with_dot_lines_over_tls(tls_server: Pop3TestServer, pki: Pki) -> None:
    """A message of several read chunks, with line-start dots, arrives whole over TLS (the
    stuffed pieces go through the TLS transport's writelines)."""
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\n"
    body = b"".join(b"." + line if i % 97 == 0 else line for i in range(70_000))
    tls_server.add_message("alice", b"Subject: big\n\n" + body)
    client = poplib.POP3_SSL(
        "127.0.0.1", tls_server.tls_port, context=pki.client_context(), timeout=WAIT
    )
    try:
        client.user("alice")
        client.pass_("secret")
        lines = client.retr(2)[1]  # poplib takes the stuffing off
        assert lines[2:] == body.rstrip(b"\n").split(b"\n")
    finally:
        client.quit()


def test_poplib_stls(tls_server: Pop3TestServer, pki: Pki) -> None:
    """poplib.POP3.stls() upgrades; CAPA after STLS no longer lists STLS."""
    client = poplib.POP3("127.0.0.1", tls_server.port, timeout=WAIT)
    try:
        assert "STLS" in client.capa()
        client.stls(pki.client_context())
        assert "STLS" not in client.capa()
        client.user("alice")
        client.pass_("secret")
        assert client.stat() == (1, len(MESSAGE))
    finally:
        client.quit()


@pytest.mark.client
def test_openssl_s_client_starttls(tls_server: Pop3TestServer, pki: Pki) -> None:
    """openssl s_client -starttls pop3 completes a verified handshake and talks POP3."""
    openssl = need("openssl")
    done = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{tls_server.port}", "-starttls", "pop3",
         "-CAfile", str(pki.ca_file), "-verify_return_error", "-crlf", "-ign_eof"],
        input=b"CAPA\nQUIT\n", capture_output=True, timeout=30, check=False,
    )
    out = done.stdout.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in out, out + done.stderr.decode(errors="replace")
    assert "+OK Capability list follows" in out
    after_handshake = out.split("+OK Capability list follows", 1)[1]
    assert "STLS" not in after_handshake
    assert "signing off" in after_handshake


def _mpop_config(tmp: Path, port: int, pki: Pki, *, starttls: bool, auth: str,
                 user: str = "alice", password: str = "secret") -> Path:
    maildir = tmp / "fetched"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    rc = tmp / "mpoprc"
    rc.write_text(
        "account test\n"
        "host 127.0.0.1\n"
        f"port {port}\n"
        f"user {user}\n"
        f"password {password}\n"
        f"auth {auth}\n"
        "tls on\n"
        f"tls_starttls {'on' if starttls else 'off'}\n"
        f"tls_trust_file {pki.ca_file}\n"
        f"delivery maildir {maildir}\n"
        f"uidls_file {tmp / 'uidls'}\n"
        "keep on\n"
        "only_new off\n"
    )
    rc.chmod(0o600)
    return rc


def _fetched(tmp: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((tmp / "fetched" / "new").iterdir())]


@pytest.mark.client
@pytest.mark.parametrize(("starttls", "auth"), [(True, "user"), (False, "plain")])
def test_mpop_over_tls(
    tls_server: Pop3TestServer, pki: Pki, tmp_path: Path, starttls: bool, auth: str
) -> None:
    """mpop fetches over STLS and over implicit TLS, verifying our certificate."""
    mpop = need("mpop")
    port = tls_server.port if starttls else tls_server.tls_port
    rc = _mpop_config(tmp_path / "mpop", port, pki, starttls=starttls, auth=auth)
    done = subprocess.run([mpop, "-C", str(rc), "-a", "-q"], capture_output=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    (got,) = _fetched(tmp_path / "mpop")
    assert got.endswith(MESSAGE.replace(b"\r\n", b"\n"))  # mpop stores LF line ends


# --------------------------------------------------------------------------- STLS rules


def test_stls_injection_is_not_answered(tls_server: Pop3TestServer, pki: Pki) -> None:
    """Commands sent in the clear after STLS, in the same packet, are never answered."""
    with TlsRawClient("127.0.0.1", tls_server.port) as client:
        client.send(b"STLS\r\nCAPA\r\n")
        assert client.line() == b"+OK Begin TLS negotiation now\r\n"
        client.start_tls(pki.client_context())  # asserts nothing else came in the clear
        client.send(b"QUIT\r\n")
        assert client.wait_eof() == b"+OK pop3d signing off\r\n".replace(
            b"pop3d", client_impl(tls_server)
        )


def client_impl(srv: Pop3TestServer) -> bytes:
    """The IMPLEMENTATION text the server signs off with."""
    with RawClient(srv.host, srv.port) as client:
        client.send(b"CAPA\r\n")
        assert client.line().startswith(b"+OK")
        caps = client.multiline()
    (impl,) = [c for c in caps if c.startswith(b"IMPLEMENTATION ")]
    return impl.removeprefix(b"IMPLEMENTATION ")


def test_stls_refused_twice_in_transaction_and_on_pop3s(
    tls_server: Pop3TestServer, pki: Pki
) -> None:
    """STLS is refused after TLS is up, in TRANSACTION, and on an implicit-TLS port."""
    with TlsRawClient("127.0.0.1", tls_server.port) as client:
        assert client.cmd(b"STLS") == b"+OK Begin TLS negotiation now\r\n"
        client.start_tls(pki.client_context())
        assert client.cmd(b"STLS") == b"-ERR TLS is already active\r\n"
    with RawClient("127.0.0.1", tls_server.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK")
        assert client.cmd(b"STLS") == b"-ERR command not valid in this state\r\n"
    with TlsRawClient("127.0.0.1", tls_server.tls_port, context=pki.client_context()) as client:
        assert client.cmd(b"STLS") == b"-ERR TLS is already active\r\n"


def test_stls_not_offered_without_tls_config(pop3_server: Pop3TestServer) -> None:
    """Without [tls], CAPA has no STLS and STLS is refused."""
    with RawClient(pop3_server.host, pop3_server.port) as client:
        client.send(b"CAPA\r\n")
        client.line()
        assert b"STLS" not in client.multiline()
        assert client.cmd(b"STLS") == b"-ERR STLS is not available\r\n"


def test_failed_handshake_closes_only_that_connection(
    tls_server: Pop3TestServer, pki: Pki, tmp_path: Path
) -> None:
    """A client that rejects our certificate fails alone; the server keeps serving."""
    other = make_pki(tmp_path / "other")
    with TlsRawClient("127.0.0.1", tls_server.port) as client:
        assert client.cmd(b"STLS").startswith(b"+OK")
        with pytest.raises(ssl.SSLCertVerificationError):
            client.start_tls(other.client_context())
    client2 = poplib.POP3_SSL("127.0.0.1", tls_server.tls_port, context=pki.client_context(),
                              timeout=WAIT)
    client2.user("alice")
    client2.pass_("secret")
    client2.quit()


def test_tls12_is_the_minimum(tls_server: Pop3TestServer, pki: Pki) -> None:
    """Contexts refuse anything older than TLS 1.2; a TLS 1.2-only client still connects."""
    from pop3d.server.tls import TlsContexts  # noqa: PLC0415

    assert tls_server.config.tls is not None
    contexts = TlsContexts(tls_server.config.tls)
    assert contexts.context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert contexts.context.verify_mode is ssl.CERT_NONE  # no client CA: no cert asked for
    ctx = pki.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with TlsRawClient("127.0.0.1", tls_server.tls_port, context=ctx) as client:
        assert client.sock.version() == "TLSv1.2"  # type: ignore[attr-defined]
        assert client.greeting.startswith(b"+OK")


# --------------------------------------------------------------------------- plaintext policy


def test_cleartext_outside_secure_networks_cannot_authenticate(
    pop3_server_factory: Factory, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Outside secure_networks, cleartext USER/PASS and AUTH PLAIN/LOGIN are refused unread."""
    caplog.set_level(logging.INFO, logger="pop3d")
    srv = pop3_server_factory(
        sections={"tls": pki.tls_section()},
        secure_networks=[],
        mechanisms=["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"],
    )
    refusal = b"-ERR [AUTH] plaintext authentication disallowed on non-secure connections\r\n"
    with RawClient(srv.host, srv.port) as client:
        client.send(b"CAPA\r\n")
        client.line()
        caps = client.multiline()
        assert b"USER" not in caps
        (sasl_line,) = [c for c in caps if c.startswith(b"SASL ")]
        assert b"PLAIN" not in sasl_line.split()
        assert b"LOGIN" not in sasl_line.split()
        assert b"STLS" in caps
        assert client.cmd(b"USER alice") == refusal
        assert client.cmd(b"PASS secret") == refusal
        assert client.cmd(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==") == refusal
        assert client.cmd(b"AUTH LOGIN") == refusal
        # The same connection may log in once it is encrypted.
        assert client.cmd(b"STLS").startswith(b"+OK")
        tls = TlsRawClient.__new__(TlsRawClient)
        tls.sock, tls.buf = client.sock, b""
        tls.start_tls(pki.client_context())
        client.sock = tls.sock
        assert client.cmd(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==").startswith(b"+OK alice's")
        client.cmd(b"QUIT")
    refusals = [r for r in caplog.records if r.name == "pop3d.auth"]
    assert len(refusals) == 4
    assert all("127.0.0.1" in r.getMessage() for r in refusals)
    assert "secret" not in caplog.text


def test_secure_networks_allow_cleartext(pop3_server: Pop3TestServer) -> None:
    """Loopback is a secure network by default: cleartext USER/PASS work there."""
    pop3_server.add_message("alice", MESSAGE)
    with RawClient(pop3_server.host, pop3_server.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK alice's maildrop")


# --------------------------------------------------------------------------- SNI and reload


def _served_cert(port: int, pki: Pki, server_hostname: str | None) -> dict[str, object]:
    ctx = pki.client_context()
    ctx.check_hostname = False
    with TlsRawClient("127.0.0.1", port, context=ctx, server_hostname=server_hostname) as c:
        cert = c.sock.getpeercert()  # type: ignore[attr-defined]
    assert isinstance(cert, dict)
    return cert


def _names(cert: dict[str, object]) -> set[str]:
    sans = cert.get("subjectAltName", ())
    assert isinstance(sans, tuple)
    return {str(value) for _, value in sans}


def test_sni_chooses_the_certificate(pop3_server_factory: Factory, pki: Pki) -> None:
    """SNI picks the configured certificate for a name (also by wildcard); else the default."""
    mail_cert, mail_key = pki.issue("mail", "mail.example.org")
    wild_cert, wild_key = pki.issue("wild", "*.example.net")
    srv = pop3_server_factory(
        sections={
            "tls": pki.tls_section(
                sni={
                    "mail.example.org": {"cert": str(mail_cert), "key": str(mail_key)},
                    "*.example.net": {"cert": str(wild_cert), "key": str(wild_key)},
                }
            )
        },
        tls_listen=["127.0.0.1:0"],
    )
    assert _names(_served_cert(srv.tls_port, pki, "mail.example.org")) == {"mail.example.org"}
    assert _names(_served_cert(srv.tls_port, pki, "MAIL.example.org")) == {"mail.example.org"}
    assert _names(_served_cert(srv.tls_port, pki, "pop.example.net")) == {"*.example.net"}
    assert _names(_served_cert(srv.tls_port, pki, "other.test")) == {"localhost", "127.0.0.1"}
    assert _names(_served_cert(srv.tls_port, pki, None)) == {"localhost", "127.0.0.1"}
    # STLS goes through the same selection.
    ctx = pki.client_context()
    with TlsRawClient("127.0.0.1", srv.port) as client:
        assert client.cmd(b"STLS").startswith(b"+OK")
        client.start_tls(ctx, server_hostname="mail.example.org")
        assert client.cmd(b"NOOP") == b"-ERR command not valid in this state\r\n"


def _wait_log(proc: Pop3ServeProcess, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + WAIT
    while proc.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{proc.log_text()}"
        time.sleep(0.02)


@pytest.mark.timeout(90)
def test_sighup_reloads_certificates_keeping_sessions(
    tmp_path: Path, pki: Pki
) -> None:
    """SIGHUP re-reads the certificates: new handshakes get the new one, open sessions live on.

    A reload that fails (a broken key) keeps the certificates already loaded.
    """
    import signal  # noqa: PLC0415

    tls_port = free_port()
    with Pop3ServeProcess(
        tmp_path / "srv", users={"alice": "secret"}, sections={"tls": pki.tls_section()},
        tls_listen=[f"127.0.0.1:{tls_port}"],
    ) as proc:
        proc.add_message("alice", MESSAGE)
        ctx = pki.client_context()
        before = _served_cert(tls_port, pki, None)
        old_session = poplib.POP3_SSL("127.0.0.1", tls_port, context=ctx, timeout=WAIT)
        old_session.user("alice")
        old_session.pass_("secret")
        stls_session = poplib.POP3("127.0.0.1", proc.port, timeout=WAIT)
        stls_session.stls(ctx)

        pki.issue("server", "localhost", "127.0.0.1", "renewed.example.org")
        proc.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _wait_log(proc, "TLS certificates reloaded")
        after = _served_cert(tls_port, pki, None)
        assert "renewed.example.org" in _names(after)
        assert after["serialNumber"] != before["serialNumber"]
        # STLS uses the new certificate too.
        with TlsRawClient("127.0.0.1", proc.port) as client:
            client.cmd(b"STLS")
            client.start_tls(ctx)
            assert "renewed.example.org" in _names(client.sock.getpeercert())  # type: ignore[attr-defined]

        # Sessions opened before the reload are untouched.
        assert old_session.stat() == (1, len(MESSAGE))
        old_session.quit()
        stls_session.user("alice")
        stls_session.pass_("secret")
        stls_session.quit()

        pki.key_file.write_text("not a key\n")
        proc.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _wait_log(proc, "TLS reload failed")
        assert _served_cert(tls_port, pki, None)["serialNumber"] == after["serialNumber"]
        assert proc.stop() == 0


# --------------------------------------------------------------------------- connection limits


def test_connection_limit_per_address(pop3_server_factory: Factory) -> None:
    """Beyond max_connections_per_ip, a client gets -ERR [SYS/TEMP] and is closed."""
    srv = pop3_server_factory(max_connections_per_ip=2)
    first, second = RawClient(srv.host, srv.port), RawClient(srv.host, srv.port)
    try:
        with RawClient(srv.host, srv.port, timeout=WAIT) as third:
            assert third.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
            assert third.wait_eof() == b""
        first.cmd(b"QUIT")
        first.wait_eof()
        # The release of the slot is asynchronous: poll (bounded).
        assert wait_until(lambda: greets(srv), WAIT), "the slot freed by QUIT never came back"
    finally:
        first.close()
        second.close()


def test_connection_limit_total(pop3_server_factory: Factory) -> None:
    """Beyond max_connections in total, a client gets -ERR [SYS/TEMP] and is closed."""
    srv = pop3_server_factory(max_connections=1)
    with RawClient(srv.host, srv.port) as first:
        with RawClient(srv.host, srv.port) as second:
            assert second.greeting == b"-ERR [SYS/TEMP] too many connections\r\n"
            assert second.wait_eof() == b""
        assert first.cmd(b"NOOP") == b"-ERR command not valid in this state\r\n"


def test_command_in_same_flight_as_handshake_finish_is_answered(
    tls_server: Pop3TestServer, pki: Pki
) -> None:
    """Encrypted commands sent together with the client's Finished are answered (mpop does)."""
    import socket  # noqa: PLC0415

    sock = socket.create_connection(("127.0.0.1", tls_server.port), timeout=WAIT)
    try:
        sock.recv(1024)  # greeting
        sock.sendall(b"STLS\r\n")
        assert sock.recv(1024) == b"+OK Begin TLS negotiation now\r\n"
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(b"CAPA\r\n")
        sock.sendall(outgoing.read())  # client Finished and CAPA in one segment
        reply = b""
        while b"\r\n.\r\n" not in reply:
            data = sock.recv(65536)
            assert data, "the server closed instead of answering"
            incoming.write(data)
            try:
                reply += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
        assert reply.startswith(b"+OK Capability list follows\r\n")
        assert b"\r\nSTLS\r\n" not in reply
    finally:
        sock.close()
