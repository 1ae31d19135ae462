"""The pooled Database: lent connections reused, waiters served, broken ones replaced."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pop3d.config import DatabaseConfig
from pop3d.database import Database, DatabaseUnavailable


async def _pid(database: Database, sleep: float = 0.0) -> int:
    async with database.connection() as conn:
        cur = await conn.execute("SELECT pg_backend_pid(), pg_sleep(%s)", (sleep,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def test_requests_beyond_pool_max_wait_their_turn(db_config: DatabaseConfig) -> None:
    """More requests than pool_max at once: each is served, on at most pool_max
    connections, and a lone request afterwards reuses one of them."""
    database = Database(DatabaseConfig(url=db_config.url, pool_max=2, timeout=5.0))

    async def go() -> None:
        pids = await asyncio.gather(*(_pid(database, 0.02) for _ in range(12)))
        assert len(set(pids)) <= 2
        assert await _pid(database) in set(pids)
        await database.close()

    asyncio.run(go())


def test_a_broken_connection_is_replaced(db_config: DatabaseConfig) -> None:
    """A lent connection whose server process died fails its request with
    DatabaseUnavailable (SYS/TEMP), and the next requests get a working connection."""
    database = Database(DatabaseConfig(url=db_config.url, pool_max=1, timeout=2.0))

    async def go() -> None:
        first = await _pid(database)
        with psycopg.connect(db_config.url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        with pytest.raises(DatabaseUnavailable):
            await _pid(database)
        for _ in range(50):  # the pool opens a new one in the background
            try:
                second = await _pid(database)
            except DatabaseUnavailable:
                await asyncio.sleep(0.1)
            else:
                assert second != first
                break
        else:
            pytest.fail("no working connection after the broken one")
        await database.close()

    asyncio.run(go())


def test_a_waiter_giving_up_loses_no_connection(db_config: DatabaseConfig) -> None:
    """Requests that give up while waiting for the one connection (their session
    ended) leave it to the others: with pool_max = 1 every later request is served."""
    database = Database(DatabaseConfig(url=db_config.url, pool_max=1, timeout=5.0))

    async def go() -> None:
        holder = asyncio.create_task(_pid(database, 0.2))
        await asyncio.sleep(0.05)
        quitters = [asyncio.create_task(_pid(database)) for _ in range(3)]
        stayer = asyncio.create_task(_pid(database))
        await asyncio.sleep(0.05)
        for task in quitters:
            task.cancel()
        pid = await holder
        assert await stayer == pid
        # A connection lost to a quitter would leave these DatabaseUnavailable.
        assert await asyncio.gather(*(_pid(database) for _ in range(3))) == [pid] * 3
        await database.close()

    asyncio.run(go())
