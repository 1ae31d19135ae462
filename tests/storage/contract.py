"""The storage contract, written once: every backend's test module runs it.

How a backend uses it (see test_maildir.py and test_memory.py)::

    class TestMyBackendContract(StoreContract):
        @pytest.fixture
        def harness(self, tmp_path: Path) -> Harness:
            return MyHarness(tmp_path)

A :class:`Harness` makes stores of the backend and reaches into their storage the way
another program would (an MTA adding mail, a second deleter).  Each rule of
storage/base.py is one test below, with its rule in the docstring.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Protocol, TypeVar

import pytest

from pop3d.errors import (
    LocalProtocolError,
    MaildropLocked,
    MessageVanished,
    QuotaExceeded,
    TemporaryBackendError,
)
from pop3d.protocol.values import Principal
from pop3d.storage.base import Deliverer, MailboxInspector, Maildrop, MailStore
from pop3d.storage.wire import to_wire

T = TypeVar("T")


class Store(MailStore, Deliverer, MailboxInspector, Protocol):
    """What the contract drives: a store that opens, delivers and counts."""


class Harness(ABC):
    """A backend's side of the contract: build stores, and touch storage from outside."""

    @abstractmethod
    def make_store(self, *, chunk_size: int | None = None, quota: int | None = None) -> Store:
        """Return a store over this harness's storage (same mail for every call)."""

    @abstractmethod
    def put(self, username: str, data: bytes) -> None:
        """Add a message with exactly these stored bytes, as an MTA would; creates the box.

        Messages put later must come later in the listing.
        """

    @abstractmethod
    def create(self, username: str) -> None:
        """Make an empty maildrop for ``username``."""

    @abstractmethod
    def stored(self, username: str) -> list[bytes]:
        """Return the stored bytes of every message of ``username`` now, sorted."""

    def vanish(self, username: str, uid: str) -> None:
        """Remove a message behind the session's back (another deleter); skip if impossible."""
        pytest.skip("this backend cannot lose a message behind a session's back")

    @property
    def store(self) -> Store:
        """A store with the default settings."""
        return self.make_store()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test's coroutine (there is no pytest-asyncio)."""
    return asyncio.run(coro)


def user(name: str = "alice", **attributes: str) -> Principal:
    """A principal as an authenticator would return it."""
    return Principal(name, attributes)


async def read_all(maildrop: Maildrop, uid: str, bound: int | None = None) -> bytes:
    """Read a message whole, checking each chunk is non-empty and at most ``bound`` long."""
    chunks = []
    async for chunk in maildrop.read(uid):
        assert chunk
        if bound is not None:
            assert len(chunk) <= bound
        chunks.append(chunk)
    return b"".join(chunks)


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    """A delivery stream of these chunks."""
    for part in parts:
        await asyncio.sleep(0)
        yield part


#: Stored bytes -> what the wire carries, for every shape of message the rules name.
SAMPLES: dict[str, tuple[bytes, bytes]] = {
    "bare_lf": (b"Subject: a\n\nline\n", b"Subject: a\r\n\r\nline\r\n"),
    "crlf": (b"Subject: a\r\n\r\nline\r\n", b"Subject: a\r\n\r\nline\r\n"),
    "mixed": (b"A: 1\r\nB: 2\n\r\nx\ny\r\n", b"A: 1\r\nB: 2\r\n\r\nx\r\ny\r\n"),
    "no_final_newline": (b"A: 1\n\nlast", b"A: 1\r\n\r\nlast\r\n"),
    "empty": (b"", b""),
    "only_newline": (b"\n", b"\r\n"),
    "eight_bit": (b"S: \xc3\xa9\n\n\xd0\xbf\xff\n", b"S: \xc3\xa9\r\n\r\n\xd0\xbf\xff\r\n"),
    "nul_bytes": (b"A: 1\n\n\x00\x00x\x00\n", b"A: 1\r\n\r\n\x00\x00x\x00\r\n"),
    "dot_first_line": (b".\n", b".\r\n"),
    "dot_lines": (b"..x\n.\n.y", b"..x\r\n.\r\n.y\r\n"),
    "lone_cr": (b"a\rb\n", b"a\rb\r\n"),
    "cr_at_end": (b"a\nb\r", b"a\r\nb\r\r\n"),
    "cr_cr_lf": (b"a\r\r\nb\n", b"a\r\r\nb\r\n"),
}


#: The chunks test_delivery_stores_the_bytes_exactly delivers (CR/LF cut across chunks,
#: a leading dot, a bare LF, NUL and 0xFF, no final line end).
DELIVERY_PARTS = (b"Subject: x\r", b"\n\n.dot\r\n", b"bare\n\x00\xff", b"end")


class StoreContract:
    """Behaviour every backend keeps.  Subclass it and provide the ``harness`` fixture."""

    #: What the delivery of :data:`DELIVERY_PARTS` leaves in storage.  The bytes as
    #: given, unless a backend's format says otherwise (an mbox stores LF line ends);
    #: what RETR sends is the same for every backend.
    delivered_as = b"".join(DELIVERY_PARTS)

    @pytest.fixture
    def harness(self) -> Harness:
        raise NotImplementedError("the backend's test module provides the harness")

    # ------------------------------------------------------------ sizes and bytes

    @pytest.mark.parametrize("sample", sorted(SAMPLES))
    def test_size_and_bytes_are_the_wire_form(self, harness: Harness, sample: str) -> None:
        """LIST size = octets of the CRLF form (final CRLF added, empty stays empty); RETR = it."""
        stored, wire = SAMPLES[sample]
        harness.put("alice", stored)

        async def go() -> None:
            md = await harness.store.open(user())
            try:
                [info] = md.listing()
                assert info.size == len(wire)
                assert await read_all(md, info.uid) == wire
            finally:
                await md.close()

        run(go())

    def test_every_split_of_cr_and_lf_across_chunks(self, harness: Harness) -> None:
        """CRLF normalisation is boundary-safe: all {a,CR,LF} strings to 5 octets, chunks 1-4."""
        messages = [
            bytes(m) for n in range(6) for m in itertools.product(b"a\r\n", repeat=n)
        ]
        for m in messages:
            harness.put("alice", m)

        async def go() -> None:
            for chunk_size in (1, 2, 3, 4):
                md = await harness.make_store(chunk_size=chunk_size).open(user())
                try:
                    listing = md.listing()
                    assert len(listing) == len(messages)
                    for info, m in zip(listing, messages, strict=True):
                        wire = to_wire(m)
                        assert info.size == len(wire), m
                        assert await read_all(md, info.uid, 2 * chunk_size + 2) == wire, m
                finally:
                    await md.close()

        run(go())

    def test_random_messages_read_back_exactly(self, harness: Harness) -> None:
        """Longer random messages (CR, LF, dots, 8-bit, NUL) read back as their wire form."""
        rng = random.Random(1939)
        alphabet = b"ab.\r\n\x00\xff "
        messages = [bytes(rng.choices(alphabet, k=rng.randrange(0, 300))) for _ in range(40)]
        for m in messages:
            harness.put("alice", m)

        async def go() -> None:
            md = await harness.make_store(chunk_size=7).open(user())
            try:
                for info, m in zip(md.listing(), messages, strict=True):
                    assert info.size == len(to_wire(m))
                    assert await read_all(md, info.uid, 16) == to_wire(m)
            finally:
                await md.close()

        run(go())

    def test_big_message_streams_in_bounded_chunks(self, harness: Harness) -> None:
        """A message larger than the chunk size comes in many chunks of about chunk_size."""
        body = b"".join(b"line %d\n" % i for i in range(400_000))  # ~4.6 MB
        harness.put("alice", body)
        chunk = 64 * 1024

        async def go() -> None:
            md = await harness.make_store(chunk_size=chunk).open(user())
            try:
                [info] = md.listing()
                count = 0
                total = 0
                async for piece in md.read(info.uid):
                    assert 0 < len(piece) <= 2 * chunk + 2
                    count += 1
                    total += len(piece)
                assert total == info.size == len(to_wire(body))
                assert count > 10
            finally:
                await md.close()

        run(go())

    # ------------------------------------------------------------ listing and UIDs

    def test_listing_is_in_delivery_order(self, harness: Harness) -> None:
        """Messages are listed in the order they arrived."""
        for i in range(5):
            harness.put("alice", b"Subject: %d\n\n" % i)

        async def go() -> None:
            md = await harness.store.open(user())
            try:
                bodies = [await read_all(md, i.uid) for i in md.listing()]
            finally:
                await md.close()
            assert bodies == [b"Subject: %d\r\n\r\n" % i for i in range(5)]

        run(go())

    def test_uids_are_valid_and_unique(self, harness: Harness) -> None:
        """UIDs are 1-70 characters in 0x21-0x7E and differ between messages."""
        for i in range(20):
            harness.put("alice", b"m%d\n" % i)

        async def go() -> None:
            md = await harness.store.open(user())
            uids = [i.uid for i in md.listing()]
            await md.close()
            assert len(set(uids)) == 20
            for uid in uids:
                assert 1 <= len(uid) <= 70
                assert all(0x21 <= ord(c) <= 0x7E for c in uid)

        run(go())

    def test_uids_are_stable_across_sessions_and_stores(self, harness: Harness) -> None:
        """The same message has the same UID in every session, even after others go."""
        for i in range(4):
            harness.put("alice", b"m%d\n" % i)

        async def go() -> None:
            md = await harness.store.open(user())
            first = [(i.uid, await read_all(md, i.uid)) for i in md.listing()]
            await md.commit([first[1][0]])
            await md.close()
            md = await harness.make_store().open(user())
            second = [(i.uid, await read_all(md, i.uid)) for i in md.listing()]
            await md.close()
            assert second == [first[0], first[2], first[3]]

        run(go())

    def test_empty_maildrop_lists_nothing(self, harness: Harness) -> None:
        """An existing maildrop without mail opens with an empty listing."""
        harness.create("alice")

        async def go() -> None:
            md = await harness.store.open(user())
            assert list(md.listing()) == []
            await md.close()

        run(go())

    # ------------------------------------------------------------ errors at open

    def test_missing_maildrop_is_a_temporary_error(self, harness: Harness) -> None:
        """A missing maildrop is TemporaryBackendError at open, never an empty mailbox."""
        with pytest.raises(TemporaryBackendError):
            run(harness.store.open(user("nobody")))

    @pytest.mark.parametrize(
        "name",
        ["", ".", "..", "../alice", "a/b", "a\\b", "a\x00b", "a\nb", "a\x7fb", ".hidden",
         "x@..", "..@x", "x@.", "x@.dom", "\u200bzw\u200b", "a" * 300],
    )
    def test_unsafe_user_names_are_refused(self, harness: Harness, name: str) -> None:
        """A user name that could escape the mail root is TemporaryBackendError (open, deliver)."""
        harness.create("alice")
        with pytest.raises(TemporaryBackendError):
            run(harness.store.open(user(name)))
        with pytest.raises(TemporaryBackendError):
            run(harness.store.deliver(user(name), chunks_of(b"x\n")))
        assert harness.stored("alice") == []

    # ------------------------------------------------------------ locking

    def test_second_open_is_locked_out(self, harness: Harness) -> None:
        """One session per maildrop: a second open raises MaildropLocked, even in-process."""
        harness.put("alice", b"x\n")

        async def go() -> None:
            md = await harness.store.open(user())
            try:
                with pytest.raises(MaildropLocked):
                    await harness.make_store().open(user())
            finally:
                await md.close()
            again = await harness.store.open(user())
            await again.close()

        run(go())

    def test_close_is_idempotent_and_changes_nothing(self, harness: Harness) -> None:
        """close() releases the lock, deletes nothing, and may be called twice."""
        harness.put("alice", b"x\n")
        harness.put("alice", b"y\n")
        before = harness.stored("alice")

        async def go() -> None:
            md = await harness.store.open(user())
            await md.close()
            await md.close()
            md = await harness.store.open(user())
            await md.close()

        run(go())
        assert harness.stored("alice") == before

    def test_users_do_not_lock_each_other(self, harness: Harness) -> None:
        """Locks are per maildrop: two users have sessions at the same time."""
        harness.put("alice", b"x\n")
        harness.put("bob", b"y\n")

        async def go() -> None:
            a = await harness.store.open(user("alice"))
            b = await harness.store.open(user("bob"))
            await a.close()
            await b.close()

        run(go())

    def test_use_after_close_is_our_bug(self, harness: Harness) -> None:
        """A maildrop used after close() raises LocalProtocolError, and deletes nothing."""
        harness.put("alice", b"x\n")

        async def go() -> None:
            md = await harness.store.open(user())
            uid = md.listing()[0].uid
            await md.close()
            with pytest.raises(LocalProtocolError):
                await md.commit([uid])
            with pytest.raises(LocalProtocolError):
                md.read(uid)

        run(go())
        assert harness.stored("alice") == [b"x\n"]

    # ------------------------------------------------------------ snapshot and commit

    def test_commit_removes_exactly_the_deleted(self, harness: Harness) -> None:
        """commit() removes the listed messages asked for and no other."""
        for i in range(6):
            harness.put("alice", b"m%d\n" % i)

        async def go() -> None:
            md = await harness.store.open(user())
            uids = [i.uid for i in md.listing()]
            await md.commit([uids[0], uids[3], uids[5], "not-a-uid"])
            await md.close()

        run(go())
        assert harness.stored("alice") == [b"m1\n", b"m2\n", b"m4\n"]

    def test_commit_of_nothing_changes_nothing(self, harness: Harness) -> None:
        """An empty UPDATE keeps every message byte for byte."""
        for i in range(3):
            harness.put("alice", b"m%d\r\n" % i)
        before = harness.stored("alice")

        async def go() -> None:
            md = await harness.store.open(user())
            await md.commit([])
            await md.close()

        run(go())
        assert harness.stored("alice") == before

    def test_mail_delivered_during_a_session_is_unseen_and_kept(self, harness: Harness) -> None:
        """The listing is a snapshot: later mail is not listed and survives commit of all."""
        harness.put("alice", b"old\n")

        async def go() -> None:
            md = await harness.store.open(user())
            await harness.store.deliver(user(), chunks_of(b"new\n"))
            harness.put("alice", b"newer\n")
            assert len(md.listing()) == 1
            await md.commit([i.uid for i in md.listing()])
            await md.close()

        run(go())
        assert harness.stored("alice") == [b"new\n", b"newer\n"]

    def test_deleting_a_message_already_gone_counts_as_removed(self, harness: Harness) -> None:
        """A message another deleter removed is simply gone; the rest of the commit happens."""
        for i in range(3):
            harness.put("alice", b"m%d\n" % i)

        async def go() -> None:
            md = await harness.store.open(user())
            uids = [i.uid for i in md.listing()]
            harness.vanish("alice", uids[0])
            await md.commit([uids[0], uids[1]])
            await md.close()

        run(go())
        assert harness.stored("alice") == [b"m2\n"]

    def test_reading_a_vanished_message_raises(self, harness: Harness) -> None:
        """RETR of a message removed under the session raises MessageVanished."""
        harness.put("alice", b"x\n")

        async def go() -> None:
            md = await harness.store.open(user())
            uid = md.listing()[0].uid
            harness.vanish("alice", uid)
            try:
                with pytest.raises(MessageVanished):
                    await read_all(md, uid)
            finally:
                await md.close()

        run(go())

    def test_partial_read_then_close(self, harness: Harness) -> None:
        """Stopping a read early (TOP) leaves the message intact and the maildrop usable."""
        harness.put("alice", b"line\n" * 1000)

        async def go() -> None:
            md = await harness.make_store(chunk_size=100).open(user())
            it = md.read(md.listing()[0].uid)
            assert await anext(it)
            await it.aclose()  # type: ignore[attr-defined]
            assert len(await read_all(md, md.listing()[0].uid)) == 6000
            await md.close()

        run(go())
        assert harness.stored("alice") == [b"line\n" * 1000]

    # ------------------------------------------------------------ delivery

    def test_delivery_stores_the_bytes_exactly(self, harness: Harness) -> None:
        """A delivered message is stored as :attr:`delivered_as` and read back in wire form."""
        parts = DELIVERY_PARTS
        harness.create("alice")

        async def go() -> None:
            await harness.store.deliver(user(), chunks_of(*parts))
            md = await harness.store.open(user())
            [info] = md.listing()
            assert await read_all(md, info.uid) == to_wire(b"".join(parts))
            assert info.size == len(to_wire(b"".join(parts)))
            await md.close()

        run(go())
        assert harness.stored("alice") == [self.delivered_as]

    def test_delivery_creates_the_maildrop(self, harness: Harness) -> None:
        """Delivering to a user without a maildrop creates it (as an LDA does)."""

        async def go() -> None:
            await harness.store.deliver(user("carol"), chunks_of(b"hello\n"))
            md = await harness.store.open(user("carol"))
            assert len(md.listing()) == 1
            await md.close()

        run(go())
        assert harness.stored("carol") == [b"hello\n"]

    def test_failed_delivery_leaves_nothing(self, harness: Harness) -> None:
        """A stream that fails mid-way leaves no trace of the message."""
        harness.put("alice", b"keep\n")

        async def broken() -> AsyncIterator[bytes]:
            yield b"Subject: half\n"
            raise RuntimeError("connection lost")

        with pytest.raises(RuntimeError):
            run(harness.store.deliver(user(), broken()))
        assert harness.stored("alice") == [b"keep\n"]

    def test_quota_refuses_what_would_not_fit(self, harness: Harness) -> None:
        """Over the default quota (wire octets) delivery raises QuotaExceeded and stores nothing."""
        harness.put("alice", b"x" * 50 + b"\n")  # 52 wire octets
        store = harness.make_store(quota=100)

        async def go() -> None:
            await store.deliver(user(), chunks_of(b"y" * 46 + b"\n"))  # 48: exactly full
            with pytest.raises(QuotaExceeded):
                await store.deliver(user(), chunks_of(b"z\n"))

        run(go())
        assert harness.stored("alice") == sorted([b"x" * 50 + b"\n", b"y" * 46 + b"\n"])

    @pytest.mark.parametrize(
        ("attributes", "fits"),
        [
            ({"quota": "10"}, False),
            ({"quota": "1K"}, True),
            ({"quota": "*:storage=10"}, False),
            ({"quota_rule": "*:storage=1M"}, True),
            ({"userdb_quota_rule": "*:storage=10"}, False),
            ({"quota": "*:ignore"}, True),
            ({"quota": "0"}, True),
        ],
    )
    def test_per_user_quota_overrides_the_default(
        self, harness: Harness, attributes: dict[str, str], fits: bool
    ) -> None:
        """The user's record (plain size or Dovecot's *:storage=) overrides the store quota."""
        harness.create("alice")
        store = harness.make_store(quota=1)
        message = b"0123456789abcdef\n"

        async def go() -> None:
            await store.deliver(user(**attributes), chunks_of(message))

        if fits:
            run(go())
            assert harness.stored("alice") == [message]
        else:
            with pytest.raises(QuotaExceeded):
                run(go())
            assert harness.stored("alice") == []

    def test_unreadable_quota_is_a_temporary_error(self, harness: Harness) -> None:
        """A quota field that cannot be read fails delivery temporarily, storing nothing."""
        harness.create("alice")
        with pytest.raises(TemporaryBackendError):
            run(harness.store.deliver(user(quota="lots"), chunks_of(b"x\n")))
        assert harness.stored("alice") == []

    def test_concurrent_deliveries_all_arrive(self, harness: Harness) -> None:
        """Many deliveries at once each store their message."""
        harness.create("alice")

        async def go() -> None:
            await asyncio.gather(
                *(harness.store.deliver(user(), chunks_of(b"m%03d\n" % i)) for i in range(50))
            )

        run(go())
        assert harness.stored("alice") == [b"m%03d\n" % i for i in range(50)]

    # ------------------------------------------------------------ stat

    def test_stat_counts_without_the_lock(self, harness: Harness) -> None:
        """stat() gives count, total wire size and oldest time, even while a session is open."""
        harness.put("alice", b"a\n")
        harness.put("alice", b"bb")

        async def go() -> None:
            md = await harness.store.open(user())
            stats = await harness.store.stat(user())
            await md.close()
            assert (stats.count, stats.size) == (2, 3 + 4)
            assert stats.oldest is not None

        run(go())

    def test_stat_of_empty_and_missing(self, harness: Harness) -> None:
        """stat() of an empty maildrop is zero; of a missing one, TemporaryBackendError."""
        harness.create("alice")
        stats = run(harness.store.stat(user()))
        assert (stats.count, stats.size, stats.oldest) == (0, 0, None)
        with pytest.raises(TemporaryBackendError):
            run(harness.store.stat(user("nobody")))
