"""The per-process listing cache of Maildir: used only while cur/ and new/ are unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pop3d.errors import MaildropLocked, WouldWait
from pop3d.storage import lock_table, maildir
from pop3d.storage.locking import PER_MAILBOX_LOCKS
from pop3d.storage.maildir import LOCK_NAME, MaildirStore

from .contract import read_all, run, user
from .test_maildir import TEMPLATE, MaildirHarness

OLD = 1_600_000_000


def _age(h: MaildirHarness) -> None:
    """Make both folders look untouched for years (not racy)."""
    for folder in ("cur", "new"):
        os.utime(h.root("alice") / folder, (OLD, OLD))


def _listing(store: MaildirStore) -> list[tuple[str, int]]:
    drop = run(store.open(user()))
    try:
        return [(m.uid, m.size) for m in drop.listing()]
    finally:
        run(drop.close())


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every directory scan."""
    seen: list[str] = []
    real = os.scandir

    def counting(path: str) -> object:
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    return seen


def test_unchanged_maildir_is_not_scanned_again(tmp_path: Path, scans: list[str]) -> None:
    """A second login to an unchanged Maildir reuses the listing: no directory scan."""
    h = MaildirHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    h.put("alice", b"Subject: 2\n\ntwo\n")
    store = h.make_store()
    first = _listing(store)  # moves new/ -> cur/: folders change, nothing remembered
    _age(h)
    second = _listing(store)  # scans and remembers
    scans.clear()
    assert _listing(store) == second == first
    assert scans == []


def test_delivery_is_seen_at_once(tmp_path: Path) -> None:
    """A message delivered after a remembered listing shows at the next login."""
    h = MaildirHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    _listing(store)
    _age(h)
    assert len(_listing(store)) == 1
    h.put("alice", b"Subject: 2\n\ntwo\n")  # new/ changes: its mtime is now
    assert len(_listing(store)) == 2


def test_deletion_by_another_program_is_seen(tmp_path: Path) -> None:
    """A message removed by another program after a remembered listing is gone next login."""
    h = MaildirHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    h.put("alice", b"Subject: 2\n\ntwo\n")
    store = h.make_store()
    _listing(store)
    _age(h)
    uids = [uid for uid, _ in _listing(store)]
    h.vanish("alice", uids[0])
    assert [uid for uid, _ in _listing(store)] == uids[1:]


def test_racy_folders_are_not_remembered(tmp_path: Path, scans: list[str]) -> None:
    """Folders changed within the racy window are scanned at every login."""
    h = MaildirHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    _listing(store)
    _listing(store)  # cur/ was just written by the move: too fresh to trust
    scans.clear()
    _listing(store)
    assert scans  # scanned again


def test_a_rename_found_by_one_session_stays_in_that_session(tmp_path: Path) -> None:
    """Sessions share a remembered listing; a rename one of them finds is its own.

    Another program renames a message (a flag) and the folder's mtime is put back, as if
    the change had come within the timestamp granularity: the first session reads the
    message under its new name, and the listing the next session gets still names the
    file as it was listed, which that session finds renamed again by itself.
    """
    h = MaildirHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    _listing(store)
    _age(h)
    _listing(store)  # scans and remembers
    cur = h.root("alice") / "cur"
    (path,) = cur.iterdir()
    name = path.name
    path.rename(cur / (name.split(":")[0] + ":2,S"))
    os.utime(cur, (OLD, OLD))
    for _ in range(2):
        drop = run(store.open(user()))
        try:
            (info,) = drop.listing()
            assert drop._by_uid[info.uid].name == name  # as listed
            assert run(read_all(drop, info.uid)) == b"Subject: 1\r\n\r\none\r\n"
            assert drop._by_uid[info.uid].name.endswith(":2,S")  # as found
        finally:
            run(drop.close())


def test_open_now_opens_only_what_is_remembered(tmp_path: Path, scans: list[str]) -> None:
    """The login fast path opens an unchanged Maildir without a scan, else WouldWait.

    It locks as open does, and a refusal leaves no lock behind.
    """
    h = MaildirHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    with pytest.raises(WouldWait):  # never listed
        store.open_now(user())
    _listing(store)
    _age(h)
    with pytest.raises(WouldWait):  # listed, but while new/ was being emptied
        store.open_now(user())
    expected = _listing(store)
    scans.clear()
    drop = store.open_now(user())
    try:
        assert [(m.uid, m.size) for m in drop.listing()] == expected
        assert scans == []
        with pytest.raises(MaildropLocked):
            store.open_now(user())
    finally:
        run(drop.close())
    h.put("alice", b"Subject: 2\n\ntwo\n")
    with pytest.raises(WouldWait):  # changed: open scans it
        store.open_now(user())
    assert len(_listing(store)) == 2  # and the refused fast path left no lock


def test_a_remembered_listing_locks_the_byte_a_fresh_store_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock-table byte kept with a listing is the one found from the folder."""
    h = MaildirHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    _listing(store)
    _age(h)
    _listing(store)  # remembered, with its byte
    found: list[Path] = []
    real = lock_table.offset_in

    def counting(dir_fd: int, name: str) -> int:
        found.append(Path(name))
        return real(dir_fd, name)

    monkeypatch.setattr(lock_table, "offset_in", counting)
    drop = store.open_now(user())
    try:
        assert found == []  # the byte came with the listing
        with pytest.raises(MaildropLocked):  # a store that remembers nothing finds it
            run(h.make_store().open(user()))
        assert len(found) == 1
    finally:
        run(drop.close())
    assert len(_listing(h.make_store())) == 1  # released


def test_open_now_takes_a_per_mailbox_lock_beside_the_maildir(tmp_path: Path) -> None:
    """The lock file is opened relative to the folder open_now opened (O_PATH)."""
    h = MaildirHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = MaildirStore(TEMPLATE, h.base, hostname="test", session_locks=PER_MAILBOX_LOCKS)
    _listing(store)
    _age(h)
    _listing(store)  # remembered
    drop = store.open_now(user())
    try:
        with pytest.raises(MaildropLocked):
            store.open_now(user())
        assert len(list(h.base.rglob(LOCK_NAME))) == 1
    finally:
        run(drop.close())
    run(run(store.open(user())).close())  # released: it opens again


def test_commit_now_does_what_commit_does_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """commit_now unlinks as many as commit does inline; more are left to commit, untouched."""
    monkeypatch.setattr(maildir, "_INLINE_COMMIT", 2)
    h = MaildirHarness(tmp_path)
    for i in range(3):
        h.put("alice", b"Subject: %d\n\nbody\n" % i)
    store = h.make_store()
    drop = run(store.open(user()))
    try:
        uids = [m.uid for m in drop.listing()]
        with pytest.raises(WouldWait):
            drop.commit_now([*uids, *uids])
        assert len(h.files("alice")) == 3
        drop.commit_now([uids[0], uids[0], "no-such-uid"])
        assert len(h.files("alice")) == 2
    finally:
        run(drop.close())
    assert [uid for uid, _ in _listing(store)] == uids[1:]
