"""The LMTP listener: real clients (smtplib.LMTP, swaks, a raw socket) into Maildir and mbox.

Each test starts ``start_lmtp`` in a background thread with its own event loop, on
127.0.0.1 port 0 or a UNIX socket in tmp, and stops it before returning; what arrived is
read back through the store's own Maildrop and compared byte for byte.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import socket
import subprocess
import threading
from collections.abc import AsyncIterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pop3d.auth.passwd_file import PasswdFileAuthenticator
from pop3d.config import Config, LmtpConfig
from pop3d.errors import TemporaryBackendError
from pop3d.lmtp import bind_lmtp, start_lmtp
from pop3d.protocol.values import Principal
from pop3d.storage.maildir import MaildirStore
from pop3d.storage.mbox import MboxStore
from pop3d.storage.wire import to_wire

USERS = (
    "alice:{PLAIN}secret\n"
    "bob:{PLAIN}hunter2\n"
    "alice@example.com:{PLAIN}other\n"
    "tiny:{PLAIN}x::::::quota_rule=*:storage=100\n"
)

MESSAGE = b"From: bob@example.org\r\nSubject: hello\r\n\r\nline one\r\n.leading dot\r\nend\r\n"


class LmtpThread:
    """start_lmtp in a thread with its own loop; ``stop()`` closes it and joins."""

    def __init__(
        self,
        config: Config,
        authenticator: Any,
        deliverer: Any,
        sockets: list[socket.socket] | None = None,
    ) -> None:
        self.config = config
        self.sockets = sockets
        self.authenticator = authenticator
        self.deliverer = deliverer
        self.ready = threading.Event()
        self.sockname: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            self.ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        servers = await start_lmtp(
            self.config, self.authenticator, self.deliverer, sockets=self.sockets
        )
        self.sockname = servers[0].sockets[0].getsockname()
        self.ready.set()
        try:
            await self._stop.wait()
        finally:
            for server in servers:
                server.close()
            for server in servers:
                await server.wait_closed()

    def start(self) -> LmtpThread:
        self._thread.start()
        assert self.ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()


class Env:
    """A passwd-file, a store, and the LMTP listener over them."""

    def __init__(self, tmp: Path, kind: str, listen: str, max_size: int) -> None:
        (tmp / "users").write_text(USERS)
        self.auth = PasswdFileAuthenticator(tmp / "users")
        self.store: MaildirStore | MboxStore
        if kind == "maildir":
            self.store = MaildirStore("mail/%u/Maildir", tmp)
        else:
            self.store = MboxStore("mbox/%u", tmp)
        self.config = Config(lmtp=LmtpConfig(listen=(listen,), max_message_size=max_size))
        self.server = LmtpThread(self.config, self.auth, self.store)

    def messages(self, name: str) -> list[bytes]:
        async def go() -> list[bytes]:
            md = await self.store.open(Principal(name))
            try:
                out = []
                for info in md.listing():
                    data = b"".join([c async for c in md.read(info.uid)])
                    assert len(data) == info.size
                    out.append(data)
                return out
            finally:
                await md.close()

        try:
            return asyncio.run(go())
        except TemporaryBackendError:
            return []  # no maildrop: nothing was ever delivered


@pytest.fixture(params=["maildir", "mbox"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, request.param, "127.0.0.1:0", 1 << 20)
    e.server.start()
    try:
        yield e
    finally:
        e.server.stop()
        e.auth.close()


def delivered(sender: str, rcpt: str, message: bytes) -> bytes:
    """What a recipient's maildrop holds after LMTP: Dovecot's two headers, then the message."""
    return f"Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n".encode() + to_wire(message)


class Raw:
    """A line-oriented LMTP client over a plain socket: exact replies, pipelining."""

    def __init__(self, address: Any) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address)
        self.file = self.sock.makefile("rb")
        assert self.reply()[0].startswith(b"220")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[bytes]:
        lines = []
        while True:
            line = self.file.readline()
            assert line.endswith(b"\r\n"), line
            lines.append(line[:-2])
            if line[3:4] != b"-":
                return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# ---------------------------------------------------------------------------- clients


def test_smtplib_lmtp_one_recipient(env: Env) -> None:
    """smtplib.LMTP delivers one message; the maildrop returns it byte for byte."""
    host, port = env.server.sockname
    with smtplib.LMTP(host, port) as client:
        client.sendmail("bob@example.org", ["bob"], MESSAGE)
    assert env.messages("bob") == [delivered("bob@example.org", "bob", MESSAGE)]


def test_one_reply_per_recipient_after_data(env: Env) -> None:
    """After DATA there is one reply per accepted RCPT, in order (aiosmtpd#517 fixed)."""
    client = Raw(env.server.sockname)
    try:
        client.send(b"LHLO test\r\n")
        caps = client.reply()
        assert b"250-PIPELINING" in caps
        assert b"250-ENHANCEDSTATUSCODES" in caps
        client.send(b"MAIL FROM:<bob@example.org>\r\n")
        assert client.reply() == [b"250 2.1.0 Ok"]
        for rcpt in (b"alice", b"nobody@example.com", b"bob@example.com"):
            client.send(b"RCPT TO:<" + rcpt + b">\r\n")
        assert client.reply() == [b"250 2.1.5 Ok"]
        assert client.reply() == [b"550 5.1.1 <nobody@example.com> User doesn't exist"]
        assert client.reply() == [b"250 2.1.5 Ok"]
        client.send(b"DATA\r\n")
        assert client.reply()[0].startswith(b"354")
        client.send(MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        assert client.reply() == [b"250 2.0.0 <alice> Saved"]
        assert client.reply() == [b"250 2.0.0 <bob@example.com> Saved"]
        client.send(b"QUIT\r\n")
        assert client.reply()[0].startswith(b"221")
    finally:
        client.close()
    assert env.messages("alice") == [delivered("bob@example.org", "alice", MESSAGE)]
    assert env.messages("bob") == [delivered("bob@example.org", "bob@example.com", MESSAGE)]


def test_pipelined_transaction(env: Env) -> None:
    """A whole transaction sent at once (PIPELINING) gets every reply, in order."""
    client = Raw(env.server.sockname)
    try:
        client.send(
            b"LHLO test\r\nMAIL FROM:<>\r\nRCPT TO:<alice>\r\nRCPT TO:<bob>\r\nDATA\r\n"
            b"Subject: bounce\r\n\r\nbody\r\n.\r\nQUIT\r\n"
        )
        client.reply()
        replies = [client.reply()[0][:3] for _ in range(6)]
        assert replies == [b"250", b"250", b"250", b"354", b"250", b"250"]
        assert client.reply()[0].startswith(b"221")
    finally:
        client.close()
    assert env.messages("alice") == [delivered("", "alice", b"Subject: bounce\r\n\r\nbody\r\n")]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_several_recipients(env: Env) -> None:
    """swaks --protocol LMTP to several recipients (--to a,b): each one gets the message."""
    host, port = env.server.sockname
    done = subprocess.run(
        ["swaks", "--protocol", "LMTP", "--server", f"{host}:{port}",
         "--from", "carol@example.net", "--to", "alice,bob@example.com",
         "--body", "swaks body", "--header", "Subject: from swaks"],
        capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.decode()
    assert "250 2.0.0 <alice> Saved" in out
    assert "250 2.0.0 <bob@example.com> Saved" in out
    [alice] = env.messages("alice")
    [bob] = env.messages("bob")
    assert alice.startswith(b"Return-Path: <carol@example.net>\r\nDelivered-To: alice\r\n")
    assert bob.startswith(b"Return-Path: <carol@example.net>\r\nDelivered-To: bob@example.com\r\n")
    assert alice.split(b"Delivered-To: alice\r\n", 1)[1] == bob.split(b"example.com\r\n", 1)[1]
    assert b"Subject: from swaks\r\n" in alice
    assert b"\r\n\r\nswaks body\r\n" in alice


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_unix_socket_listener(tmp_path: Path) -> None:
    """``unix:PATH`` listens on a UNIX socket (mode 0666) that swaks --socket delivers to."""
    sock = tmp_path / "lmtp.sock"
    e = Env(tmp_path, "mbox", f"unix:{sock}", 1 << 20)
    e.server.start()
    try:
        assert sock.stat().st_mode & 0o777 == 0o666
        done = subprocess.run(
            ["swaks", "--protocol", "LMTP", "--socket", str(sock), "--to", "alice",
             "--body", "over a socket"],
            capture_output=True, check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        e.server.stop()
        e.auth.close()
    [msg] = e.messages("alice")
    assert b"\r\n\r\nover a socket\r\n" in msg


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_prebound_sockets_serve(tmp_path: Path, transport: str) -> None:
    """Sockets bound by bind_lmtp() before a fork are served by start_lmtp(sockets=...)."""
    listen = f"unix:{tmp_path / 'l.sock'}" if transport == "unix" else "127.0.0.1:0"
    e = Env(tmp_path, "mbox", listen, 1 << 20)
    sockets = bind_lmtp(e.config)
    e.server.sockets = sockets
    e.server.start()
    try:
        client = Raw(e.server.sockname)
        client.send(b"LHLO t\r\nMAIL FROM:<a@b>\r\nRCPT TO:<alice>\r\nDATA\r\nS: x\r\n\r\n.\r\n")
        assert [client.reply()[0][:3] for _ in range(5)] == [b"250"] * 3 + [b"354", b"250"]
        client.close()
    finally:
        e.server.stop()
        e.auth.close()
        for sock in sockets:
            sock.close()
    assert len(e.messages("alice")) == 1


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_sibling_workers_binding_the_same_address(tmp_path: Path, transport: str) -> None:
    """Two start_lmtp on one address (worker processes) share a TCP port (SO_REUSEPORT);
    for a UNIX path the second one skips it, and neither fails."""
    listen = f"unix:{tmp_path / 'l.sock'}" if transport == "unix" else "127.0.0.1:0"
    e = Env(tmp_path, "mbox", listen, 1 << 20)
    e.server.start()
    same = listen if transport == "unix" else f"127.0.0.1:{e.server.sockname[1]}"
    sibling = LmtpThread(Config(lmtp=LmtpConfig(listen=(same,))), e.auth, e.store)
    try:
        if transport == "unix":
            with pytest.raises(IndexError):  # it started no server, so has no address
                sibling.start()
        else:
            sibling.start()
            assert sibling.sockname == e.server.sockname
            sibling.stop()
        with smtplib.LMTP(*_target(e.server.sockname)) as client:
            client.sendmail("a@b", ["alice"], b"S: x\r\n\r\n")
    finally:
        e.server.stop()
        e.auth.close()
    assert len(e.messages("alice")) == 1


def _target(sockname: Any) -> tuple[str, int]:
    """smtplib.LMTP's (host, port) for a socket name; a path is a UNIX socket."""
    if isinstance(sockname, str):
        return sockname, 0
    return sockname[0], sockname[1]


def test_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    """A socket file left by a dead server is replaced; a regular file is not touched."""
    sock = tmp_path / "lmtp.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # bound, never listening: what a killed server leaves
    e = Env(tmp_path, "mbox", f"unix:{sock}", 1 << 20)
    e.server.start()
    e.server.stop()
    other = tmp_path / "file"
    other.write_text("not a socket")
    e2 = Env(tmp_path, "mbox", f"unix:{other}", 1 << 20)
    with pytest.raises(FileExistsError):
        e2.server.start()
    e.auth.close()
    e2.auth.close()
    assert other.read_text() == "not a socket"


# ---------------------------------------------------------------------------- recipients


def test_local_at_domain_resolution(env: Env) -> None:
    """local@domain is that exact user if it exists, else the user ``local``."""
    host, port = env.server.sockname
    with smtplib.LMTP(host, port) as client:
        client.sendmail("x@y", ["alice@example.com"], b"Subject: exact\r\n\r\n")
    with smtplib.LMTP(host, port) as client:
        client.sendmail("x@y", ["alice@elsewhere.org"], b"Subject: local\r\n\r\n")
    assert env.messages("alice@example.com") == [
        delivered("x@y", "alice@example.com", b"Subject: exact\r\n\r\n")
    ]
    assert env.messages("alice") == [
        delivered("x@y", "alice@elsewhere.org", b"Subject: local\r\n\r\n")
    ]


@pytest.mark.parametrize("rcpt", ["nobody", "../alice", "alice/../bob", "..@example.com"])
def test_unknown_or_unsafe_recipient_is_550(env: Env, rcpt: str) -> None:
    """An unknown user (path tricks included) is refused at RCPT with 550 5.1.1."""
    host, port = env.server.sockname
    with smtplib.LMTP(host, port) as client:
        client.ehlo_or_helo_if_needed()
        client.mail("bob@example.org")
        code, text = client.rcpt(rcpt)
    assert code == 550
    assert text.startswith(b"5.1.1")
    assert env.messages("alice") == []


# ---------------------------------------------------------------------------- failures


def test_message_over_the_size_limit_is_552_for_each(tmp_path: Path) -> None:
    """Past max_message_size every recipient gets 552 5.3.4 and nothing is stored."""
    e = Env(tmp_path, "maildir", "127.0.0.1:0", 1000)
    e.server.start()
    client = Raw(e.server.sockname)
    try:
        client.send(b"LHLO t\r\n")
        assert b"250-SIZE 1000" in client.reply()
        client.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<alice>\r\nRCPT TO:<bob>\r\nDATA\r\n")
        assert [client.reply()[0][:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        client.send(b"x" * 600 + b"\r\n" + b"y" * 600 + b"\r\n.\r\n")
        assert client.reply() == [b"552 5.3.4 <alice> Message too big"]
        assert client.reply() == [b"552 5.3.4 <bob> Message too big"]
        client.send(b"MAIL FROM:<a@b> SIZE=5000\r\n")
        assert client.reply()[0].startswith(b"552")
    finally:
        client.close()
        e.server.stop()
        e.auth.close()
    assert e.messages("alice") == []


def test_quota_is_552_5_2_2(env: Env) -> None:
    """A recipient over quota gets 552 5.2.2; the others still get the message."""
    client = Raw(env.server.sockname)
    try:
        client.send(b"LHLO t\r\nMAIL FROM:<a@b>\r\nRCPT TO:<tiny>\r\nRCPT TO:<alice>\r\nDATA\r\n")
        assert [client.reply()[0][:3] for _ in range(5)] == [b"250"] * 4 + [b"354"]
        client.send(b"Subject: big\r\n\r\n" + b"z" * 200 + b"\r\n.\r\n")
        assert client.reply() == [b"552 5.2.2 <tiny> Mailbox is full"]
        assert client.reply() == [b"250 2.0.0 <alice> Saved"]
    finally:
        client.close()
    assert len(env.messages("alice")) == 1


class FlakyStore:
    """A Deliverer that fails for one user, as a full disk or a lock timeout would."""

    def __init__(self, inner: Any, failing: str) -> None:
        self.inner = inner
        self.failing = failing

    async def deliver(self, principal: Principal, message: AsyncIterable[bytes]) -> None:
        if principal.username == self.failing:
            async for _ in message:
                pass
            raise TemporaryBackendError("disk full")
        await self.inner.deliver(principal, message)


def test_storage_failure_is_451_for_that_recipient_only(tmp_path: Path) -> None:
    """A storage failure answers 451 4.3.0 for its recipient; the others are delivered."""
    e = Env(tmp_path, "maildir", "127.0.0.1:0", 1 << 20)
    e.server.deliverer = FlakyStore(e.store, "alice")
    e.server.start()
    client = Raw(e.server.sockname)
    try:
        client.send(b"LHLO t\r\nMAIL FROM:<a@b>\r\nRCPT TO:<alice>\r\nRCPT TO:<bob>\r\nDATA\r\n")
        assert [client.reply()[0][:3] for _ in range(5)] == [b"250"] * 4 + [b"354"]
        client.send(b"Subject: x\r\n\r\n.\r\n")
        assert client.reply() == [b"451 4.3.0 <alice> Temporary failure"]
        assert client.reply() == [b"250 2.0.0 <bob> Saved"]
    finally:
        client.close()
        e.server.stop()
        e.auth.close()
    assert len(e.messages("bob")) == 1


def test_connection_lost_during_data_delivers_nothing(env: Env) -> None:
    """A client that disconnects in the middle of DATA leaves no message anywhere."""
    client = Raw(env.server.sockname)
    client.send(b"LHLO t\r\nMAIL FROM:<a@b>\r\nRCPT TO:<alice>\r\nDATA\r\n")
    assert [client.reply()[0][:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
    client.send(b"Subject: half\r\n\r\nsome of it")
    client.close()
    host, port = env.server.sockname  # the server still works
    with smtplib.LMTP(host, port) as again:
        again.sendmail("a@b", ["bob"], b"Subject: whole\r\n\r\n")
    assert env.messages("alice") == []
    assert len(env.messages("bob")) == 1


# ---------------------------------------------------------------------------- content


def test_long_lines_nul_and_dots_arrive_intact(env: Env) -> None:
    """Lines far over 1000 octets, NUL, 8-bit and dot-stuffed lines arrive byte for byte."""
    message = b"Subject: odd\r\n\r\n" + b"L" * 5000 + b"\r\n\x00nul\xff\r\n.\r\n..two\r\nFrom x\r\n"
    client = Raw(env.server.sockname)
    try:
        client.send(b"LHLO t\r\nMAIL FROM:<a@b>\r\nRCPT TO:<alice>\r\nDATA\r\n")
        assert [client.reply()[0][:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        stuffed = message.replace(b"\r\n.", b"\r\n..")
        client.send(stuffed + b".\r\n")
        assert client.reply() == [b"250 2.0.0 <alice> Saved"]
    finally:
        client.close()
    assert env.messages("alice") == [delivered("a@b", "alice", message)]


def test_message_without_headers(env: Env) -> None:
    """A message with no header block at all is delivered as it came."""
    host, port = env.server.sockname
    with smtplib.LMTP(host, port) as client:
        client.sendmail("a@b", ["alice"], b"just a body line\r\n")
    assert env.messages("alice") == [delivered("a@b", "alice", b"just a body line\r\n")]


def test_delivery_while_a_session_is_open_is_unseen_and_kept(env: Env) -> None:
    """Mail delivered over LMTP during a POP3 session is not listed and survives its UPDATE."""
    host, port = env.server.sockname
    with smtplib.LMTP(host, port) as client:
        client.sendmail("a@b", ["alice"], b"Subject: old\r\n\r\n")

    async def session() -> None:
        md = await env.store.open(Principal("alice"))
        try:
            listing = list(md.listing())
            await asyncio.to_thread(send_new)
            assert list(md.listing()) == listing
            await md.commit([i.uid for i in listing])
        finally:
            await md.close()

    def send_new() -> None:
        with smtplib.LMTP(host, port) as client:
            client.sendmail("a@b", ["alice"], b"Subject: new\r\n\r\n")

    asyncio.run(session())
    assert env.messages("alice") == [delivered("a@b", "alice", b"Subject: new\r\n\r\n")]
