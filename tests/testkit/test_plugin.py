"""The pytest plugin's fixtures, used as a project's tests would use them."""

from __future__ import annotations

import base64
import poplib
import subprocess
from email.message import EmailMessage
from pathlib import Path

import pytest

from pop3d.testing.scripted import ScriptedPop3Server

pytestmark = pytest.mark.timeout(60)


def test_deliver_bytes_str_and_email_message(pop3_server: ScriptedPop3Server) -> None:
    message = EmailMessage()
    message["Subject"] = "third"
    message.set_content("body three")
    pop3_server.deliver("bob", b"Subject: first\r\n\r\nbody one\r\n")
    pop3_server.deliver("bob", "Subject: second\n\nbody two\n")
    pop3_server.deliver("bob", message)
    assert [m["Subject"] for m in pop3_server.mailbox("bob")] == ["first", "second", "third"]
    client = pop3_server.client("bob")
    try:
        assert client.stat()[0] == 3
        assert b"body three" in client.retr(3)[1]
    finally:
        client.quit()


def test_password_of_a_new_user_logs_in(pop3_server: ScriptedPop3Server) -> None:
    password = pop3_server.password("carol")
    assert pop3_server.password("carol") == password
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    client.user("carol")
    assert client.pass_(password).startswith(b"+OK")
    client.quit()


def test_pop3_client_is_logged_in_and_deletes(
    pop3_server: ScriptedPop3Server, pop3_client: poplib.POP3
) -> None:
    assert pop3_client.stat() == (0, 0)
    pop3_server.deliver("alice", "Subject: late\n\nafter login\n")
    pop3_client.quit()
    client = pop3_server.client("alice")
    client.dele(1)
    client.quit()
    assert pop3_server.mailbox("alice") == []


def test_transcript_masks_passwords_and_sasl(pop3_server: ScriptedPop3Server) -> None:
    password = pop3_server.password("alice")
    pop3_server.client("alice").quit()
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    client.stls(pop3_server.client_context())
    initial = base64.b64encode(f"\0alice\0{password}".encode()).decode()
    assert client._shortcmd(  # type: ignore[attr-defined]
        f"AUTH PLAIN {initial}").startswith(b"+OK")
    client.quit()
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    client.stls(pop3_server.client_context())
    assert client._shortcmd(  # type: ignore[attr-defined]
        "AUTH PLAIN").startswith(b"+")
    assert client._shortcmd(  # type: ignore[attr-defined]
        initial).startswith(b"+OK")
    client.quit()
    pop3_server.wait_idle()
    text = str(pop3_server.transcript)
    assert password not in text
    assert initial not in text
    lines = pop3_server.transcript.lines()
    assert "C: PASS ****" in lines
    assert "C: AUTH PLAIN ****" in lines
    assert lines.count("C: ****") == 1
    assert "*: TLS established" in lines
    assert [s.user for s in pop3_server.transcript.sessions] == ["alice"] * 3


def test_tls_implicit_and_stls_trust_the_ca(pop3_server: ScriptedPop3Server) -> None:
    pop3_server.deliver("alice", "Subject: tls\n\nsecret\n")
    for mode in ("stls", "implicit"):
        client = pop3_server.client("alice", tls=mode)
        assert client.retr(1)[1][-1] == b"secret"
        client.quit()
        pop3_server.wait_idle()
    assert pop3_server.ca_cert_path.read_text().startswith("-----BEGIN CERTIFICATE-----")


@pytest.mark.pop3_server(users={"dave": "pw"}, apop=True)
def test_marker_configures_the_server(pop3_server: ScriptedPop3Server) -> None:
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    assert client.apop("dave", "pw").startswith(b"+OK")
    client.quit()


def test_session_server_is_shared_and_resets(pop3_server_session: ScriptedPop3Server) -> None:
    pop3_server_session.deliver("erin", "Subject: x\n\ny\n")
    pop3_server_session.faults.add("latency", seconds=0.01)
    pop3_server_session.reset()
    assert pop3_server_session.mailbox("erin") == []
    assert len(pop3_server_session.faults) == 0
    assert len(pop3_server_session.transcript) == 0


@pytest.mark.client
def test_mpop_over_stls_through_the_recording_wire(
    pop3_server: ScriptedPop3Server, tmp_path: Path
) -> None:
    """mpop (GnuTLS) sends CAPA in the flight that ends its handshake: still answered."""
    pop3_server.deliver("alice", "Subject: m\n\nfor mpop\n")
    maildir = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    rc = tmp_path / "mpoprc"
    rc.write_text(
        f"account test\nhost 127.0.0.1\nport {pop3_server.port}\nuser alice\n"
        f"password {pop3_server.password('alice')}\ntls on\ntls_starttls on\n"
        f"tls_trust_file {pop3_server.ca_cert_path}\ntls_host_override localhost\n"
        f"auth user\ndelivery maildir {maildir}\nkeep on\nonly_new off\n"
        f"uidls_file {tmp_path / 'uidls'}\n",
        encoding="utf-8",
    )
    rc.chmod(0o600)
    run = subprocess.run(
        ["mpop", "-C", str(rc), "-a", "-q"], capture_output=True, text=True, timeout=30,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    got = list((maildir / "new").iterdir())
    assert len(got) == 1
    assert got[0].read_bytes().endswith(b"for mpop\n")
    pop3_server.wait_idle()
    lines = pop3_server.transcript.lines()
    assert "*: TLS established" in lines
    assert "C: PASS ****" in lines
    assert pop3_server.transcript.sessions[0].tls
