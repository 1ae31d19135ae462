"""Fuzz target: the whole POP3 core (:class:`Pop3Connection`) fed arbitrary octets.

The core is driven by the in-memory driver of the protocol tests (every request event is
answered as a backend would), with every feature on or off as the input says.  Properties:

* nothing but the core's own replies comes out: no exception, whatever the bytes, the
  chunking or the order of commands;
* the replies are well formed: CRLF-terminated lines of printable ASCII; each status line
  is ``+OK``, ``-ERR`` or a SASL ``+`` continuation; a multi-line body follows only a
  ``+OK`` and ends with ``.``, its lines dot-stuffed;
* the output does not depend on how the input was cut (outside STLS, where what is
  discarded depends, by design, on what had arrived).
"""

from __future__ import annotations

import base64

from pop3d.auth.schemes import ScramSecret
from pop3d.protocol import Pop3Connection, Pop3Settings
from pop3d.protocol import sasl as sasl_mod
from tests.fuzz import harness
from tests.protocol.driver import FakeDriver

#: Messages of the fake maildrop: dot-led lines, a lone dot, no final line end, empty.
_MESSAGES = (
    ("uid-1", b"Subject: one\r\n\r\nbody\r\n"),
    ("uid-2", b".\r\n..\r\n.x\r\nline\n\nlast without end"),
    ("uid-3", b""),
    ("uid-4", b"Subject: long\n\n" + b"a" * 3000 + b"\n.\n"),
)

_SCRAM = ScramSecret.derive(b"pencil", b"salt-for-fuzzing", 4096, "sha256").encode()


def _settings(flags: int) -> Pop3Settings:
    return Pop3Settings(
        apop_timestamp=b"<1.2@fuzz>" if flags & 1 else None,
        tls_available=bool(flags & 2),
        tls_active=bool(flags & 4),
        plaintext_allowed=bool(flags & 8),
        sasl_mechanisms=tuple(sasl_mod.REGISTRY) if flags & 16 else ("PLAIN", "LOGIN"),
        sasl_nonce="nonce123" if flags & 32 else "",
        client_identity="alice" if flags & 64 else None,
        login_delay=5 if flags & 128 else 0,
        max_bad_commands=1000,
    )


def _driver() -> FakeDriver:
    return FakeDriver(
        users={"alice": b"secret"},
        accounts={"bob"},
        secrets={("alice", "SCRAM-SHA-256"): _SCRAM,
                 ("alice", "CRAM-MD5"): b"0" * 32},
        messages=list(_MESSAGES),
    )


def _run(settings: Pop3Settings, pieces: list[bytes], eof: bool) -> tuple[bytes, FakeDriver]:
    driver = _driver()
    conn = Pop3Connection(settings)
    out = [driver.run(conn)]
    for piece in [*pieces, b""] if eof else pieces:  # b"": the peer closed
        conn.receive_data(piece)
        out.append(driver.run(conn))
    return b"".join(out), driver


def _is_status(line: bytes) -> bool:
    return line.startswith((b"+OK", b"-ERR", b"+ ")) or line == b"+"


def check_replies(out: bytes) -> None:
    """Fail unless ``out`` is a sequence of well-formed POP3 replies (see the module head)."""
    assert out.endswith(b"\r\n"), "output ends inside a line"
    lines = out.split(b"\r\n")[:-1]
    in_body = False
    after_ok = False
    for line in lines:
        assert b"\r" not in line, "a bare CR in a reply"
        assert b"\n" not in line, "a bare LF in a reply"
        if in_body:
            if line == b".":
                in_body = False
            else:
                assert not line.startswith(b".") or line.startswith(b".."), "not stuffed"
            continue
        if _is_status(line):
            assert line.isascii(), line
            assert line.decode().isprintable(), line
            assert len(line) <= 512, "status line longer than RFC 2449 allows"
            after_ok = line.startswith(b"+OK")
            continue
        assert after_ok, f"a body line without a +OK before it: {line[:80]!r}"
        in_body = line != b"."
        after_ok = False


def test_one_input(data: bytes) -> None:
    """Drive two cores with the same bytes, cut two ways; check both outputs."""
    split = harness.Split(data)
    flags = split.byte()
    eof = bool(split.byte() & 1)
    text = split.rest()
    settings = _settings(flags)
    whole, driver = _run(settings, [text] if text else [], eof)
    check_replies(whole)
    cut, cut_driver = _run(settings, harness.Split(text[::-1]).pieces(text), eof)
    check_replies(cut)
    if not driver.tls_started and not cut_driver.tls_started:
        assert whole == cut, "the output depends on how the input was cut"
        assert driver.updates == cut_driver.updates


# A SCRAM client-first to seed the corpus with (see corpus/core/).
SCRAM_FIRST = base64.b64encode(b"n,,n=alice,r=abc")

if __name__ == "__main__":
    harness.main("tests.fuzz.fuzz_core")
