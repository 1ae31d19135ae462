"""The mbox backend: the storage contract, plus what only an mbox can get wrong.

The harness writes mbox files the way an MTA does (a From_ line, ``>From`` quoting, an
empty line after each message) with its own few lines of code, independent of
pop3d.storage.mbox, and reads them back the same way.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from pop3d.config import StorageConfig
from pop3d.errors import (
    MaildropLocked,
    MessageVanished,
    PermanentBackendError,
    TemporaryBackendError,
)
from pop3d.storage import lock_table, mbox
from pop3d.storage.locking import PER_MAILBOX_LOCKS, TABLE_NAME, SessionLocks
from pop3d.storage.mbox import MboxStore
from pop3d.storage.wire import to_wire

from .contract import Harness, StoreContract, chunks_of, read_all, run, user

TEMPLATE = "mbox/%u"
FROM_LINE = b"From MAILER-DAEMON Thu Nov 14 22:13:20 2023\n"
QUOTE = re.compile(rb"(?m)^(>*From )")
UNQUOTE = re.compile(rb"(?m)^>(>*From )")
SEPARATOR = re.compile(rb"(?m)^From [^\n]*\n")


def mboxrd(data: bytes, from_line: bytes = FROM_LINE) -> bytes:
    """One message as an MTA appends it: From_ line, quoted body, line end, empty line."""
    body = QUOTE.sub(rb">\1", data)
    if body and not body.endswith(b"\n"):
        body += b"\r\n" if body.endswith(b"\r") else b"\n"
    return from_line + body + b"\n"


def parse(data: bytes) -> list[bytes]:
    """The messages of an mbox written with full quoting (every unquoted From_ separates)."""
    parts = SEPARATOR.split(data)[1:]
    return [UNQUOTE.sub(rb"\1", p[:-1] if p.endswith(b"\n\n") or p == b"\n" else p)
            for p in parts]  # fmt: skip


class MboxHarness(Harness):
    """mbox files under ``base/mbox/``, appended to as Postfix ``local`` does.

    Stores take their session locks from ``locks`` (default: the lock table).
    """

    def __init__(self, base: Path, locks: SessionLocks | None = None) -> None:
        self.base = base
        self.locks = locks

    def make_store(self, *, chunk_size: int | None = None, quota: int | None = None) -> MboxStore:
        if chunk_size is None:
            return MboxStore(
                TEMPLATE, self.base, quota=quota, lock_timeout=5, session_locks=self.locks
            )
        return MboxStore(TEMPLATE, self.base, quota=quota, lock_timeout=5, chunk_size=chunk_size,
                         session_locks=self.locks)  # fmt: skip

    @property
    def store(self) -> MboxStore:
        return self.make_store()

    def path(self, username: str) -> Path:
        return self.base / "mbox" / username

    def create(self, username: str) -> None:
        self.path(username).parent.mkdir(parents=True, exist_ok=True)
        self.path(username).touch()

    def put(self, username: str, data: bytes) -> None:
        self.create(username)
        with self.path(username).open("ab") as f:
            f.write(mboxrd(data))

    def stored(self, username: str) -> list[bytes]:
        path = self.path(username)
        return sorted(parse(path.read_bytes())) if path.exists() else []

    def vanish(self, username: str, uid: str) -> None:
        """Remove one message in place (same inode), as mutt or Dovecot would."""
        path = self.path(username)
        with path.open("r+b") as f:
            [m] = [m for m in mbox._scan(f.fileno()).messages if m.uid == uid]
            data = f.read()
            f.seek(0)
            f.write(data[: m.start] + data[m.stop :])
            f.truncate()


class TestMboxContract(StoreContract):
    """The storage contract, on mbox (session locks in the lock table, the default)."""

    @pytest.fixture
    def harness(self, tmp_path: Path) -> Harness:
        return MboxHarness(tmp_path)

    #: An mbox stores CRLF as LF, as Dovecot and Postfix do (and ends the last line);
    #: what must be exact is what RETR sends, which the contract checks.
    delivered_as = b"Subject: x\n\n.dot\nbare\n\x00\xffend\n"


class TestMboxContractPerMailbox(TestMboxContract):
    """The storage contract, on mbox with a session lock file per mbox (``.<name>.pop3d``)."""

    @pytest.fixture
    def harness(self, tmp_path: Path) -> Harness:
        return MboxHarness(tmp_path, PER_MAILBOX_LOCKS)


@pytest.fixture
def h(tmp_path: Path) -> MboxHarness:
    return MboxHarness(tmp_path)


async def bodies(store: MboxStore, name: str = "alice") -> list[bytes]:
    md = await store.open(user(name))
    try:
        return [await read_all(md, i.uid) for i in md.listing()]
    finally:
        await md.close()


async def uids(store: MboxStore, name: str = "alice") -> list[str]:
    md = await store.open(user(name))
    try:
        return [i.uid for i in md.listing()]
    finally:
        await md.close()


# ---------------------------------------------------------------------------- quoting


@settings(max_examples=300, deadline=None)
@given(
    data=hs.binary(max_size=80).map(lambda b: bytes(b">From \r\n\nx"[c % 10] for c in b)),
    cuts=hs.lists(hs.integers(min_value=0, max_value=80), max_size=6),
)
def test_quoting_reverses_exactly_for_any_chunking(data: bytes, cuts: list[int]) -> None:
    """Quote-then-unquote is the identity, however the stream is cut into chunks."""
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    q = mbox._Requoter(unquote=False)
    quoted = b"".join(q.feed(c) for c in chunks) + q.finish()
    assert quoted == QUOTE.sub(rb">\1", data)
    u = mbox._Requoter(unquote=True)
    back = b"".join(u.feed(quoted[i : i + 3]) for i in range(0, len(quoted), 3)) + u.finish()
    assert back == data


def test_long_run_of_quote_marks_is_bounded_state() -> None:
    """A line of a million '>' then 'From ' is requoted without holding the run."""
    q = mbox._Requoter(unquote=True)
    out = [q.feed(b">" * 1000) for _ in range(1000)]
    assert all(o == b"" for o in out)
    assert q.feed(b"From x\n") == b">" * 999_999 + b"From x\n"


@pytest.mark.parametrize(
    "body",
    [
        b"From the start\n",
        b"a\n\nFrom me to you 12:00 2023\n\nmore\n",
        b">From x\n>>From y\n>>>From z\nFrom\n>From\n",
        b"Subject: x\n\nFrom ",
        b"\n\nFrom x 00:00\n",
    ],
)
def test_from_lines_in_bodies_round_trip(h: MboxHarness, body: bytes) -> None:
    """Body lines that look like From_ lines (quoted or not) come back byte for byte."""
    h.create("alice")

    async def go() -> None:
        await h.store.deliver(user(), chunks_of(body))
        await h.store.deliver(user(), chunks_of(b"second\n"))
        assert await bodies(h.store) == [to_wire(body), b"second\r\n"]

    run(go())
    assert h.stored("alice") == sorted([body if body.endswith(b"\n") else body + b"\n",
                                        b"second\n"])  # fmt: skip


# ---------------------------------------------------------------------------- real MDAs


def test_postfix_local_format_is_read(h: MboxHarness) -> None:
    """Postfix local's mbox (From sender date, Return-Path, >From, empty line) reads right."""
    h.create("alice")
    h.path("alice").write_bytes(
        b"From bob@example.com  Thu Nov 14 22:13:20 2023\n"
        b"Return-Path: <bob@example.com>\n"
        b"X-Original-To: alice@example.com\n"
        b"Delivered-To: alice@example.com\n"
        b"Subject: one\n"
        b"\n"
        b"Hello\n"
        b">From the past\n"
        b"\n"
        b"From MAILER-DAEMON  Fri Nov 15 01:02:03 2023\n"
        b"Return-Path: <>\n"
        b"Subject: two\n"
        b"\n"
        b"bounce\n"
        b"\n"
    )
    assert run(bodies(h.store)) == [
        (
            b"Return-Path: <bob@example.com>\r\nX-Original-To: alice@example.com\r\n"
            b"Delivered-To: alice@example.com\r\nSubject: one\r\n\r\nHello\r\nFrom the past\r\n"
        ),
        b"Return-Path: <>\r\nSubject: two\r\n\r\nbounce\r\n",
    ]
    stats = run(h.store.stat(user()))
    assert stats.count == 2
    assert stats.oldest == time.mktime((2023, 11, 14, 22, 13, 20, 0, 0, -1))


@pytest.mark.skipif(shutil.which("procmail") is None, reason="procmail is not installed")
def test_messages_appended_by_procmail_are_read(h: MboxHarness, tmp_path: Path) -> None:
    """Mail that procmail (the real MDA) appended, with its locking, reads back exactly."""
    h.create("alice")
    rc = tmp_path / "procmailrc"
    rc.write_text(f"LOGFILE={tmp_path}/procmail.log\nLOCKFILE=\n:0:\n{h.path('alice')}\n")
    messages = [
        b"From: bob@example.com\nSubject: one\n\nhello\nFrom the start of a line\n",
        b"From: carol@example.com\nSubject: two\n\n>From quoted\n\nlast line",
    ]
    for m in messages:
        envelope = b"From bob@example.com Thu Nov 14 22:13:20 2023\n"
        subprocess.run(["procmail", "-m", f"{rc}"], input=envelope + m, check=True, timeout=30)
    got = run(bodies(h.store))
    assert len(got) == 2
    # procmail quotes "From " as ">From " (mboxo), so ">From quoted" cannot come back: mboxo's
    # own loss.  Everything else is byte for byte.
    assert got[0] == to_wire(messages[0])
    assert got[1] == to_wire(messages[1].replace(b">From quoted", b"From quoted"))

    # pop3d and procmail appending to the same file keep each other's messages whole.
    run(h.store.deliver(user(), chunks_of(b"Subject: ours\n\nbody\n")))
    subprocess.run(["procmail", "-f", "dave@example.com", "-m", f"{rc}"],
                   input=b"Subject: theirs\n\nx\n", check=True)  # fmt: skip
    assert [b.split(b"\r\n")[0] for b in run(bodies(h.store))][2:] == [
        b"Subject: ours",
        b"Subject: theirs",
    ]


def test_file_not_starting_with_from_keeps_its_preamble(h: MboxHarness) -> None:
    """Octets before the first From_ line are never listed and survive a rewrite."""
    h.create("alice")
    h.path("alice").write_bytes(b"garbage\n\n" + mboxrd(b"a\n") + mboxrd(b"b\n"))

    async def go() -> None:
        md = await h.store.open(user())
        assert len(md.listing()) == 2
        await md.commit([md.listing()[0].uid])
        await md.close()

    run(go())
    assert h.path("alice").read_bytes() == b"garbage\n\n" + mboxrd(b"b\n")


def test_from_line_without_a_time_does_not_separate(h: MboxHarness) -> None:
    """An unquoted 'From ' body line after an empty line (mboxo damage) is not a separator."""
    h.create("alice")
    h.path("alice").write_bytes(FROM_LINE + b"a\n\nFrom here on it was fine\n\n")
    assert run(bodies(h.store)) == [b"a\r\n\r\nFrom here on it was fine\r\n"]


def test_crlf_mbox_file_is_read(h: MboxHarness) -> None:
    """An mbox written with CRLF line ends (and CRLF empty lines) separates correctly."""
    h.create("alice")
    h.path("alice").write_bytes(
        b"From a 00:00\r\nA: 1\r\n\r\nx\r\n\r\nFrom b 00:00\r\nB: 2\r\n\r\ny\r\n\r\n"
    )
    assert run(bodies(h.store)) == [b"A: 1\r\n\r\nx\r\n", b"B: 2\r\n\r\ny\r\n"]


# ---------------------------------------------------------------------------- UIDLs


def test_x_uidl_is_reused_when_unique(h: MboxHarness) -> None:
    """A valid, unique X-UIDL header is the UIDL (qpopper's); a clash falls back to hashes."""
    h.put("alice", b"X-UIDL: qpopper-1\n\na\n")
    h.put("alice", b"X-UIDL: twice\n\nb\n")
    h.put("alice", b"X-UIDL: twice\n\nc\n")
    h.put("alice", b"Subject: x\n\nX-UIDL: in-the-body\n")
    got = run(uids(h.store))
    assert got[0] == "qpopper-1"
    assert all(re.fullmatch(r"[0-9a-f]{32}", u) for u in got[1:])
    assert len(set(got)) == 4


def test_uids_survive_deletion_of_others_and_new_mail(h: MboxHarness) -> None:
    """UIDLs do not depend on offsets: they survive a rewrite and mail appended after it."""
    for i in range(5):
        h.put("alice", b"Subject: %d\n\nbody\n" % i)

    async def go() -> None:
        before = await uids(h.store)
        md = await h.store.open(user())
        await md.commit([before[0], before[2]])
        await md.close()
        h.put("alice", b"Subject: new\n\n")
        after = await uids(h.store)
        assert after[:3] == [before[1], before[3], before[4]]
        assert after[3] not in before

    run(go())


def test_identical_messages_get_distinct_uids(h: MboxHarness) -> None:
    """Byte-identical messages (From_ line included) are told apart by a suffix."""
    for _ in range(3):
        h.put("alice", b"same\n")
    got = run(uids(h.store))
    assert len(set(got)) == 3
    assert got[1] == got[0] + ".2"


# ---------------------------------------------------------------------------- locking


def lock_holder(path: Path, how: str, seconds: float) -> subprocess.Popen[bytes]:
    """A subprocess that locks the mbox as an MDA would (``fcntl`` or a dotlock), then waits."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys, time
        path = {str(path)!r}
        if {how!r} == "fcntl":
            f = open(path, "r+b")
            fcntl.lockf(f, fcntl.LOCK_EX)
        else:
            os.close(os.open(path + ".lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        print("locked", flush=True)
        time.sleep({seconds})
        if {how!r} == "dotlock":
            os.unlink(path + ".lock")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"locked\n"
    proc.stdout.close()
    return proc


@pytest.mark.parametrize("ofd", [True, False], ids=["ofd-locks", "posix-locks"])
@pytest.mark.parametrize("how", ["fcntl", "dotlock"])
def test_delivery_waits_for_another_programs_lock(
    h: MboxHarness, how: str, ofd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MDA's fcntl lock or dotlock is respected: delivery waits, then appends.

    Also with classic POSIX locks, used where OFD locks cannot be packed.
    """
    monkeypatch.setattr(lock_table, "AVAILABLE", ofd and lock_table.AVAILABLE)
    h.put("alice", b"first\n")
    holder = lock_holder(h.path("alice"), how, 1.0)
    try:
        started = time.monotonic()
        run(h.store.deliver(user(), chunks_of(b"second\n")))
        assert time.monotonic() - started > 0.5
    finally:
        holder.wait(timeout=10)
    assert h.stored("alice") == [b"first\n", b"second\n"]


@pytest.mark.parametrize("how", ["fcntl", "dotlock"])
def test_lock_timeout_is_a_temporary_error(h: MboxHarness, how: str) -> None:
    """A lock held past the timeout fails delivery and commit temporarily, changing nothing."""
    h.put("alice", b"first\n")
    store = MboxStore(TEMPLATE, h.base, lock_timeout=0.3)

    async def go() -> None:
        md = await store.open(user())
        holder = lock_holder(h.path("alice"), how, 3.0)
        try:
            with pytest.raises(TemporaryBackendError):
                await store.deliver(user(), chunks_of(b"second\n"))
            with pytest.raises(TemporaryBackendError):
                await md.commit([md.listing()[0].uid])
        finally:
            await md.close()
            holder.kill()
            holder.wait()

    run(go())
    if how == "dotlock":
        h.path("alice").with_name("alice.lock").unlink()
    assert h.stored("alice") == [b"first\n"]


def test_stale_dotlock_is_broken_by_age(h: MboxHarness) -> None:
    """A dotlock older than the stale age (its holder died) is removed, not waited for."""
    h.put("alice", b"first\n")
    lock = h.path("alice").with_name("alice.lock")
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    run(h.store.deliver(user(), chunks_of(b"second\n")))
    assert not lock.exists()
    assert h.stored("alice") == [b"first\n", b"second\n"]


def test_dotlock_of_a_dead_process_is_broken_at_once(h: MboxHarness) -> None:
    """A fresh dotlock naming a dead process of this host is stale (Dovecot's rule)."""
    h.put("alice", b"first\n")
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, check=True)  # fmt: skip
    dead = int(proc.stdout)
    lock = h.path("alice").with_name("alice.lock")
    lock.write_bytes(f"{dead}:{mbox._host()}\n".encode())
    store = MboxStore(TEMPLATE, h.base, lock_timeout=0.5)
    run(store.deliver(user(), chunks_of(b"second\n")))
    assert h.stored("alice") == [b"first\n", b"second\n"]


def test_fresh_empty_dotlock_is_waited_for_until_stale(h: MboxHarness) -> None:
    """An empty dotlock (another program's, or a pre-link pop3d killed mid-create) names no
    process: it is respected until it is :data:`STALE_DOTLOCK_AGE` old, then broken."""
    h.put("alice", b"first\n")
    lock = h.path("alice").with_name("alice.lock")
    lock.write_bytes(b"")
    with pytest.raises(TemporaryBackendError):
        run(MboxStore(TEMPLATE, h.base, lock_timeout=0.3).deliver(user(), chunks_of(b"x\n")))
    assert lock.exists()
    store = MboxStore(TEMPLATE, h.base, lock_timeout=10, stale_dotlock_age=0.5)
    run(store.deliver(user(), chunks_of(b"second\n")))
    assert not lock.exists()
    assert h.stored("alice") == [b"first\n", b"second\n"]


def test_dotlock_is_never_left_empty(h: MboxHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing the dotlock's pid fails (disk full): no lock is left behind, empty or not,
    and the next delivery goes through at once (the pid is written before the lock name
    exists: a temporary file, then ``link()``)."""
    h.put("alice", b"first\n")
    real_write = os.write
    mine = f"{os.getpid()}:".encode()

    def full(fd: int, data: bytes | memoryview) -> int:
        if bytes(data).startswith(mine):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(TemporaryBackendError):
        run(h.store.deliver(user(), chunks_of(b"lost\n")))
    monkeypatch.setattr(os, "write", real_write)
    assert sorted(p.name for p in h.path("alice").parent.iterdir()) == ["alice"]
    run(MboxStore(TEMPLATE, h.base, lock_timeout=0.5).deliver(user(), chunks_of(b"second\n")))
    assert h.stored("alice") == [b"first\n", b"second\n"]


def test_deliver_killed_holding_the_dotlock(h: MboxHarness) -> None:
    """``pop3d deliver`` killed with SIGKILL while it holds the dotlock (it waits for an
    MDA's ``fcntl`` lock, which comes after the dotlock): the dotlock it leaves names its
    dead pid and the next delivery breaks it at once."""
    h.put("alice", b"first\n")
    (h.base / "users").write_text("alice:{PLAIN}x\n")
    config = h.base / "pop3d.toml"
    config.write_text(f'[auth]\npasswd_file = "users"\n[storage]\nmbox = "{TEMPLATE}"\n')
    holder = lock_holder(h.path("alice"), "fcntl", 60.0)
    lock = h.path("alice").with_name("alice.lock")
    try:
        deliver = subprocess.Popen(
            [sys.executable, "-m", "pop3d", "deliver", "--config", str(config), "alice"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert deliver.stdin is not None
        deliver.stdin.write(b"killed\n")
        deliver.stdin.close()
        deadline = time.monotonic() + 30
        while not lock.exists() and deliver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lock.read_bytes() == f"{deliver.pid}:{mbox._host()}\n".encode()
        deliver.send_signal(signal.SIGKILL)
        assert deliver.wait(timeout=10) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()
    run(MboxStore(TEMPLATE, h.base, lock_timeout=1).deliver(user(), chunks_of(b"second\n")))
    assert not lock.exists()
    assert h.stored("alice") == [b"first\n", b"second\n"]
    assert sorted(p.name for p in h.path("alice").parent.iterdir()) == ["alice"]


def killed_mid_append(h: MboxHarness, body: bytes, after: int) -> None:
    """A process that delivers ``body`` and is SIGKILLed once ``after`` octets of the
    message proper are written (``after=0``: right after its From_ line)."""
    code = textwrap.dedent(f"""
        import asyncio, os, signal
        from pathlib import Path
        from pop3d.auth.base import Principal
        from pop3d.storage import mbox
        real = mbox._copy
        def dying(src, dst, *, start, length, out, tick):
            if {after}:
                real(src, dst, start=start, length={after}, out=out, tick=tick)
            os.kill(os.getpid(), signal.SIGKILL)
        mbox._copy = dying
        async def chunks():
            yield {body!r}
        store = mbox.MboxStore({TEMPLATE!r}, Path({str(h.base)!r}))
        asyncio.run(store.deliver(Principal("alice"), chunks(), sender="killed@example.org"))
    """)
    done = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert done.returncode == -signal.SIGKILL


@pytest.mark.parametrize("after", [0, 7])
def test_a_delivery_killed_mid_append_is_cut_off(h: MboxHarness, after: int) -> None:
    """``pop3d``'s own append killed with SIGKILL half way: the next taker of the lock (a
    POP3 session's snapshot here) cuts the partial message off; the others are intact."""
    h.put("alice", b"first\n")
    before = run(uids(h.store))
    size = h.path("alice").stat().st_size
    killed_mid_append(h, b"Subject: killed\n\nthis body is never finished\n", after)
    assert h.path("alice").stat().st_size > size  # the partial message is there
    assert run(uids(h.store)) == before
    assert h.path("alice").stat().st_size == size
    assert not h.path("alice").with_name(".alice.pop3d-append").exists()
    run(h.store.deliver(user(), chunks_of(b"second\n")))
    assert h.stored("alice") == [b"first\n", b"second\n"]


def test_a_complete_append_is_never_cut(h: MboxHarness) -> None:
    """A journal left behind a complete append (killed before it was removed): the
    message is whole, so it stays."""
    h.put("alice", b"first\n")
    size = h.path("alice").stat().st_size
    run(h.store.deliver(user(), chunks_of(b"second\n"), sender="s@example.org"))
    data = h.path("alice").read_bytes()
    from_line = data[size:].split(b"second")[0]
    assert from_line.startswith(b"From s@example.org ")
    journal = h.path("alice").with_name(".alice.pop3d-append")
    ino = h.path("alice").stat().st_ino
    length = len(data) - size - len(from_line) - 1
    journal.write_text(f"{ino} {size} {length} {from_line.hex()}\n")
    assert len(run(uids(h.store))) == 2
    assert not journal.exists()
    assert h.stored("alice") == [b"first\n", b"second\n"]


def test_another_users_journal_is_ignored(h: MboxHarness) -> None:
    """A journal that is not a regular file of ours (a link planted in a shared spool) is
    neither read nor followed, nor does it cut anything; delivery goes on without one."""
    h.put("alice", b"first\n")
    journal = h.path("alice").with_name(".alice.pop3d-append")
    journal.symlink_to(h.path("alice"))
    run(h.store.deliver(user(), chunks_of(b"second\n")))
    assert h.stored("alice") == [b"first\n", b"second\n"]
    assert journal.is_symlink()


def test_append_to_a_crlf_mbox_keeps_every_message(h: MboxHarness) -> None:
    """An mbox written with CRLF line ends (ending ``\\r\\n\\r\\n``): an append keeps the
    earlier messages' octets and UIDLs (the final empty line becomes the separator)."""
    h.create("alice")
    h.path("alice").write_bytes(
        b"From a@b Mon Jan  1 00:00:00 2024\r\nSubject: c\r\n\r\nbody\r\n\r\n"
    )
    before = run(uids(h.store)), run(bodies(h.store))
    run(h.store.deliver(user(), chunks_of(b"next\n")))
    after = run(uids(h.store)), run(bodies(h.store))
    assert after[0][:1] == before[0]
    assert after[1] == [*before[1], b"next\r\n"]


@pytest.mark.parametrize("mode", ["table", "per-mailbox"])
def test_session_lock_dies_with_its_holder(tmp_path: Path, mode: str) -> None:
    """A session in a process killed with SIGKILL does not lock the maildrop out."""
    h = MboxHarness(tmp_path, PER_MAILBOX_LOCKS if mode == "per-mailbox" else None)
    h.put("alice", b"x\n")
    locks = "per-mailbox" if mode == "per-mailbox" else None
    code = textwrap.dedent(f"""
        import asyncio, sys, time
        from pathlib import Path
        from pop3d.protocol.values import Principal
        from pop3d.config import StorageConfig
        from pop3d.storage.mbox import MboxStore
        async def main():
            config = StorageConfig(mbox="mbox/%u", base=Path({str(h.base)!r}),
                                   lock_table={locks!r})
            md = await MboxStore.from_config(config).open(Principal("alice"))
            print("open", flush=True)
            time.sleep(60)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"open\n"
        proc.stdout.close()
        with pytest.raises(MaildropLocked):
            run(h.store.open(user()))
    finally:
        proc.kill()
        proc.wait()
    md = run(h.store.open(user()))
    run(md.close())


def test_session_does_not_block_delivery(h: MboxHarness) -> None:
    """An open POP3 session does not hold the mbox lock: an MDA's fcntl lock is free."""
    h.put("alice", b"x\n")

    async def go() -> None:
        md = await h.store.open(user())
        try:
            holder = lock_holder(h.path("alice"), "fcntl", 0)
            holder.wait(timeout=10)
        finally:
            await md.close()

    run(go())


# ---------------------------------------------------------------------------- rewrites


def test_mail_appended_by_another_program_during_the_session_survives(h: MboxHarness) -> None:
    """Mail an MDA appends after open is not listed and is kept by the rewrite."""
    for i in range(3):
        h.put("alice", b"m%d\n" % i)

    async def go() -> None:
        md = await h.store.open(user())
        h.put("alice", b"late\n")
        assert len(md.listing()) == 3
        await md.commit([i.uid for i in md.listing()])
        await md.close()

    run(go())
    assert h.stored("alice") == [b"late\n"]


@pytest.mark.parametrize("mode", ["table", "per-mailbox"])
def test_rewrite_keeps_mode_and_leaves_no_temporary_files(tmp_path: Path, mode: str) -> None:
    """The rewritten mbox keeps its permissions; only the mbox and the session lock remain.

    The session lock is the lock table (one for every mbox of the folder), or a lock file.
    """
    h = MboxHarness(tmp_path, PER_MAILBOX_LOCKS if mode == "per-mailbox" else None)
    for i in range(3):
        h.put("alice", b"m%d\n" % i)
    h.path("alice").chmod(0o640)

    async def go() -> None:
        md = await h.store.open(user())
        await md.commit([md.listing()[1].uid])
        await md.close()

    run(go())
    assert h.path("alice").stat().st_mode & 0o777 == 0o640
    lock = ".alice.pop3d" if mode == "per-mailbox" else TABLE_NAME
    assert sorted(p.name for p in h.path("alice").parent.iterdir()) == [lock, "alice"]


def test_in_place_rewrite_by_another_program_is_caught(h: MboxHarness) -> None:
    """A message moved by an in-place rewrite under the session is MessageVanished."""
    h.put("alice", b"a\n")
    h.put("alice", b"b\n")

    async def go() -> None:
        md = await h.store.open(user())
        try:
            first, second = md.listing()
            h.vanish("alice", first.uid)
            with pytest.raises(MessageVanished):
                await read_all(md, second.uid)
        finally:
            await md.close()

    run(go())


KILLER = textwrap.dedent("""
    import asyncio, os, signal, sys
    from pathlib import Path
    from pop3d.protocol.values import Principal
    from pop3d.storage import mbox

    point = sys.argv[2]
    real_copy, real_rename = mbox._copy, os.rename

    def copy(*args, **kwargs):
        real_copy(*args, **kwargs)
        if point == "copy":
            os.kill(os.getpid(), signal.SIGKILL)

    def rename(*args, **kwargs):
        if point == "before-rename":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real_rename(*args, **kwargs)
        if point == "after-rename":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    mbox._copy = copy
    os.rename = rename

    async def main():
        store = mbox.MboxStore("mbox/%u", Path(sys.argv[1]))
        md = await store.open(Principal("alice"))
        await md.commit([i.uid for i in md.listing()[::2]])
        print("committed", flush=True)

    asyncio.run(main())
""")


@pytest.mark.parametrize("point", ["copy", "before-rename", "after-rename"])
def test_kill_9_during_commit_loses_and_duplicates_nothing(h: MboxHarness, point: str) -> None:
    """SIGKILL anywhere in the rewrite leaves the old mbox or the new one, never a mix."""
    messages = [b"Subject: %d\n\n" % i + b"x" * 3000 + b"\n" for i in range(10)]
    for m in messages:
        h.put("alice", m)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(h.base), point],
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL
    now = h.stored("alice")
    kept = sorted(messages[1::2])
    assert now in (sorted(messages), kept)
    assert now == (kept if point == "after-rename" else sorted(messages))
    # The dead process's dotlock does not stop the next session (its pid is dead).
    store = MboxStore(TEMPLATE, h.base, lock_timeout=1)

    async def go() -> None:
        md = await store.open(user())
        await md.commit([md.listing()[0].uid])
        await md.close()

    run(go())
    assert len(h.stored("alice")) == len(now) - 1
    leftovers = [p.name for p in h.path("alice").parent.iterdir() if "rewrite" in p.name]
    assert leftovers == []


def limited(code: str, limit: int) -> subprocess.CompletedProcess[bytes]:
    """Run ``code`` in a subprocess whose files may not grow past ``limit`` octets."""
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        check=False,
        capture_output=True,
        timeout=60,
    )


def test_disk_full_during_commit_leaves_the_mbox_intact(h: MboxHarness) -> None:
    """A rewrite that cannot write its copy (EFBIG, as ENOSPC) fails and changes nothing."""
    messages = [b"Subject: %d\n\n" % i + b"y" * 10_000 + b"\n" for i in range(10)]
    for m in messages:
        h.put("alice", m)
    before = h.path("alice").read_bytes()
    proc = limited(
        f"""
        import asyncio
        from pathlib import Path
        from pop3d.protocol.values import Principal
        from pop3d.errors import TemporaryBackendError
        from pop3d.storage.mbox import MboxStore
        async def main():
            md = await MboxStore("mbox/%u", Path({str(h.base)!r})).open(Principal("alice"))
            try:
                await md.commit([md.listing()[0].uid])
            except TemporaryBackendError:
                print("temporary failure")
        asyncio.run(main())
        """,
        30_000,
    )
    assert proc.stdout == b"temporary failure\n", proc.stderr
    assert h.path("alice").read_bytes() == before
    assert [p.name for p in h.path("alice").parent.iterdir() if "rewrite" in p.name] == []


def test_disk_full_during_delivery_leaves_no_partial_message(h: MboxHarness) -> None:
    """An append that hits the file size limit is truncated away: a temporary failure."""
    h.put("alice", b"first\n")
    before = h.path("alice").read_bytes()
    proc = limited(
        f"""
        import asyncio
        from pathlib import Path
        from pop3d.protocol.values import Principal
        from pop3d.errors import TemporaryBackendError
        from pop3d.storage.mbox import MboxStore
        async def chunks():
            for _ in range(10):
                yield b"z" * 999 + b"\\n"
        async def main():
            try:
                await MboxStore("mbox/%u", Path({str(h.base)!r})).deliver(
                    Principal("alice"), chunks())
            except TemporaryBackendError:
                print("temporary failure")
        asyncio.run(main())
        """,
        len(before) + 5000,
    )
    assert proc.stdout == b"temporary failure\n", proc.stderr
    assert h.path("alice").read_bytes() == before


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        # The store's lock table files live on the mount: let the dropped store close
        # them, and never leave a busy mount behind (lazy unmount as the last resort).
        gc.collect()
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "--lazy", str(mnt)], check=False)


def test_enospc_on_a_full_tmpfs(tiny_tmpfs: Path) -> None:
    """On a really full file system, delivery and commit fail temporarily and lose nothing."""
    h = MboxHarness(tiny_tmpfs)
    for i in range(10):
        h.put("alice", b"Subject: %d\n\n" % i + b"w" * 20_000 + b"\n")
    before = h.path("alice").read_bytes()

    async def big() -> None:
        await h.store.deliver(user(), chunks_of(*[b"v" * 9999 + b"\n"] * 20))

    with pytest.raises(TemporaryBackendError):
        run(big())
    assert h.path("alice").read_bytes() == before
    fd = os.open(tiny_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="No space"):  # noqa: PT012
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)

    async def commit() -> None:
        md = await h.store.open(user())
        try:
            await md.commit([md.listing()[0].uid])
        finally:
            await md.close()

    with pytest.raises(TemporaryBackendError):
        run(commit())
    assert h.path("alice").read_bytes() == before


# ---------------------------------------------------------------------------- misc


def test_missing_folder_is_created_by_delivery(h: MboxHarness) -> None:
    """Delivery creates the folder and the mbox (mode 0600)."""
    run(h.store.deliver(user(), chunks_of(b"x\n")))
    assert h.path("alice").stat().st_mode & 0o777 == 0o600


def test_symlinked_mbox_is_refused(h: MboxHarness, tmp_path: Path) -> None:
    """An mbox that is a symbolic link (to /etc/passwd, say) is neither read nor written.

    Delivery fails temporarily (the MTA retries); a login is refused with [SYS/PERM].
    """
    target = tmp_path / "target"
    target.write_bytes(b"secret\n")
    h.path("alice").parent.mkdir(parents=True)
    h.path("alice").symlink_to(target)
    with pytest.raises(TemporaryBackendError):
        run(h.store.deliver(user(), chunks_of(b"x\n")))
    with pytest.raises(PermanentBackendError):
        run(h.store.open(user()))
    assert target.read_bytes() == b"secret\n"


def test_name_ending_in_lock_is_refused(h: MboxHarness) -> None:
    """A user 'bob.lock' would be bob's dotlock in a shared spool: refused."""
    with pytest.raises(TemporaryBackendError):
        run(h.store.deliver(user("bob.lock"), chunks_of(b"x\n")))


def test_return_path_names_the_from_line(h: MboxHarness) -> None:
    """The From_ line carries the Return-Path address (as Postfix local writes it)."""
    run(h.store.deliver(user(), chunks_of(b"Return-Path: <bob@example.com>\nS: x\n\n")))
    run(h.store.deliver(user(), chunks_of(b"S: y\n\n"), sender="carol@example.com"))
    lines = [ln for ln in h.path("alice").read_bytes().split(b"\n") if ln.startswith(b"From ")]
    assert [ln.split()[1] for ln in lines] == [b"bob@example.com", b"carol@example.com"]


def test_from_config(tmp_path: Path) -> None:
    """from_config takes the mbox template, base and quota of [storage]."""
    store = MboxStore.from_config(StorageConfig(mbox="mbox/%u", base=tmp_path, quota=5))
    assert (store.template, store.base, store.quota) == ("mbox/%u", tmp_path, 5)
    with pytest.raises(ValueError, match="no mbox"):
        MboxStore.from_config(StorageConfig(maildir="x/%u"))


def test_big_mbox_scans_fast_and_reads_exact(h: MboxHarness) -> None:
    """A 2000-message mbox with random bodies lists and reads back exactly."""
    rng = random.Random(5)
    messages = [bytes(rng.choices(b"From >\r\nab", k=rng.randrange(200))) for _ in range(2000)]
    h.create("alice")
    with h.path("alice").open("ab") as f:
        for m in messages:
            f.write(mboxrd(m))

    async def go() -> None:
        md = await h.make_store(chunk_size=13).open(user())
        try:
            listing = md.listing()
            assert len(listing) == len(messages)
            for info, m in zip(listing, messages, strict=True):
                assert info.size == len(to_wire(m))
                assert await read_all(md, info.uid) == to_wire(m)
        finally:
            await md.close()

    asyncio.run(go())
