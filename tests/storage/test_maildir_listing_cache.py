"""The per-process listing cache of Maildir: used only while cur/ and new/ are unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pop3d.storage.maildir import MaildirStore

from .contract import read_all, run, user
from .test_maildir import MaildirHarness

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


def test_sessions_get_their_own_copy(tmp_path: Path) -> None:
    """A session renaming its entries (a file moved under it) does not change the cache."""
    h = MaildirHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    _listing(store)
    _age(h)
    _listing(store)
    drop = run(store.open(user()))
    try:
        [info] = drop.listing()
        [path] = h.files("alice")
        path.rename(path.with_name(path.name + "S"))  # flags added by another program
        assert run(read_all(drop, info.uid)).startswith(b"Subject: 1")
    finally:
        run(drop.close())
    assert len(_listing(store)) == 1

