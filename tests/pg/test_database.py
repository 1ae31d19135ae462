"""The pooled Database: lent connections reused, waiters served, broken ones replaced."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pop3d.config import DatabaseConfig
from pop3d.database import Database, DatabaseUnavailable, cursor_for


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


def _run(loop_kind: str, coro: Any) -> None:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    else:
        asyncio.run(coro)


def _open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


LOOPS = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])


@LOOPS
def test_a_lent_connection_stays_watched(db_config: DatabaseConfig, loop_kind: str) -> None:
    """Statement after statement on one lent connection register its socket with the
    loop once (not at every wait), and closing the Database frees every descriptor."""
    database = Database(DatabaseConfig(url=db_config.url, pool_min=1, pool_max=1,
                                       timeout=5.0))
    _run(loop_kind, asyncio.sleep(0))  # uvloop opens its process-wide pipe once
    fds = _open_fds()

    async def go() -> None:
        watches = set()
        pids = set()
        for _ in range(20):
            async with database.connection() as conn:
                cur = await conn.execute("SELECT pg_backend_pid()")
                row = await cur.fetchone()
                assert row is not None
                pids.add(row[0])
                watches.add(id(conn._watch))  # type: ignore[attr-defined]
                assert conn._watch is not None  # type: ignore[attr-defined]
        assert len(pids) == 1
        assert len(watches) == 1
        await database.close()

    _run(loop_kind, go())
    assert _open_fds() == fds


@LOOPS
def test_an_idle_watched_connection_hung_up_by_the_server(
    db_config: DatabaseConfig, loop_kind: str
) -> None:
    """The server ends a lent connection while it is idle: its kept registration is
    dropped on the hang-up (no busy loop, no closed descriptor left in the loop, whose
    number the next connections reuse), and the requests after it are served."""
    database = Database(DatabaseConfig(url=db_config.url, pool_min=1, pool_max=2,
                                       timeout=2.0))

    async def go() -> None:
        async with database.connection() as conn:
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            watch = conn._watch  # type: ignore[attr-defined]
        assert row is not None
        assert watch is not None
        assert watch.fd >= 0
        with psycopg.connect(db_config.url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))
        for _ in range(100):  # the loop sees the hang-up on the idle connection
            if watch.fd < 0:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the hung-up connection's socket is still watched")
        served = 0
        for _ in range(60):  # the broken one fails once (SYS/TEMP), then new ones serve
            try:
                assert await _pid(database) != row[0]
                served += 1
            except DatabaseUnavailable:
                await asyncio.sleep(0.05)
            if served == 5:
                break
        assert served == 5
        await database.close()

    _run(loop_kind, go())


@LOOPS
def test_a_statement_cut_short_leaves_a_usable_connection(
    db_config: DatabaseConfig, loop_kind: str
) -> None:
    """A request that times out mid-statement is DatabaseUnavailable; the query is
    cancelled in the server and the same connection serves the next request."""
    database = Database(DatabaseConfig(url=db_config.url, pool_min=1, pool_max=1,
                                       timeout=0.3))

    async def go() -> None:
        first = await _pid(database)
        with pytest.raises(DatabaseUnavailable):
            await _pid(database, 3.0)
        assert await _pid(database) == first
        await database.close()

    _run(loop_kind, go())


def test_a_pooled_connection_keeps_a_cursor_per_query(db_config: DatabaseConfig) -> None:
    """cursor_for: the same cursor for the same query on a lent connection (its
    adapters and transformer kept), another for another query, each giving its own
    rows; an unpooled connection gets a fresh cursor."""
    database = Database(DatabaseConfig(url=db_config.url, pool_min=1, pool_max=1,
                                       timeout=5.0))
    one, two = "SELECT %s::int + 1", "SELECT %s::text || 'x'"

    async def go() -> None:
        seen = []
        for i in range(3):
            async with database.connection() as conn:
                cur = await cursor_for(conn, one).execute(one, (i,))
                assert await cur.fetchone() == (i + 1,)
                other = await cursor_for(conn, two).execute(two, (str(i),))
                assert await other.fetchone() == (f"{i}x",)
                seen.append((cur, other))
        assert all(pair == seen[0] for pair in seen)
        assert seen[0][0] is not seen[0][1]
        await database.close()
        unpooled = Database(db_config, pooled=False)
        async with unpooled.connection() as conn:
            assert cursor_for(conn, one) is not cursor_for(conn, one)

    asyncio.run(go())
