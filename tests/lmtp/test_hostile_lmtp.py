"""Hostile LMTP input against a real ``pop3d serve`` (smtplib.LMTP): what the fuzzer found.

Every reply is printable ASCII (no control octet of the client's comes back), carries an
RFC 3463 enhanced status code (RFC 2034: LMTP advertises ENHANCEDSTATUSCODES), and never
an exception's text; a non-UTF-8 address and an address the parser chokes on are clean
refusals, logged once, with no traceback.  The last test makes a command raise
in-process to see :meth:`LmtpServerProtocol.handle_exception`'s fixed ``451 4.3.0``.
"""

from __future__ import annotations

import logging
import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3d.lmtp import LmtpHandler, wire_reply

from .test_end_to_end import Served
from .test_lmtp import Env

#: A reply's text with its enhanced status code (smtplib gives the text after the code).
ENHANCED = re.compile(rb"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ``pop3d serve`` (Maildir, LMTP on TCP) for the module's tests."""
    s = Served(tmp_path_factory.mktemp("hostile-lmtp"), "maildir", "tcp")
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            assert s.stop() == 0
        assert "Traceback" not in (s.root / "serve.log").read_text(errors="replace")


@pytest.fixture
def lmtp(served: Served) -> Iterator[smtplib.LMTP]:
    client = served.lmtp()
    try:
        client.ehlo_or_helo_if_needed()
        yield client
    finally:
        client.close()


def wait_log(served: Served, text: str) -> int:
    """How many lines of the server's log hold ``text``, once one does (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        lines = (served.root / "serve.log").read_text(errors="replace").splitlines()
        found = sum(text in line for line in lines)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def printable(text: bytes) -> bool:
    return all(0x20 <= octet < 0x7F for octet in text)


def test_rcpt_control_octets_are_not_echoed(lmtp: smtplib.LMTP) -> None:
    """An unknown recipient full of control octets: 550 5.1.1, none of them echoed."""
    assert lmtp.mail("<>")[0] == 250
    code, text = lmtp.rcpt("<nob\x01\x00\x1b[2Jody>")
    assert code == 550
    assert text.startswith(b"5.1.1 ")
    assert printable(text), text


def test_non_utf8_rcpt_is_a_clean_refusal(served: Served, lmtp: smtplib.LMTP) -> None:
    """A recipient that is not UTF-8: 553 5.1.3, no exception text, logged once."""
    assert lmtp.mail("<a@b>")[0] == 250
    lmtp.send(b"RCPT TO:<al\xffice>\r\n")
    code, text = lmtp.getreply()
    assert (code, text) == (553, b"5.1.3 Recipient address is not valid UTF-8")
    lmtp.send(b"RCPT TO:<alice@example.com>\r\n")  # the session goes on
    assert lmtp.getreply()[0] == 250
    assert lmtp.noop() == (250, b"2.0.0 OK")
    assert lmtp.quit()[0] == 221  # the session's log lines are written by its end
    assert wait_log(served, "recipient address that is not valid UTF-8") == 1


def test_non_utf8_sender_is_a_clean_refusal(lmtp: smtplib.LMTP) -> None:
    """A sender that is not UTF-8 (it would go into Return-Path): 553 5.1.7."""
    lmtp.send(b"MAIL FROM:<b\xfe\xffob@example.org>\r\n")
    assert lmtp.getreply() == (553, b"5.1.7 Sender address is not valid UTF-8")
    assert lmtp.mail("<bob@example.org>")[0] == 250


@pytest.mark.parametrize("command", ["MAIL FROM:<", "MAIL FROM: <"])
def test_mail_from_open_angle_is_a_syntax_error(lmtp: smtplib.LMTP, command: str) -> None:
    """``MAIL FROM:<`` (the stdlib parser raises IndexError on it): 501 5.5.4."""
    code, text = lmtp.docmd(command)
    assert code == 501
    assert text.startswith(b"5.5.4 Syntax: MAIL FROM: <address>")
    assert b"Error: (" not in text
    assert lmtp.mail("<>")[0] == 250


def test_every_reply_has_an_enhanced_status_code(lmtp: smtplib.LMTP) -> None:
    """aiosmtpd's own replies get their RFC 3463 codes; unknown commands and VRFY
    arguments are not echoed."""
    replies = [
        lmtp.noop(),
        lmtp.rset(),
        lmtp.docmd("DATA"),  # no MAIL yet
        lmtp.docmd("RCPT TO:<alice>"),  # no MAIL yet
        lmtp.docmd("XYZZY\x1b[2J"),
        lmtp.docmd("VRFY", "<\x1b]0;x>"),
        lmtp.docmd("MAIL", "FROM:<a@b> FOO=1"),
        lmtp.docmd("EXPN", "list"),
    ]
    assert [code for code, _ in replies] == [250, 250, 503, 503, 500, 252, 555, 502]
    for code, text in replies:
        assert ENHANCED.match(text), (code, text)
        assert printable(text), text
    assert replies[4][1] == b"5.5.2 Error: command not recognized"
    assert b"0;x" not in replies[5][1]
    assert lmtp.quit() == (221, b"2.0.0 Bye")


def test_lhlo_reply_is_unchanged(served: Served) -> None:
    """The greeting and the LHLO keywords carry no enhanced code (RFC 2034 §3)."""
    client = served.lmtp()
    try:
        code, text = client.ehlo()  # smtplib.LMTP sends LHLO
        assert code == 250
        assert not ENHANCED.match(text.splitlines()[0])
        assert client.has_extn("enhancedstatuscodes")
        assert client.has_extn("pipelining")
        code, text = client.docmd("HELP")
        assert code == 250
        assert {b"LHLO", b"VRFY", b"MAIL", b"RCPT", b"DATA"} <= set(text.split())
    finally:
        client.close()


def test_wire_reply() -> None:
    """The one gate every reply line passes."""
    assert wire_reply("250 OK") == b"250 2.0.0 OK"
    assert wire_reply("250 2.1.5 Ok") == b"250 2.1.5 Ok"
    assert wire_reply("501 Syntax: X") == b"501 5.5.4 Syntax: X"
    assert wire_reply("221") == b"221 2.0.0"
    assert wire_reply("354 End data") == b"354 End data"
    assert wire_reply("550 5.1.1 <a\r\nb\x00\xe9>", enhanced=False) == b"550 5.1.1 <a??b??>"
    assert wire_reply(b"220 host\x1b", enhanced=False) == b"220 host?"


def test_an_unexpected_exception_is_a_fixed_451(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception escaping a command: ``451 4.3.0`` without its text, logged once."""

    async def broken(*_args: object) -> str:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(LmtpHandler, "handle_MAIL", broken)
    caplog.set_level(logging.INFO)
    env = Env(tmp_path, "maildir", "127.0.0.1:0", 1 << 20)
    env.server.start()
    try:
        host, port = env.server.sockname
        with smtplib.LMTP(host, port, timeout=10) as client:
            client.ehlo()
            code, text = client.mail("<bob@example.org>")
            assert (code, text) == (451, b"4.3.0 Internal error, try again later")
            assert client.noop() == (250, b"2.0.0 OK")
    finally:
        env.server.stop()
        env.auth.close()
    errors = [r for r in caplog.records if r.exc_info is not None]
    assert len(errors) == 1
    assert "secret internals" in errors[0].getMessage() + str(errors[0].exc_info)
