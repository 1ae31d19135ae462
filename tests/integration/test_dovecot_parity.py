"""Dovecot 2.3 as the reference: the same byte-level transcript against both servers.

Where RFC 1939 leaves room, clients are used to what Dovecot does, so for the messages
that trip servers up (leading dots, bare LF, mixed line ends, 8-bit, no final newline)
pop3d must send what Dovecot sends, byte for byte, stuffing included.  Two deliberate
differences are asserted as such:

* a message without a final newline: both send a closing CRLF, but Dovecot's LIST/RETR
  octet count leaves it out, so its count disagrees with what it sends; pop3d counts it
  (RFC 1939 §11: the size is what is sent, before stuffing);
* an empty message file: Dovecot sends one empty line (not counted in its size 0);
  pop3d sends no line at all, which is what the size 0 says;
* a message whose first line is ``.``: Dovecot does not stuff it and so desynchronises
  its clients; pop3d stuffs every line, the first included.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest

from pop3d.testing import Pop3TestServer

from .dovecot import Dovecot
from .helpers import RawClient
from .messages import TRICKY

pytestmark = [
    pytest.mark.dovecot,
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("dovecot") is None, reason="dovecot is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandboxed Dovecot runs as root"),
]



def _dotted(lines: int, every: int) -> bytes:
    """A text of several 1 MiB read chunks, one line in ``every`` led by dots (1: all)."""
    leads = (b".", b"..", b". ", b"...")
    body = b"".join(
        (leads[i % 4] if i % every == 0 else b"") + b"> quoted line %d of a long reply\n" % i
        for i in range(lines)
    )
    return b"Subject: dots\n\n" + body + b".\n"


#: The shared tricky messages plus a few only this comparison needs: the last two big and
#: dense with line-start dots (the stuffing of pop3d[fast] for such chunks, pop3d.simdtext).
PARITY: dict[str, bytes] = {
    **TRICKY,
    "headers-only": b"Subject: headers only\nFrom: a@example.org\n",
    "lone-cr": b"Subject: lone CR\n\nbefore\rafter\n",
    "crlf-no-final": b"Subject: crlf\r\n\r\nno final CRLF",
    "long-line": b"Subject: long\n\n" + b"x" * 5000 + b"\n." + b"y" * 3000 + b"\n",
    "empty-lines-dots": b"\n\n.\n\n..\n",
    "empty-file": b"",
    "dots-11-percent": _dotted(60_000, 9),
    "dots-every-line": _dotted(60_000, 1),
}
NAMES = list(PARITY)
NO_FINAL_NEWLINE = {n for n, d in PARITY.items() if d and not d.endswith(b"\n")}


def transcript() -> list[bytes]:
    """The commands both servers get, in one pipelined write."""
    cmds = [b"USER alice", b"PASS secret", b"STAT", b"LIST"]
    for n in range(1, len(PARITY) + 1):
        cmds += [b"LIST %d" % n, b"RETR %d" % n, b"TOP %d 0" % n, b"TOP %d 2" % n]
    cmds += [b"RETR %d" % (len(PARITY) + 1), b"DELE 1", b"RETR 1", b"RSET", b"NOOP", b"QUIT"]
    return cmds


MULTI = (b"LIST", b"RETR", b"TOP", b"UIDL", b"CAPA")


def run_transcript(host: str, port: int) -> list[tuple[bytes, bytes, bytes]]:
    """Send the transcript in one write; return (command, status line, raw body) each."""
    out: list[tuple[bytes, bytes, bytes]] = []
    with RawClient(host, port) as client:
        cmds = transcript()
        client.send(b"".join(c + b"\r\n" for c in cmds))
        for cmd in cmds:
            status = client.line()
            multi = cmd == b"LIST" or cmd.split()[0] in (b"RETR", b"TOP")
            body = client.raw_multiline() if multi and status.startswith(b"+OK") else b""
            out.append((cmd, status, body))
    return out


@pytest.fixture(scope="module")
def dovecot_transcript() -> Iterator[list[tuple[bytes, bytes, bytes]]]:
    with Dovecot({"alice": "secret"}) as dc:
        base = int(time.time()) - 1000
        for i, data in enumerate(PARITY.values()):
            dc.add_message("alice", f"{base + i}.M{i}P1.test", data)
        dc.start()
        yield run_transcript(dc.host, dc.port)


@pytest.fixture
def pop3d_transcript(pop3_server: Pop3TestServer) -> list[tuple[bytes, bytes, bytes]]:
    for data in PARITY.values():
        pop3_server.add_message("alice", data)
    return run_transcript(pop3_server.host, pop3_server.port)


def test_same_bytes_as_dovecot(
    dovecot_transcript: list[tuple[bytes, bytes, bytes]],
    pop3d_transcript: list[tuple[bytes, bytes, bytes]],
) -> None:
    """RETR/TOP bodies (stuffed) and octet counts match Dovecot's, but for no-final-newline."""
    assert len(dovecot_transcript) == len(pop3d_transcript)
    for (cmd, d_status, d_body), (_, p_status, p_body) in zip(
        dovecot_transcript, pop3d_transcript, strict=True
    ):
        # The verdict is the same for every command.
        assert d_status[:3] == p_status[:3], (cmd, d_status, p_status)
        verb = cmd.split()[0]
        if verb in (b"RETR", b"TOP") and p_status.startswith(b"+OK"):
            if NAMES[int(cmd.split()[1]) - 1] == "empty-file":
                # Dovecot sends an empty line it does not count; pop3d sends no line.
                assert (d_body, p_body) == (b"\r\n.\r\n", b".\r\n"), cmd
                continue
            assert p_body == d_body, cmd
        if verb == b"RETR" and p_status.startswith(b"+OK"):
            name = NAMES[int(cmd.split()[1]) - 1]
            content = p_body[:-3]  # without the ".CRLF" terminator
            sent = len(content) - content.startswith(b".") - content.count(b"\r\n.")  # unstuffed
            assert int(p_status.split()[1]) == sent, cmd  # pop3d counts what it sends
            extra = 2 if name in NO_FINAL_NEWLINE else 0  # Dovecot leaves out the added CRLF
            assert int(p_status.split()[1]) == int(d_status.split()[1]) + extra, name
        if cmd.startswith(b"LIST ") and p_status.startswith(b"+OK"):
            name = NAMES[int(cmd.split()[1]) - 1]
            extra = 2 if name in NO_FINAL_NEWLINE else 0
            assert int(p_status.split()[2]) == int(d_status.split()[2]) + extra, name


def test_message_of_a_lone_dot_is_stuffed(pop3_server: Pop3TestServer) -> None:
    """A message that is just "." is sent as "..": the first line is stuffed (unlike Dovecot)."""
    pop3_server.add_message("alice", b".")
    pop3_server.add_message("alice", b".\n.\n")
    with RawClient(pop3_server.host, pop3_server.port) as client:
        assert client.login(b"alice", b"secret").startswith(b"+OK")
        assert client.cmd(b"RETR 1") == b"+OK 3 octets\r\n"
        assert client.raw_multiline() == b"..\r\n.\r\n"
        assert client.cmd(b"RETR 2") == b"+OK 6 octets\r\n"
        assert client.raw_multiline() == b"..\r\n..\r\n.\r\n"
        assert client.cmd(b"NOOP") == b"+OK\r\n"  # still in step
