"""LMTP under load and abuse: connection caps, one copy per user, the quota under races.

Issue 14 item 7.  The quota races run through real ``pop3d serve`` processes (LMTP with
``smtplib.LMTP`` from ten threads at once) and ten ``pop3d deliver`` processes released
at the same moment, for Maildir and mbox.  Before the fix, ten parallel 90 KB messages
into a 100 KB Maildir quota stored 180-360 KiB through LMTP and 810 KiB through
``pop3d deliver``; now exactly one message is stored and the rest refused.
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3d import metrics
from pop3d.config import Config, LmtpConfig
from pop3d.errors import ConfigError
from pop3d.storage.quota import LOCK_NAME

from .quota_race import deliver_race, lmtp_race, stored
from .test_end_to_end import Served
from .test_lmtp import MESSAGE, Env, LmtpThread, Raw, delivered

pytestmark = pytest.mark.timeout(110)

@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Record what the LMTP listener reports to pop3d.metrics."""
    seen: dict[str, list[str]] = {"refused": [], "delivery": []}
    monkeypatch.setattr(metrics, "connection_refused", seen["refused"].append)
    monkeypatch.setattr(metrics, "lmtp_delivery", seen["delivery"].append)
    return seen


def capped_env(tmp: Path, total: int, per_ip: int) -> Env:
    env = Env(tmp, "maildir", "127.0.0.1:0", 1 << 20)
    env.config = Config(lmtp=LmtpConfig(
        listen=("127.0.0.1:0",), max_connections=total, max_connections_per_ip=per_ip,
    ))
    env.server = LmtpThread(env.config, env.auth, env.store)
    return env


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Env]:
    env = capped_env(tmp_path, total=1000, per_ip=3)
    env.server.start()
    yield env
    env.server.stop()
    env.auth.close()


def greeting(address: tuple[str, int]) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(address, timeout=10)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return sock, data


# ------------------------------------------------------------------ connection caps


def test_per_address_cap_refuses_at_accept_with_421(
    capped: Env, counted: dict[str, list[str]]
) -> None:
    """Past max_connections_per_ip: 421 4.3.2, closed; a freed slot admits again."""
    held = [greeting(capped.server.sockname) for _ in range(3)]
    assert all(g.startswith(b"220 ") for _, g in held)
    sock, reply = greeting(capped.server.sockname)
    assert reply == b"421 4.3.2 Too many connections, try again later\r\n"
    assert sock.recv(100) == b""  # closed by the server
    sock.close()
    assert counted["refused"] == ["per_ip"]
    held.pop()[0].close()
    for _ in range(200):  # the server notices the close in its own time
        sock, reply = greeting(capped.server.sockname)
        sock.close()
        if reply.startswith(b"220 "):
            break
        time.sleep(0.02)
    assert reply.startswith(b"220 ")
    for s, _ in held:
        s.close()


def test_total_cap_refuses_at_accept(tmp_path: Path, counted: dict[str, list[str]]) -> None:
    """Past max_connections (all addresses): 421 and the ``total`` cap counted."""
    env = capped_env(tmp_path, total=2, per_ip=64)
    env.server.start()
    try:
        held = [greeting(env.server.sockname) for _ in range(2)]
        sock, reply = greeting(env.server.sockname)
        sock.close()
        assert reply.startswith(b"421 4.3.2")
        assert counted["refused"] == ["total"]
        for s, _ in held:
            s.close()
    finally:
        env.server.stop()
        env.auth.close()


def test_caps_come_from_the_config(tmp_path: Path) -> None:
    """[lmtp] max_connections_per_ip defaults to 64; both keys are read."""
    from pop3d import config  # noqa: PLC0415

    assert config.LmtpConfig().max_connections_per_ip == 64
    cfg = config.from_mapping(
        {"server": {"listen": ["127.0.0.1:1"]},
         "lmtp": {"max_connections": 7, "max_connections_per_ip": 2}},
        tmp_path,
    )
    assert (cfg.lmtp.max_connections, cfg.lmtp.max_connections_per_ip) == (7, 2)
    with pytest.raises(ConfigError, match="max_connections"):
        config.from_mapping(
            {"server": {"listen": ["127.0.0.1:1"]}, "lmtp": {"max_connections_per_ip": 0}},
            tmp_path,
        )


# ------------------------------------------------------------------ one copy per user


def test_repeated_rcpt_of_one_user_stores_one_copy(
    capped: Env, counted: dict[str, list[str]]
) -> None:
    """alice, alice again, and alice@example.org (local part alice): one copy, 3 replies."""
    client = Raw(capped.server.sockname)
    try:
        client.send(b"LHLO test\r\n")
        client.reply()
        client.send(b"MAIL FROM:<bob@example.org>\r\n")
        assert client.reply() == [b"250 2.1.0 Ok"]
        rcpts = [b"alice", b"alice", b"alice@example.org", b"bob", b"nobody"]
        for rcpt in rcpts:
            client.send(b"RCPT TO:<" + rcpt + b">\r\n")
            client.reply()
        client.send(b"DATA\r\n")
        assert client.reply()[0].startswith(b"354")
        client.send(MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        replies = [client.reply() for _ in range(4)]
    finally:
        client.close()
    assert replies == [[b"250 2.0.0 <" + r + b"> Saved"] for r in rcpts[:4]]
    assert capped.messages("alice") == [delivered("bob@example.org", "alice", MESSAGE)]
    assert len(capped.messages("bob")) == 1
    assert sorted(counted["delivery"]) == ["ok"] * 4 + ["unknown_user"]


def test_over_quota_is_counted(tmp_path: Path, counted: dict[str, list[str]]) -> None:
    """A recipient over quota gets 552 5.2.2 and is counted as over_quota."""
    env = Env(tmp_path, "maildir", "127.0.0.1:0", 1 << 20)
    env.server.start()
    try:
        host, port = env.server.sockname
        with smtplib.LMTP(host, port) as client, pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("bob@example.org", ["tiny"], MESSAGE * 3)
        assert info.value.smtp_code == 552
    finally:
        env.server.stop()
        env.auth.close()
    assert counted["delivery"] == ["over_quota"]


# ------------------------------------------------------------------ the quota under races


QUOTA = 'quota = "100K"\n'


@pytest.fixture
def served_quota(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    """`pop3d serve` (two workers, LMTP on TCP) with a 100 KiB quota, Maildir or mbox."""
    site = Served(tmp_path, request.param, "tcp", QUOTA)
    try:
        yield site
    finally:
        if site.proc.poll() is None:
            assert site.stop() == 0


def kind_of(site: Served) -> str:
    return "maildir" if (site.root / "mail").exists() else "mbox"


@pytest.mark.parametrize("served_quota", ["maildir", "mbox"], indirect=True)
def test_parallel_lmtp_deliveries_never_overshoot_the_quota(served_quota: Served) -> None:
    """Ten 90 KB messages at once through LMTP into a 100 KB quota: one stored, nine 552."""
    codes = lmtp_race(served_quota.lmtp_port)
    kind = kind_of(served_quota)
    assert sorted(codes) == [250] + [552] * 9
    assert 80 * 1024 < stored(served_quota.root, kind) <= 100 * 1024  # one message
    if kind == "maildir":
        assert (served_quota.root / "mail/alice/Maildir" / LOCK_NAME).exists()
        assert list((served_quota.root / "mail/alice/Maildir/tmp").iterdir()) == []


@pytest.mark.parametrize("served_quota", ["maildir", "mbox"], indirect=True)
def test_parallel_deliver_processes_never_overshoot_the_quota(served_quota: Served) -> None:
    """Ten `pop3d deliver` processes released at once: one exit 0, nine 75 (over quota)."""
    statuses = deliver_race(served_quota.config)
    assert sorted(statuses) == [0] + [75] * 9
    assert 80 * 1024 < stored(served_quota.root, kind_of(served_quota)) <= 100 * 1024
