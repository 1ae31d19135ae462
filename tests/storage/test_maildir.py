"""The Maildir backend: the storage contract, plus what only a Maildir can get wrong."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import re
import signal
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest

from pop3d.config import StorageConfig
from pop3d.errors import MaildropLocked, PermanentBackendError, TemporaryBackendError
from pop3d.storage import maildir
from pop3d.storage.base import MailStore, Paced
from pop3d.storage.lock_table import LockTable
from pop3d.storage.locking import PER_MAILBOX_LOCKS, TABLE_NAME, SessionLocks
from pop3d.storage.maildir import (
    INDEX_NAME,
    LOCK_NAME,
    MaildirStore,
    message_key,
    split_name,
    uid_for_key,
)
from pop3d.storage.wire import to_wire

from .conftest import PythonSpawner
from .contract import Harness, StoreContract, chunks_of, read_all, run, user

TEMPLATE = "mail/%u/Maildir"
OLD = 1_600_000_000  # an mtime far from "now": not racy, so the index records it


class MaildirHarness(Harness):
    """Writes messages into ``new/`` as an MTA would, one second apart in their names.

    Stores take their session locks from ``locks`` (default: the lock table).
    """

    def __init__(self, base: Path, locks: SessionLocks | None = None) -> None:
        self.base = base
        self.locks = locks
        self._seq = itertools.count()

    def make_store(
        self, *, chunk_size: int | None = None, quota: int | None = None
    ) -> MaildirStore:
        if chunk_size is None:
            return MaildirStore(
                TEMPLATE, self.base, quota=quota, hostname="test", session_locks=self.locks
            )
        return MaildirStore(
            TEMPLATE, self.base, quota=quota, chunk_size=chunk_size, hostname="test",
            session_locks=self.locks,
        )  # fmt: skip

    def root(self, username: str) -> Path:
        return self.base / "mail" / username / "Maildir"

    def create(self, username: str) -> None:
        for folder in ("tmp", "new", "cur"):
            (self.root(username) / folder).mkdir(parents=True, exist_ok=True)

    def put(self, username: str, data: bytes) -> None:
        self.create(username)
        n = next(self._seq)
        (self.root(username) / "new" / f"{1_700_000_000 + n}.M{n}P1.mta").write_bytes(data)

    def files(self, username: str) -> list[Path]:
        """Every message file now (regular files in cur/ and new/)."""
        root = self.root(username)
        return sorted(
            p for folder in ("cur", "new") if (root / folder).is_dir()
            for p in (root / folder).iterdir()
            if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
        )

    def stored(self, username: str) -> list[bytes]:
        return sorted(p.read_bytes() for p in self.files(username))

    def vanish(self, username: str, uid: str) -> None:
        [path] = [p for p in self.files(username) if message_key(p.name) == uid]
        path.unlink()


class TestMaildirContract(StoreContract):
    """The storage contract, on Maildir (session locks in the lock table, the default)."""

    @pytest.fixture
    def harness(self, tmp_path: Path) -> Harness:
        return MaildirHarness(tmp_path)


class TestMaildirContractPerMailbox(TestMaildirContract):
    """The storage contract, on Maildir with a lock file per Maildir (``pop3d.lock``)."""

    @pytest.fixture
    def harness(self, tmp_path: Path) -> Harness:
        return MaildirHarness(tmp_path, PER_MAILBOX_LOCKS)


@pytest.fixture
def h(tmp_path: Path) -> MaildirHarness:
    return MaildirHarness(tmp_path)


def write(h: MaildirHarness, folder: str, name: str, data: bytes, *, mtime: int = OLD) -> Path:
    """Put a file of this exact name into the user's Maildir, with an old mtime."""
    h.create("alice")
    path = h.root("alice") / folder / name
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


async def listing_of(store: MailStore, name: str = "alice") -> list[tuple[str, int]]:
    md = await store.open(user(name))
    try:
        return [(i.uid, i.size) for i in md.listing()]
    finally:
        await md.close()


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("folder", "name", "uid"),
    [
        ("new", "1700000000.V801I1234M5678.mx.example", "1700000000.V801I1234M5678.mx.example"),
        ("cur", "1700000000.M123P456.host,S=10,W=12:2,S", "1700000000.M123P456.host"),
        ("cur", "1700000000.M123P456.host,S=10:2,RS", "1700000000.M123P456.host"),
        ("cur", "1700000000.M123456P789V0000000000000803I00000000001234AB.host,S=10:2,",
         "1700000000.M123456P789V0000000000000803I00000000001234AB.host"),
        ("new", "1700000000.12345_0.host", "1700000000.12345_0.host"),
        ("cur", "1700000000.12345_0.host!2,S", "1700000000.12345_0.host"),
        ("cur", "1700000000.12345_0.host;2,FS", "1700000000.12345_0.host"),
        ("cur", "1700000000.P1Q2.host,S=10,X=zz:2,T", "1700000000.P1Q2.host,X=zz"),
    ],
)
def test_real_program_names_are_read(h: MaildirHarness, folder: str, name: str, uid: str) -> None:
    """Names as Postfix, Dovecot, Courier and procmail write them list with the base as UIDL."""
    write(h, folder, name, b"Subject: x\n")  # 10 octets stored, 12 on the wire
    assert run(listing_of(h.store)) == [(uid, 12)]


def test_split_name_and_key() -> None:
    """The info follows ':' (or '!2,'/';2,'); the key drops S= and W= fields only."""
    assert split_name("1.M2.h,S=5,W=6:2,S") == ("1.M2.h,S=5,W=6", "2,S")
    assert split_name("1.M2.h") == ("1.M2.h", "")
    assert split_name("1.M2.h!2,") == ("1.M2.h", "2,")
    assert message_key("1.M2.h,S=5,W=6:2,S") == "1.M2.h"
    assert message_key("1.M2.h,W=6,S=5") == "1.M2.h"
    assert message_key("1.M2.h,S=abc") == "1.M2.h,S=abc"


def test_uid_survives_new_to_cur_and_flag_and_w_renames(h: MaildirHarness) -> None:
    """The UIDL stays the same across the new->cur move, a flag change and an added W=."""
    write(h, "new", "1700000000.M1P1.host,S=4", b"a\nb\n")
    store = h.store
    first = run(listing_of(store))
    [moved] = list((h.root("alice") / "cur").iterdir())
    assert moved.name == "1700000000.M1P1.host,S=4:2,"
    moved.rename(moved.with_name("1700000000.M1P1.host,S=4,W=6:2,RS"))
    assert run(listing_of(store)) == first == [("1700000000.M1P1.host", 6)]


def test_long_or_odd_keys_become_hashes(h: MaildirHarness) -> None:
    """A key over 70 characters or outside 0x21-0x7E is replaced by its SHA-1 hex."""
    long = "1700000000." + "x" * 80 + ".host"
    write(h, "cur", long + ":2,", b"x\n")
    write(h, "cur", "1700000001.with space.host:2,", b"y\n")
    write(h, "cur", "1700000002.\u00e9t\u00e9.host:2,", b"z\n")
    uids = [uid for uid, _ in run(listing_of(h.store))]
    assert uids == [uid_for_key(long), uid_for_key("1700000001.with space.host"),
                    uid_for_key("1700000002.\u00e9t\u00e9.host")]
    assert all(re.fullmatch("[0-9a-f]{40}", u) for u in uids)


def test_duplicate_keys_still_get_distinct_uids(h: MaildirHarness) -> None:
    """Two files with one key (a broken Maildir) are both listed under different UIDs."""
    write(h, "cur", "1700000000.M1P1.host:2,", b"a\n")
    write(h, "cur", "1700000000.M1P1.host:2,S", b"b\n")
    uids = [uid for uid, _ in run(listing_of(h.store))]
    assert len(uids) == 2
    assert len(set(uids)) == 2


# ---------------------------------------------------------------------------- sizes


def test_trusted_w_field_avoids_reading(h: MaildirHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """W= with a matching S= gives the size without reading the body (+2 if no final LF)."""
    write(h, "cur", "1700000000.M1P1.host,S=4,W=6:2,S", b"a\nb\n")
    write(h, "cur", "1700000001.M1P1.host,S=3,W=4:2,S", b"a\nb")

    def no_body_reads(fd: int) -> Any:
        raise AssertionError("the body was read")

    monkeypatch.setattr(maildir, "_measure_fd", no_body_reads)
    assert [s for _, s in run(listing_of(h.store))] == [6, 6]


def test_untrusted_w_field_is_ignored(h: MaildirHarness) -> None:
    """W= is ignored when S= is missing or differs from the file size (file rewritten)."""
    write(h, "cur", "1700000000.M1P1.host,S=99,W=999:2,", b"a\nb\n")
    write(h, "cur", "1700000001.M1P1.host,W=999:2,", b"a\nb\n")
    write(h, "cur", "1700000002.M1P1.host,S=4,W=999:2,", b"a\nb\n")  # W > 2*S: impossible
    assert [s for _, s in run(listing_of(h.store))] == [6, 6, 6]


def test_delivered_names_carry_dovecot_sizes(h: MaildirHarness) -> None:
    """Delivery names the file <secs>.M<usec>P<pid>Q<n>R<random>.<host>,S=<size>,W=<virtual>."""
    h.create("alice")
    run(h.store.deliver(user(), chunks_of(b"a\r", b"\nb\nc")))
    [path] = (h.root("alice") / "new").iterdir()
    assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+R[0-9a-f]{16}\.test,S=6,W=7", path.name), path.name
    assert path.read_bytes() == b"a\r\nb\nc"
    assert list((h.root("alice") / "tmp").iterdir()) == []
    assert run(listing_of(h.store)) == [(message_key(path.name), 9)]


# ---------------------------------------------------------------------------- index


def count_message_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every os.open of a file inside cur/ or new/ (by path, or relative to them)."""
    opened: list[str] = []
    real_open = os.open

    def counting(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        dir_fd = kwargs.get("dir_fd")
        folder = Path(f"/proc/self/fd/{dir_fd}").readlink().name if dir_fd else ""
        if Path(path).parent.name in {"cur", "new"} or folder in {"cur", "new"}:
            opened.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting)
    return opened


def test_warm_index_reads_no_bodies(h: MaildirHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a warm size index, opening a 100-message Maildir opens no message file."""
    for i in range(100):
        write(h, "cur", f"{1_700_000_000 + i}.M{i}P1.host:2,S", b"Subject: %d\n\nbody\n" % i)
    cold = run(listing_of(h.store))
    assert (h.root("alice") / INDEX_NAME).exists()
    opened = count_message_opens(monkeypatch)
    assert run(listing_of(h.store)) == cold
    assert opened == []


def test_cold_open_measures_each_message_once(
    h: MaildirHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an index each message is opened once to measure it, then recorded."""
    for i in range(10):
        write(h, "cur", f"{1_700_000_000 + i}.M{i}P1.host:2,", b"x\n")
    opened = count_message_opens(monkeypatch)
    run(listing_of(h.store))
    assert len(opened) == 10


def test_index_is_rewritten_only_when_it_changed(h: MaildirHarness) -> None:
    """An unchanged Maildir does not rewrite the index; a new message does."""
    write(h, "cur", "1700000000.M1P1.host:2,", b"x\n")
    run(listing_of(h.store))
    index = h.root("alice") / INDEX_NAME
    before = index.stat()
    run(listing_of(h.store))
    after = index.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    write(h, "cur", "1700000001.M1P1.host:2,", b"y\n")
    run(listing_of(h.store))
    assert index.stat().st_ino != before.st_ino


def test_rewritten_file_gets_a_fresh_size(h: MaildirHarness) -> None:
    """A file rewritten under the same name and size is re-measured, not served stale."""
    path = write(h, "cur", "1700000000.M1P1.host:2,", b"a\nb\n")  # wire 6
    assert run(listing_of(h.store))[0][1] == 6
    path.write_bytes(b"ab\r\n")  # same name, same size, wire 4
    os.utime(path, (OLD + 5, OLD + 5))
    assert run(listing_of(h.store))[0][1] == 4


def test_replaced_file_with_same_mtime_gets_a_fresh_size(h: MaildirHarness) -> None:
    """A file replaced by rename (new inode) with the very same size and mtime is re-measured."""
    path = write(h, "cur", "1700000000.M1P1.host:2,", b"a\nb\n")
    assert run(listing_of(h.store))[0][1] == 6
    other = write(h, "tmp", "replacement", b"ab\r\n")
    other.rename(path)
    assert run(listing_of(h.store))[0][1] == 4


def test_fresh_files_are_not_indexed(h: MaildirHarness) -> None:
    """Files modified in the last seconds are never recorded (a same-tick rewrite would hide)."""
    write(h, "cur", "1700000000.M1P1.host:2,", b"x\n", mtime=int(time.time()))
    run(listing_of(h.store))
    assert not (h.root("alice") / INDEX_NAME).exists()


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"nonsense",
        b"pop3d-sizes/1 00000000\n1 2 3 4 x\n",  # wrong checksum
        b"pop3d-sizes/1 zz\n",
        b"\x00" * 100,
    ],
)
def test_corrupt_index_is_ignored(h: MaildirHarness, garbage: bytes) -> None:
    """A damaged index is ignored: sizes are measured again and come out right."""
    write(h, "cur", "1700000000.M1P1.host:2,", b"a\nb\n")
    (h.root("alice") / INDEX_NAME).write_bytes(garbage)
    assert run(listing_of(h.store)) == [("1700000000.M1P1.host", 6)]


def test_forged_index_entry_for_another_file_is_ignored(h: MaildirHarness) -> None:
    """An index entry is used only while inode, size and mtime all match the file."""
    path = write(h, "cur", "1700000000.M1P1.host:2,", b"a\nb\n")
    run(listing_of(h.store))
    index = h.root("alice") / INDEX_NAME
    s = path.stat()
    body = b"%d %d %d 999 1700000000.M1P1.host\n" % (s.st_ino + 1, s.st_size, s.st_mtime_ns)
    index.write_bytes(b"pop3d-sizes/1 %08x\n%s" % (zlib.crc32(body), body))
    assert run(listing_of(h.store)) == [("1700000000.M1P1.host", 6)]


def test_unwritable_index_does_not_stop_open(h: MaildirHarness) -> None:
    """If the index cannot be written (here: a folder in its place), open still works."""
    write(h, "cur", "1700000000.M1P1.host:2,", b"a\n")
    (h.root("alice") / INDEX_NAME).mkdir()
    assert run(listing_of(h.store)) == [("1700000000.M1P1.host", 3)]
    assert [p.name for p in h.root("alice").iterdir() if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------------------- open


def test_open_moves_new_to_cur(h: MaildirHarness) -> None:
    """Open moves new/X to cur/X:2, (and keeps an info already present), like Dovecot."""
    write(h, "new", "1700000000.M1P1.host", b"a\n")
    write(h, "new", "1700000001.M1P1.host:2,S", b"b\n")
    run(listing_of(h.store))
    assert list((h.root("alice") / "new").iterdir()) == []
    assert sorted(p.name for p in (h.root("alice") / "cur").iterdir()) == [
        "1700000000.M1P1.host:2,", "1700000001.M1P1.host:2,S"]


def test_move_never_overwrites(h: MaildirHarness) -> None:
    """new/X is left in new/ (and still listed) if cur/X:2, already exists."""
    write(h, "new", "1700000000.M1P1.host", b"new copy\n")
    write(h, "cur", "1700000000.M1P1.host:2,", b"cur copy\n")
    assert len(run(listing_of(h.store))) == 2
    assert h.stored("alice") == [b"cur copy\n", b"new copy\n"]


def test_only_regular_files_are_messages(h: MaildirHarness, tmp_path: Path) -> None:
    """Symlinks, FIFOs, dot-files, sub-folders and tmp/ are never listed or followed."""
    write(h, "cur", "1700000000.M1P1.host:2,", b"real\n")
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the maildir\n")
    root = h.root("alice")
    (root / "cur" / "1700000001.link:2,").symlink_to(secret)
    (root / "new" / "1700000002.link").symlink_to(secret)
    os.mkfifo(root / "cur" / "1700000003.fifo:2,")
    os.mkfifo(root / "new" / "1700000004.fifo")
    (root / "cur" / ".1700000005.hidden:2,").write_bytes(b"hidden\n")
    (root / "cur" / "1700000006.folder").mkdir()
    (root / "tmp" / "1700000007.M1P1.host").write_bytes(b"in flight\n")
    assert run(listing_of(h.store)) == [("1700000000.M1P1.host", 6)]
    assert (root / "new" / "1700000002.link").is_symlink()  # not moved either


@pytest.mark.parametrize("swap", ["fifo", "symlink"])
def test_a_message_swapped_after_the_listing_is_refused(
    h: MaildirHarness, tmp_path: Path, swap: str
) -> None:
    """A message replaced after the listing by a FIFO fails at once instead of blocking;
    by a symlink, it is refused, never followed."""
    path = write(h, "cur", "1700000000.M1P1.host:2,", b"x\n")
    secret = tmp_path / "secret"
    secret.write_bytes(b"y\n")

    async def go() -> None:
        md = await h.store.open(user())
        path.unlink()
        if swap == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to(secret)
        try:
            with pytest.raises(TemporaryBackendError):
                await read_all(md, md.listing()[0].uid)
        finally:
            await md.close()

    run(go())


@pytest.mark.parametrize("layout", ["nothing", "tmp_only", "no_new", "cur_is_a_file"])
def test_broken_maildir_is_a_backend_error(h: MaildirHarness, layout: str) -> None:
    """A Maildir without cur/ and new/ folders is refused, and is not created.

    Missing folders are TemporaryBackendError (an MDA may create them); a cur/ that is a
    file is PermanentBackendError ([SYS/PERM]: retrying will not help).
    """
    root = h.root("alice")
    if layout != "nothing":
        (root / "tmp").mkdir(parents=True)
    if layout == "no_new":
        (root / "cur").mkdir()
    if layout == "cur_is_a_file":
        (root / "new").mkdir()
        (root / "cur").write_bytes(b"")
    error = PermanentBackendError if layout == "cur_is_a_file" else TemporaryBackendError
    with pytest.raises(error):
        run(h.store.open(user()))
    assert not (root / LOCK_NAME).exists()
    if layout == "nothing":
        assert not root.exists()


def test_unreadable_maildir_is_a_temporary_error(
    h: MaildirHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Maildir the server may not read is TemporaryBackendError, not an empty mailbox."""
    write(h, "cur", "1700000000.M1P1.host:2,", b"x\n")
    cur = h.root("alice") / "cur"
    if os.geteuid() == 0:
        # Root reads any folder (CI runs as root): the read of cur/ fails as the kernel
        # fails it for anyone else.
        scandir = os.scandir

        def refuse_cur(path: Any) -> Any:
            if isinstance(path, int) and os.fstat(path).st_ino == cur.stat().st_ino:
                raise PermissionError(errno.EACCES, "Permission denied", "cur")
            return scandir(path)

        monkeypatch.setattr(os, "scandir", refuse_cur)
    cur.chmod(0)
    try:
        with pytest.raises(TemporaryBackendError, match="cur/"):
            run(h.store.open(user()))
    finally:
        cur.chmod(0o700)
    monkeypatch.undo()
    assert len(run(listing_of(h.store))) == 1  # the failed open left no lock behind


def test_big_maildir_opens_in_a_thread(h: MaildirHarness) -> None:
    """A Maildir with thousands of messages opens correctly (scan off the event loop)."""
    h.create("alice")
    cur = h.root("alice") / "cur"
    for i in range(3000):
        (cur / f"{1_700_000_000 + i}.M{i}P1.{'h' * 40}:2,").write_bytes(b"x\n")
    assert cur.stat().st_size > maildir._INLINE_SCAN_DIR_SIZE
    listing = run(listing_of(h.store))
    assert len(listing) == 3000
    assert {s for _, s in listing} == {3}


# ---------------------------------------------------------------------------- lock


LOCK_HOLDER = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from pop3d.protocol.values import Principal
    from pop3d.config import StorageConfig
    from pop3d.storage.maildir import MaildirStore

    async def main():
        base, mode = sys.argv[1].split(":")
        locks = "per-mailbox" if mode == "per-mailbox" else None
        config = StorageConfig(maildir="mail/%u/Maildir", base=Path(base), lock_table=locks)
        md = await MaildirStore.from_config(config).open(Principal("alice"))
        print("locked", flush=True)
        time.sleep(60)

    asyncio.run(main())
    """
)

MODES = {"table": None, "per-mailbox": PER_MAILBOX_LOCKS}


@pytest.mark.parametrize("mode", MODES)
def test_lock_holds_across_processes_and_dies_with_kill_9(
    tmp_path: Path, spawn_python: PythonSpawner, mode: str
) -> None:
    """Another process's session locks us out; SIGKILL of it releases the lock."""
    h = MaildirHarness(tmp_path, MODES[mode])
    write(h, "cur", "1700000000.M1P1.host:2,", b"x\n")
    holder = spawn_python(LOCK_HOLDER, f"{h.base}:{mode}")
    assert holder.stdout is not None
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(MaildropLocked):
        run(h.store.open(user()))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run(listing_of(h.store)) == [("1700000000.M1P1.host", 3)]


def test_two_stores_in_one_process_conflict(h: MaildirHarness) -> None:
    """The lock belongs to the open file: two stores in one process still exclude each other.

    Also when each has its own open file description of the table.
    """
    h.create("alice")
    table = h.base / "mail" / TABLE_NAME

    async def go() -> None:
        for one, two in [
            (MaildirStore(TEMPLATE, h.base), MaildirStore(TEMPLATE, h.base)),
            (MaildirStore(TEMPLATE, h.base, session_locks=LockTable(table)),
             MaildirStore(TEMPLATE, h.base, session_locks=LockTable(table))),
            (MaildirStore(TEMPLATE, h.base, session_locks=PER_MAILBOX_LOCKS),
             MaildirStore(TEMPLATE, h.base, session_locks=PER_MAILBOX_LOCKS)),
        ]:  # fmt: skip
            md = await one.open(user())
            with pytest.raises(MaildropLocked):
                await two.open(user())
            await md.close()

    run(go())


@pytest.mark.parametrize("mode", MODES)
def test_lock_file_is_not_a_message(tmp_path: Path, mode: str) -> None:
    """The lock and index files live beside cur/ and new/, never in them.

    With the lock table there is no lock file in the Maildir at all: the table lives
    beside the users' folders.
    """
    h = MaildirHarness(tmp_path, MODES[mode])
    write(h, "cur", "1700000000.M1P1.host:2,", b"x\n")
    run(listing_of(h.store))
    lock_file = [LOCK_NAME] if mode == "per-mailbox" else []
    assert sorted(p.name for p in h.root("alice").iterdir()) == sorted(
        ["cur", "new", "tmp", INDEX_NAME, *lock_file])
    assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == sorted(
        ["alice", *([] if lock_file else [TABLE_NAME])])


# ---------------------------------------------------------------------------- read


def test_message_renamed_by_another_program_is_still_read_and_deleted(h: MaildirHarness) -> None:
    """A message whose flags another program changed is found again by its key."""
    path = write(h, "cur", "1700000000.M1P1.host,S=2:2,", b"x\n")

    async def go() -> None:
        md = await h.store.open(user())
        uid = md.listing()[0].uid
        path.rename(path.with_name("1700000000.M1P1.host,S=2:2,RS"))
        assert await read_all(md, uid) == b"x\r\n"
        path.with_name("1700000000.M1P1.host,S=2:2,RS").rename(
            path.with_name("1700000000.M1P1.host,S=2,W=3:2,T"))
        await md.commit([uid])
        await md.close()

    run(go())
    assert h.files("alice") == []


def test_copy_under_the_same_key_is_not_deleted(h: MaildirHarness) -> None:
    """Commit deletes a renamed message only if it is the same file (same inode)."""
    path = write(h, "cur", "1700000000.M1P1.host:2,", b"x\n")

    async def go() -> None:
        md = await h.store.open(user())
        uid = md.listing()[0].uid
        path.unlink()
        write(h, "cur", "1700000000.M1P1.host:2,S", b"other\n")
        await md.commit([uid])
        await md.close()

    run(go())
    assert h.stored("alice") == [b"other\n"]


def test_size_change_is_caught_before_sending(h: MaildirHarness) -> None:
    """A message whose wire size changed since open raises before any octet is yielded."""
    path = write(h, "cur", "1700000000.M1P1.host:2,", b"a\nb\n")

    async def go() -> None:
        md = await h.store.open(user())
        path.write_bytes(b"a\nb\nc\n")
        it = md.read(md.listing()[0].uid)
        try:
            with pytest.raises(TemporaryBackendError):
                await anext(it)
        finally:
            await md.close()

    run(go())


def test_replacement_with_the_same_wire_size_is_served(h: MaildirHarness) -> None:
    """A file replaced by one with the same wire size is sent (the count is still right)."""
    path = write(h, "cur", "1700000000.M1P1.host:2,", b"a\nb\n")

    async def go() -> None:
        md = await h.store.open(user())
        path.write_bytes(b"x\r\ny\n")  # other bytes and size, same wire size 6
        assert await read_all(md, md.listing()[0].uid) == b"x\r\ny\r\n"
        await md.close()

    run(go())


@pytest.mark.parametrize("change", ["truncate", "append"])
def test_change_while_sending_is_not_silent(h: MaildirHarness, change: str) -> None:
    """A file that shrinks or grows mid-send raises; never more than the listed size is sent."""
    path = write(h, "cur", "1700000000.M1P1.host:2,", b"line\n" * 100)

    async def go() -> None:
        md = await h.make_store(chunk_size=50).open(user())
        info = md.listing()[0]
        sent = 0
        it = md.read(info.uid)
        sent += len(await anext(it))
        with path.open("r+b") as f:
            if change == "truncate":
                f.truncate(100)
            else:
                f.seek(0, 2)
                f.write(b"more\n" * 100)
        async def drain() -> None:
            nonlocal sent
            async for chunk in it:
                sent += len(chunk)
                assert sent <= info.size

        try:
            with pytest.raises(TemporaryBackendError):
                await drain()
        finally:
            await md.close()

    run(go())


def test_big_message_streams_in_bounded_memory(h: MaildirHarness) -> None:
    """A 64 MiB message is measured and sent with memory of a few chunks, not of the message."""
    h.create("alice")
    path = h.root("alice") / "cur" / "1700000000.M1P1.host:2,"
    line = b"x" * 1023 + b"\n"
    with path.open("wb") as f:
        for _ in range(64):
            f.write(line * 1024)
    os.utime(path, (OLD, OLD))
    size = 64 * 1024 * 1024

    async def go() -> None:
        tracemalloc.start()
        try:
            md = await h.store.open(user())
            [info] = md.listing()
            assert info.size == size + size // 1024
            total = 0
            async for chunk in md.read(info.uid):
                total += len(chunk)
            assert total == info.size
            await md.close()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 * 1024 * 1024, peak

    run(go())


def test_a_shrunk_stream_reads_on_with_a_new_buffer(h: MaildirHarness) -> None:
    """shrink() (the peer stalls) drops the read buffer; the bytes that follow are right."""
    body = b"".join(b"line %d\n" % i for i in range(3000))
    write(h, "cur", "1700000000.M1P1.host:2,", body)

    async def go() -> None:
        md = await h.make_store(chunk_size=1000).open(user())
        it = md.read(md.listing()[0].uid)
        got = [await anext(it)]
        assert isinstance(it, Paced)
        it.shrink()
        got += [chunk async for chunk in it]
        assert b"".join(got) == body.replace(b"\n", b"\r\n")
        await md.close()

    run(go())


def test_a_paced_stream_reads_what_it_is_asked_at_most_its_chunk_size(
    h: MaildirHarness,
) -> None:
    """pace(n): the next reads take n raw octets, never more than the store's chunk size."""
    body = b"".join(b"line %d\r\n" % i for i in range(3000))
    write(h, "cur", "1700000000.M1P1.host:2,", body)

    async def go() -> None:
        md = await h.make_store(chunk_size=1000).open(user())
        it = md.read(md.listing()[0].uid)
        assert isinstance(it, Paced)
        it.pace(100)
        got = [await anext(it), await anext(it)]
        it.pace(300)
        got.append(await anext(it))
        it.pace(1 << 20)
        got.append(await anext(it))
        assert [len(c) for c in got] == [100, 100, 300, 1000]
        got += [chunk async for chunk in it]
        assert b"".join(got) == body
        await md.close()

    run(go())


def test_stopping_early_releases_the_file(h: MaildirHarness) -> None:
    """aclose() on a half-read message closes its file descriptor."""
    write(h, "cur", "1700000000.M1P1.host:2,", b"line\n" * 100_000)

    def fds() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    async def go() -> None:
        md = await h.make_store(chunk_size=1000).open(user())
        outside = fds()
        async for _ in md.read(md.listing()[0].uid):
            pass
        # the session keeps cur/ open for its reads, until it closes
        assert fds() == outside + 1
        before = fds()
        it = md.read(md.listing()[0].uid)
        await anext(it)
        assert fds() == before + 1
        await it.aclose()  # type: ignore[attr-defined]
        assert fds() == before
        await md.close()
        assert fds() < outside  # cur/ closed with the session (and its lock released)

    run(go())


# ---------------------------------------------------------------------------- commit


def test_commit_failure_is_reported_and_others_still_go(
    h: MaildirHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unlink that fails (not ENOENT) raises TemporaryBackendError; the others are removed."""
    for i in range(3):
        write(h, "cur", f"{1_700_000_000 + i}.M{i}P1.host:2,", b"m%d\n" % i)
    real_unlink = os.unlink

    def unlink(path: Any, *, dir_fd: int | None = None) -> None:
        if os.fspath(path).startswith("1700000001"):
            raise PermissionError(errno.EACCES, "denied")
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)

    async def go() -> None:
        md = await h.store.open(user())
        try:
            with pytest.raises(TemporaryBackendError):
                await md.commit([i.uid for i in md.listing()])
        finally:
            await md.close()

    run(go())
    assert h.stored("alice") == [b"m1\n"]


COMMITTER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from pop3d.protocol.values import Principal
    from pop3d.storage.maildir import MaildirStore

    async def main():
        md = await MaildirStore("mail/%u/Maildir", Path(sys.argv[1])).open(Principal("alice"))
        doomed = [i.uid for i in md.listing() if int(i.uid.split(".")[0]) % 2 == 0]
        print("committing", flush=True)
        await md.commit(doomed)
        print("done", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("attempt", range(3))
def test_kill_9_during_commit_loses_nothing_undeleted(
    h: MaildirHarness, spawn_python: PythonSpawner, attempt: int
) -> None:
    """kill -9 during UPDATE: messages not asked for are intact; the others intact or gone."""
    count = 3000
    h.create("alice")
    cur = h.root("alice") / "cur"
    bodies = {f"{1_700_000_000 + i}.M{i}P1.host": b"Subject: %d\n\n%s\n" % (i, b"x" * i)
              for i in range(count)}
    for base, body in bodies.items():
        (cur / (base + ":2,")).write_bytes(body)
    proc = spawn_python(COMMITTER, str(h.base))
    assert proc.stdout is not None
    assert proc.stdout.readline() == "committing\n"
    if attempt:
        time.sleep(0.002 * attempt)  # land the kill at different points of the unlinks
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = {message_key(p.name): p.read_bytes() for p in h.files("alice")}
    for base, body in bodies.items():
        if int(base.split(".")[0]) % 2 or base in left:
            assert left[base] == body
    assert set(left) <= set(bodies)
    assert len(run(listing_of(h.store))) == len(left)  # lock released, Maildir readable


# ---------------------------------------------------------------------------- deliver


def test_delivery_creates_tmp_new_cur(h: MaildirHarness) -> None:
    """Delivery to a user without a Maildir creates tmp/, new/ and cur/."""
    run(h.store.deliver(user("dave"), chunks_of(b"x\n")))
    root = h.root("dave")
    assert sorted(p.name for p in root.iterdir()) == ["cur", "new", "tmp"]
    assert len(list((root / "new").iterdir())) == 1


@pytest.mark.parametrize("failing", ["write", "fsync"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_disk_errors_leave_nothing_half_written(
    h: MaildirHarness, monkeypatch: pytest.MonkeyPatch, failing: str, err: int
) -> None:
    """ENOSPC/EDQUOT/EIO while writing or syncing: TemporaryBackendError, tmp/ and new/ empty."""
    h.create("alice")

    def fail(*args: Any) -> Any:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(TemporaryBackendError):
        run(h.store.deliver(user(), chunks_of(b"a" * 1000, b"b\n")))
    monkeypatch.undo()
    for folder in ("tmp", "new", "cur"):
        assert list((h.root("alice") / folder).iterdir()) == []


def test_unique_names_under_concurrency(h: MaildirHarness) -> None:
    """Concurrent deliveries in one process get distinct names (the Q counter)."""

    async def go() -> None:
        async def one(i: int) -> None:
            await h.store.deliver(user(), chunks_of(b"%d\n" % i))

        await asyncio.gather(*(one(i) for i in range(200)))

    run(go())
    names = [p.name for p in (h.root("alice") / "new").iterdir()]
    assert len(set(names)) == 200


def test_stat_changes_nothing(h: MaildirHarness) -> None:
    """stat() neither moves new/ to cur/ nor writes the index nor takes the lock."""
    write(h, "new", "1700000000.M1P1.host", b"abc\n")
    stats = run(h.store.stat(user()))
    assert (stats.count, stats.size, stats.oldest) == (1, 5, OLD)
    assert sorted(p.name for p in h.root("alice").iterdir()) == ["cur", "new", "tmp"]
    assert [p.name for p in (h.root("alice") / "new").iterdir()] == ["1700000000.M1P1.host"]


def test_from_config(tmp_path: Path) -> None:
    """The store is built from [storage]: template, base folder and default quota."""
    store = MaildirStore.from_config(StorageConfig(maildir="m/%u", base=tmp_path, quota=5))
    assert store.path_for("bob") == tmp_path / "m" / "bob"
    assert store.quota == 5


def test_read_wire_matches_helper(h: MaildirHarness) -> None:
    """What read() yields is exactly wire.to_wire of the stored file."""
    data = b"From: a\n\n.\r\n..\n\rx\r"
    write(h, "cur", "1700000000.M1P1.host:2,", data)

    async def go() -> None:
        md = await h.make_store(chunk_size=3).open(user())
        assert await read_all(md, md.listing()[0].uid) == to_wire(data)
        await md.close()

    run(go())


def test_cancelled_open_does_not_leak_the_lock(h: MaildirHarness) -> None:
    """A login cancelled while a big Maildir is scanned in a thread leaves it unlocked."""
    h.create("alice")
    cur = h.root("alice") / "cur"
    for i in range(3000):
        (cur / f"{1_700_000_000 + i}.M{i}P1.{'h' * 40}:2,").write_bytes(b"x\n")

    async def go() -> None:
        task = asyncio.create_task(h.store.open(user()))
        await asyncio.sleep(0)  # let it reach the thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 10
        while True:  # the thread finishes on its own; its late callback releases the lock
            try:
                md = await h.store.open(user())
            except MaildropLocked:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
                continue
            assert len(md.listing()) == 3000
            await md.close()
            return

    run(go())
