"""The cluster-wide maildrop lease: taken, renewed, lost, taken over, fenced."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest

from pop3d.cluster_lock import LeasedStore, LeaseLost, LeaseManager
from pop3d.config import DatabaseConfig
from pop3d.database import Database
from pop3d.errors import MaildropLocked, TemporaryBackendError
from pop3d.storage.maildir import MaildirStore
from pop3d.storage.postgresql import NoSuchMaildrop, PostgresMaildrop, PostgresStore
from tests.storage.contract import chunks_of, read_all, user


def _count(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
        assert row is not None
        return int(row[0])


async def _two_nodes(database: Database, ttl: float) -> tuple[PostgresStore, PostgresStore]:
    one = PostgresStore(database, LeaseManager(database, ttl))
    two = PostgresStore(database, LeaseManager(database, ttl))
    await one.deliver(user(), chunks_of(b"a\n"))
    await one.deliver(user(), chunks_of(b"b\n"))
    return one, two


def test_heartbeat_keeps_the_lease_past_its_ttl(database: Database) -> None:
    """A live node renews: its session keeps the maildrop well past one TTL."""

    async def go() -> None:
        one, two = await _two_nodes(database, ttl=0.6)
        md = await one.open(user())
        await asyncio.sleep(1.5)
        with pytest.raises(MaildropLocked):
            await two.open(user())
        await md.close()
        again = await two.open(user())
        await again.close()

    asyncio.run(go())


async def _taken_over(
    database: Database,
) -> tuple[PostgresMaildrop, PostgresMaildrop, list[str]]:
    """Node one opens the maildrop and stops renewing (cut off); node two takes it over
    as soon as the lease has lapsed.  Return node one's maildrop, node two's, the uids."""
    one, two = await _two_nodes(database, ttl=0.5)
    md = await one.open(user())
    uids = [i.uid for i in md.listing()]
    heartbeat = one.leases._heartbeat
    assert heartbeat is not None
    heartbeat.cancel()
    deadline = time.monotonic() + 30
    while True:
        try:
            return md, await two.open(user()), uids
        except MaildropLocked:
            assert time.monotonic() < deadline, "the lease never lapsed"
            await asyncio.sleep(0.05)


def test_a_node_that_stops_renewing_loses_the_maildrop(database: Database) -> None:
    """Without renewals (a node cut off) the lease lapses: another node takes it, and the
    first session may neither read nor UPDATE."""

    async def go() -> None:
        md, other, uids = await _taken_over(database)
        with pytest.raises(LeaseLost):
            await read_all(md, uids[0])
        with pytest.raises(TemporaryBackendError):
            await md.commit(uids)
        await md.close()
        assert [i.uid for i in other.listing()] == uids
        await other.close()

    asyncio.run(go())
    assert _count(database.config.url) == 2


def test_the_database_fences_a_session_whose_lease_was_taken(database: Database) -> None:
    """Even a node whose clock says the lease holds cannot UPDATE once another took it."""

    async def go() -> None:
        md, other, uids = await _taken_over(database)
        md._lease.deadline = float("inf")
        with pytest.raises(TemporaryBackendError):
            await md.commit(uids)
        await other.close()
        await md.close()

    asyncio.run(go())
    assert _count(database.config.url) == 2


def test_maildir_on_shared_storage_is_leased(database: Database, tmp_path: Path) -> None:
    """Two nodes over one Maildir tree: the second open is [IN-USE] until the first closes."""
    (tmp_path / "alice" / "Maildir" / "new").mkdir(parents=True)
    for folder in ("cur", "tmp"):
        (tmp_path / "alice" / "Maildir" / folder).mkdir()

    def node() -> LeasedStore:
        return LeasedStore(MaildirStore("%u/Maildir", tmp_path),
                           LeaseManager(database, 5.0))

    async def go() -> None:
        one, two = node(), node()
        await one.deliver(user(), chunks_of(b"hello\n"))
        md = await one.open(user())
        with pytest.raises(MaildropLocked):
            await two.open(user())
        with pytest.raises(MaildropLocked):  # refused by the lease, not only the local lock
            await two.manager.acquire("alice")
        await md.commit([i.uid for i in md.listing()])
        await md.close()
        again = await two.open(user())
        assert list(again.listing()) == []
        await again.close()

    asyncio.run(go())


def _calls(url: str, fragment: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                           "WHERE query LIKE %s", (f"%{fragment}%",)).fetchone()
        assert row is not None
        return int(row[0])


def _reset_statements(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def test_sessions_opening_and_ending_together_share_one_statement(
    db_config: DatabaseConfig,
) -> None:
    """Opens waiting at one moment go out in one pop3d_leases call, and each still gets
    its own answer: a maildrop asked twice is [IN-USE] once, a missing one is missing
    alone.  The releases of sessions ending together share one statement too, and
    free every maildrop."""
    database = Database(db_config)
    url = db_config.url

    async def go() -> None:
        one, two = await _two_nodes(database, ttl=30.0)
        await one.deliver(user("bob"), chunks_of(b"b1\n"))
        await one.create("carol")
        _reset_statements(url)
        names = ["alice", "bob", "carol", "alice", "nobody"]
        results = await asyncio.gather(*(one.open(user(n)) for n in names),
                                       return_exceptions=True)
        assert _calls(url, "pop3d_leases") == 1
        opened = [r for r in results if not isinstance(r, BaseException)]
        assert len(opened) == 3
        assert [type(r) for r in results[3:]] == [MaildropLocked, NoSuchMaildrop]
        sizes = sorted(len(md.listing()) for md in opened)
        assert sizes == [0, 1, 2]
        with pytest.raises(MaildropLocked):  # held for another node as well
            await two.open(user("bob"))
        _reset_statements(url)
        await asyncio.gather(*(md.close() for md in opened))
        assert _calls(url, "DELETE FROM maildrop_leases") + _calls(url, "pop3d_leases") == 1
        again = await asyncio.gather(*(two.open(user(n)) for n in ("alice", "bob", "carol")))
        await asyncio.gather(*(md.close() for md in again))
        await database.close()

    asyncio.run(go())


def test_an_open_given_up_by_its_session_is_released(db_config: DatabaseConfig) -> None:
    """A session that goes away while its open is on its way (the client hung up) does
    not keep the maildrop leased until the lease expires: the grant is given back."""
    database = Database(db_config)

    async def go() -> None:
        one, two = await _two_nodes(database, ttl=30.0)
        for turns in (1, 2, 3, 4):  # give up before the statement is sent, while it runs
            task = asyncio.create_task(one.open(user()))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(100):  # far less than the 30 s lease
                try:
                    md = await two.open(user())
                except MaildropLocked:
                    await asyncio.sleep(0.05)
                else:
                    await md.close()
                    break
            else:
                pytest.fail("the abandoned open kept the maildrop")
        await database.close()

    asyncio.run(go())


def test_a_shared_statement_that_fails_fails_each_session_apart(tmp_path: Path) -> None:
    """The database away: every open waiting on the shared statement gets its own
    temporary error (-ERR [SYS/TEMP]), none hangs, and a release failing is only logged
    (its lease expires)."""
    url = f"postgresql://x@/pop3d?host={tmp_path}&port=1"
    database = Database(DatabaseConfig(url=url, timeout=1.0), pooled=False)
    store = PostgresStore(database, LeaseManager(database, 30.0))

    async def go() -> None:
        results = await asyncio.gather(*(store.open(user(n)) for n in ("a", "b", "c")),
                                       return_exceptions=True)
        assert all(isinstance(r, TemporaryBackendError) for r in results), results
        assert len({id(r) for r in results}) == 3
        lease = store.leases.held("a", store.leases.new_owner(), 0.0)
        await store.leases.release(lease)  # logged, not raised

    asyncio.run(go())
