"""Postfix-style delivery into ``pop3d serve``, then retrieval by POP3 (poplib), for both stores.

``pop3d serve --config`` runs as a subprocess with ``[lmtp] listen`` set; mail goes in
through LMTP and through ``pop3d deliver``, comes out through POP3 RETR byte for byte,
and DELE + QUIT removes exactly what was deleted.
"""

from __future__ import annotations

import poplib
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3d.testing import free_port, wait_for_port

MESSAGE = b"Subject: e2e\r\nFrom: bob@example.org\r\n\r\nFrom the top\r\n.dot line\r\n>From x\r\n"


class Served:
    """A running ``pop3d serve`` with POP3 and LMTP on loopback.

    ``storage`` holds extra lines of ``[storage]`` (each ending in a newline).
    """

    def __init__(self, root: Path, kind: str, transport: str, storage: str = "") -> None:
        self.root = root
        self.pop_port = free_port()
        self.lmtp_port = free_port()
        self.lmtp_socket = root / "lmtp.sock"
        lmtp = f"127.0.0.1:{self.lmtp_port}" if transport == "tcp" else f"unix:{self.lmtp_socket}"
        (root / "users").write_text("alice:{PLAIN}secret\n")
        template = "mail/%u/Maildir" if kind == "maildir" else "mbox/%u"
        self.config = root / "pop3d.toml"
        self.config.write_text(
            f'[server]\nlisten = ["127.0.0.1:{self.pop_port}"]\nworkers = 2\n'
            f'[auth]\npasswd_file = "users"\nfailure_delay = 0\n'
            f'[storage]\n{kind} = "{template}"\n{storage}'
            f'[lmtp]\nlisten = ["{lmtp}"]\n'
        )
        self.transport = transport
        self.log = (root / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pop3d", "serve", "--config", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for_port("127.0.0.1", self.pop_port, process=self.proc)
            if transport == "tcp":
                wait_for_port("127.0.0.1", self.lmtp_port, process=self.proc, expect=b"220")
            else:
                self.lmtp().quit()
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            self.log.close()
            raise

    def lmtp(self) -> smtplib.LMTP:
        """An LMTP client connected to the server (smtplib takes a path for UNIX sockets)."""
        if self.transport == "tcp":
            return smtplib.LMTP("127.0.0.1", self.lmtp_port, timeout=10)
        for _ in range(500):
            if self.lmtp_socket.exists():
                return smtplib.LMTP(str(self.lmtp_socket), timeout=10)
            time.sleep(0.01)
        raise TimeoutError(self.lmtp_socket)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            self.log.close()

    def pop(self) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.pop_port, timeout=10)
        client.user("alice")
        client.pass_("secret")
        return client


@pytest.fixture(params=["maildir-tcp", "mbox-tcp", "maildir-unix", "mbox-unix"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    """pop3d serve with two worker processes (they share the LMTP address as the POP3 one)."""
    kind, transport = request.param.split("-")
    s = Served(tmp_path, kind, transport)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            assert s.stop() == 0


def retr(client: poplib.POP3, n: int) -> bytes:
    """RETR n as octets on the wire (poplib strips CRLF and un-stuffs dots)."""
    _, lines, octets = client.retr(n)
    data = b"".join(line + b"\r\n" for line in lines)
    assert len(data) == octets
    return data


def test_lmtp_and_deliver_then_pop3_retrieval(served: Served) -> None:
    """Mail in by LMTP and by pop3d deliver comes out of POP3 RETR byte for byte."""
    with served.lmtp() as lmtp:
        lmtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE)
    done = subprocess.run(
        [sys.executable, "-m", "pop3d", "deliver", "--config", str(served.config), "alice"],
        input=MESSAGE.replace(b"\r\n", b"\n"), capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    via_lmtp = b"Return-Path: <bob@example.org>\r\nDelivered-To: alice@example.com\r\n" + MESSAGE
    client = served.pop()
    try:
        count, _ = client.stat()
        assert count == 2
        listed = [int(x.split()[1]) for x in client.list()[1]]
        got = [retr(client, 1), retr(client, 2)]
        # Both arrived within a second: their order is not what this test is about.
        assert sorted(got) == sorted([via_lmtp, MESSAGE])
        assert listed == [len(m) for m in got]
        uids = [u.split()[1] for u in client.uidl()[1]]
        lmtp_number = got.index(via_lmtp) + 1
        client.dele(lmtp_number)
        client.quit()
    finally:
        client.close()
    client = served.pop()
    try:
        assert client.stat()[0] == 1
        assert retr(client, 1) == MESSAGE
        assert client.uidl()[1][0].split()[1] == uids[2 - lmtp_number]
        client.quit()
    finally:
        client.close()


def test_lmtp_delivery_during_a_pop3_session(served: Served) -> None:
    """Mail that arrives by LMTP during a POP3 session is not seen and survives its deletes."""
    with served.lmtp() as lmtp:
        lmtp.sendmail("a@b", ["alice"], b"Subject: old\r\n\r\n")
    client = served.pop()
    try:
        assert client.stat()[0] == 1
        with served.lmtp() as lmtp:
            lmtp.sendmail("a@b", ["alice"], b"Subject: new\r\n\r\n")
        assert client.stat()[0] == 1
        client.dele(1)
        client.quit()
    finally:
        client.close()
    client = served.pop()
    try:
        assert client.stat()[0] == 1
        assert retr(client, 1).endswith(b"Subject: new\r\n\r\n")
        client.quit()
    finally:
        client.close()
