"""A throwaway PostgreSQL for the session, and a clean pop3d database for each test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from pop3d.config import DatabaseConfig
from pop3d.database import Database
from tests.pgserver import PgServer, start_or_skip

#: Every table of the schema, emptied between tests.
TABLES = "users, mailboxes, messages, message_chunks, maildrop_leases"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL (skips when PostgreSQL is not installed)."""
    server = start_or_skip(preload=("pg_stat_statements",))
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def pg_schema_url(pg_server: PgServer) -> str:
    """A database with the pop3d schema applied by the migrations."""
    import psycopg  # noqa: PLC0415

    from pop3d import dbadmin  # noqa: PLC0415

    url = pg_server.create_database("pop3d")

    async def init() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await dbadmin.migrate(conn)
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    asyncio.run(init())
    return url


@pytest.fixture
def pg_url(pg_schema_url: str) -> str:
    """The pop3d database, emptied for this test."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(pg_schema_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} CASCADE")
    return pg_schema_url


@pytest.fixture
def db_config(pg_url: str) -> DatabaseConfig:
    """A [database] section of the test database (short lease for the lease tests)."""
    return DatabaseConfig(url=pg_url, timeout=2.0, lock_ttl=6.0)


@pytest.fixture
def database(db_config: DatabaseConfig) -> Database:
    """An unpooled Database (each asyncio.run of a test is its own event loop)."""
    return Database(db_config, pooled=False)


class LoopCachedDatabase(Database):
    """A Database keeping one connection per event loop (tests run a loop per call).

    The contract tests call ``asyncio.run`` hundreds of times; a connection per request
    would make them slow, and a pool cannot outlive its loop.  :meth:`finish` closes what
    is left, synchronously, after the loops are gone.
    """

    def __init__(self, config: DatabaseConfig) -> None:
        super().__init__(config, pooled=False)
        self._by_loop: dict[int, tuple[Any, asyncio.Lock]] = {}
        self._all: list[Any] = []

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        import psycopg  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        entry = self._by_loop.get(id(loop))
        if entry is None or entry[0].closed:
            conn = await psycopg.AsyncConnection.connect(self.config.url, **self._kwargs)
            entry = (conn, asyncio.Lock())
            self._by_loop[id(loop)] = entry
            self._all.append(conn)
        async with entry[1]:
            yield entry[0]

    long_connection = connection

    def finish(self) -> None:
        """Close every connection (their loops are closed: libpq's close, synchronous)."""
        for conn in self._all:
            if not conn.closed:
                conn.pgconn.finish()
        self._all.clear()
        self._by_loop.clear()


@pytest.fixture
def cached_database(db_config: DatabaseConfig) -> Iterator[LoopCachedDatabase]:
    """A Database with a connection per event loop, closed at the end of the test."""
    db = LoopCachedDatabase(db_config)
    yield db
    db.finish()
