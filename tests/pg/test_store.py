"""The storage contract on the PostgreSQL store, plus what only it promises."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from pop3d.cluster_lock import LeaseManager
from pop3d.database import Database
from pop3d.storage.postgresql import CHUNK_ROW, PostgresStore, new_uidl
from pop3d.storage.wire import wire_size
from tests.storage.contract import Harness, StoreContract, chunks_of, run, user

Params = tuple[object, ...] | dict[str, object]


class PgHarness(Harness):
    """Drives a PostgresStore; put() delivers, vanish() deletes behind the session's back."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.leases = LeaseManager(database, database.config.lock_ttl)
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def make_store(self, *, chunk_size: int | None = None,
                   quota: int | None = None) -> PostgresStore:
        store = PostgresStore(self.database, self.leases, quota=quota)
        if chunk_size is not None:
            store.chunk_size = chunk_size
        return store

    def _sql(self, query: str, params: Params) -> list[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database.config.url, autocommit=True)
        cur = self._conn.execute(query, params)
        return cur.fetchall() if cur.description else []

    def put(self, username: str, data: bytes) -> None:
        """Insert as another node's delivery would (synchronously: put runs inside tests'
        event loops too)."""
        self._sql(
            "WITH b AS (INSERT INTO mailboxes (name) VALUES (%(n)s) ON CONFLICT DO NOTHING), "
            "m AS (INSERT INTO messages (mailbox, uidl, size, stored_size) "
            "VALUES (%(n)s, %(u)s, %(w)s, %(s)s) RETURNING id) "
            "INSERT INTO message_chunks SELECT id, 0, %(d)s FROM m",
            {"n": username, "u": new_uidl(), "w": wire_size(data), "s": len(data), "d": data},
        )

    def create(self, username: str) -> None:
        self._sql("INSERT INTO mailboxes (name) VALUES (%s) ON CONFLICT DO NOTHING",
                  (username,))

    def stored(self, username: str) -> list[bytes]:
        rows = self._sql(
            "SELECT string_agg(c.data, ''::bytea ORDER BY c.seq) FROM messages m "
            "JOIN message_chunks c ON c.message = m.id WHERE m.mailbox = %s GROUP BY m.id",
            (username,),
        )
        return sorted(bytes(r[0]) for r in rows)  # type: ignore[call-overload]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def vanish(self, username: str, uid: str) -> None:
        self._sql("DELETE FROM messages WHERE mailbox = %s AND uidl = %s", (username, uid))


class TestPostgresContract(StoreContract):
    """The storage contract, on PostgreSQL."""

    @pytest.fixture
    def harness(self, cached_database: Database) -> Iterator[Harness]:
        database = cached_database
        harness = PgHarness(database)
        yield harness
        harness.close()


def test_big_message_is_stored_in_bounded_rows(database: Database) -> None:
    """A message of several chunk rows is stored in rows of at most CHUNK_ROW octets."""
    harness = PgHarness(database)
    body = b"x" * (3 * CHUNK_ROW + 17)
    run(harness.make_store().deliver(user(), chunks_of(*[body[i:i + 65536]
                                                         for i in range(0, len(body), 65536)])))
    rows = harness._sql("SELECT length(data) FROM message_chunks ORDER BY seq", ())
    assert [r[0] for r in rows] == [CHUNK_ROW] * 3 + [17]
    assert harness.stored("alice") == [body]
    harness.close()


def test_import_uidl_is_kept_and_idempotent(database: Database) -> None:
    """A delivery with a given UIDL keeps it; the same UIDL twice stores one message."""
    harness = PgHarness(database)
    store = harness.make_store()
    for _ in range(2):
        run(store.deliver(user(), chunks_of(b"small\n"), uidl="1700000000.M1P2.host"))
        run(store.deliver(user(), chunks_of(b"y" * (CHUNK_ROW + 5)), uidl="big-one"))

    async def go() -> list[str]:
        md = await store.open(user())
        uids = [i.uid for i in md.listing()]
        await md.close()
        return uids

    assert run(go()) == ["1700000000.M1P2.host", "big-one"]
    harness.close()
