"""The in-memory backend: the storage contract, plus its seeding API."""

from __future__ import annotations

import pytest

from pop3d.errors import TemporaryBackendError
from pop3d.storage.memory import MemoryStore

from .contract import Harness, StoreContract, read_all, run, user


class MemoryHarness(Harness):
    """Drives a :class:`MemoryStore`; stores made by make_store share one set of boxes."""

    def __init__(self) -> None:
        self.backing = MemoryStore()

    def make_store(self, *, chunk_size: int | None = None, quota: int | None = None) -> MemoryStore:
        # Share the boxes (and their locks) between stores with different settings.
        store = MemoryStore(quota=quota, chunk_size=chunk_size or self.backing.chunk_size)
        store._boxes = self.backing._boxes
        store._uids = self.backing._uids
        return store

    def put(self, username: str, data: bytes) -> None:
        self.backing.add(username, data)

    def create(self, username: str) -> None:
        self.backing.create(username)

    def stored(self, username: str) -> list[bytes]:
        return sorted(self.backing.messages(username).values())

    def vanish(self, username: str, uid: str) -> None:
        self.backing.remove(username, uid)


class TestMemoryContract(StoreContract):
    """The storage contract, on the in-memory backend."""

    @pytest.fixture
    def harness(self) -> Harness:
        return MemoryHarness()


def test_add_returns_the_uid_that_is_listed() -> None:
    """add() returns the UID the message is listed under; messages() shows it as stored."""
    store = MemoryStore()
    uid = store.add("alice", b"hi\n")
    assert store.messages("alice") == {uid: b"hi\n"}

    async def go() -> None:
        md = await store.open(user())
        assert [i.uid for i in md.listing()] == [uid]
        assert await read_all(md, uid) == b"hi\r\n"
        assert store.is_locked("alice")
        await md.close()
        assert not store.is_locked("alice")

    run(go())


def test_unknown_user_has_no_maildrop() -> None:
    """Only users created, added to or delivered to have a maildrop."""
    store = MemoryStore()
    with pytest.raises(TemporaryBackendError):
        run(store.open(user("ghost")))
    assert store.messages("ghost") == {}


def test_unsafe_names_refused_when_seeding() -> None:
    """The seeding API refuses the names the file backends refuse."""
    store = MemoryStore()
    with pytest.raises(TemporaryBackendError):
        store.add("../x", b"x")


def test_dropped_session_releases_the_lock() -> None:
    """A session dropped without close() does not lock its user out for good."""
    store = MemoryStore()
    store.add("alice", b"x\n")

    async def go() -> None:
        md = await store.open(user())
        del md
        again = await store.open(user())
        await again.close()

    run(go())
