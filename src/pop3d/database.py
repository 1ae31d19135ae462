"""The PostgreSQL connection of a pop3d process: a pool, timeouts, and one error type.

Everything that talks to PostgreSQL (:mod:`pop3d.auth.sql`, :mod:`pop3d.storage.postgresql`,
:mod:`pop3d.cluster_lock`, ``pop3d db``/``user``/``import``) gets its connections here.

Rules of this module:

* **One error type out.**  A database that is down, unreachable, restarting, too slow
  (past ``[database] timeout``) or out of connections raises
  :class:`~pop3d.errors.TemporaryBackendError`, which the session answers
  ``-ERR [SYS/TEMP]`` (no auth penalty: it is not a refusal), LMTP ``451 4.3.0`` and
  ``pop3d deliver`` 75.  Nothing here logs a query's parameters (they hold user names
  and password hashes).
* **Recovery is the pool's.**  ``psycopg_pool`` throws away a connection returned in a
  broken state and opens new ones in the background, retrying with back-off; when the
  server comes back, the next request gets a working connection.  No check query is
  spent per request (that would be one more round trip per login).
* **A statement does not pay for the pool.**  A connection the pool lent stays lent
  while it works: given back by a statement, it waits in a short stack here for the
  next one (no pool lock, no pool bookkeeping, no ``async with`` of the connection).
  A request finding none idle asks the pool for one more (up to ``pool_max`` lent),
  else waits for the next given back.  A connection goes back to the pool when it is not
  idle and healthy (the pool repairs or replaces it), and after :data:`_LEND_FOR`
  seconds (so the pool's own ageing and shrinking still apply).
* **Autocommit.**  A single statement is its own transaction; the few multi-statement
  transactions (a delivery) say so with ``conn.transaction()``.
* **Loops.**  A pool belongs to the event loop that opened it.  Short-lived commands and
  the tests' ``asyncio.run`` per call use ``pooled=False``: a connection per request,
  closed at once, so that nothing outlives its loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import psycopg_pool

from pop3d.config import DatabaseConfig
from pop3d.errors import TemporaryBackendError

__all__ = ["Database", "DatabaseUnavailable"]

log = logging.getLogger("pop3d.database")



#: Seconds a connection stays lent from the pool before it is given back.
_LEND_FOR = 60.0

_OK = psycopg.pq.ConnStatus.OK
_IDLE = psycopg.pq.TransactionStatus.IDLE

#: SQLSTATEs of a missing table or function: the schema was not created.
_NO_SCHEMA = frozenset({"42P01", "42883"})


class DatabaseUnavailable(TemporaryBackendError):
    """PostgreSQL could not answer in time (down, unreachable, overloaded)."""


#: What psycopg raises when the server is away or the query was cut short.
_TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout,
              psycopg.errors.QueryCanceled, TimeoutError, OSError)


class Database:
    """Connections to ``[database] url`` for one process."""

    def __init__(self, config: DatabaseConfig, *, pooled: bool = True) -> None:
        self.config = config
        self.pooled = pooled
        self._pool: psycopg_pool.AsyncConnectionPool[Any] | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        # statement_timeout bounds a query on the server side as well, so a slow query
        # does not keep running after we gave up on it.
        ms = int(config.timeout * 1000)
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, int(config.timeout)),
            "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
            "prepare_threshold": 0,  # the login queries are prepared on first use
        }
        self._logged_down = False
        self._refusals: set[str | None] = set()
        #: Connections lent by the pool, each with when it was lent.
        self._lent: dict[psycopg.AsyncConnection[Any], float] = {}
        #: Those of them idle, the most recently used last.
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        #: Requests asking the pool for a loan now.
        self._borrowing = 0
        #: Requests waiting for a lent connection to be given back, first come first.
        self._waiters: collections.deque[
            asyncio.Future[psycopg.AsyncConnection[Any] | None]] = collections.deque()

    async def _get_pool(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool_loop is not loop:
            self._pool_loop = loop
            # The old loop's connections are left behind with its pool.
            self._lent, self._idle, self._waiters = {}, [], collections.deque()
            self._pool = psycopg_pool.AsyncConnectionPool(
                self.config.url,
                kwargs=self._kwargs,
                min_size=self.config.pool_min,
                max_size=self.config.pool_max,
                timeout=self.config.timeout,
                open=False,
                name="pop3d",
            )
            await self._pool.open(wait=False)
        return self._pool

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection for one request; any database failure becomes DatabaseUnavailable.

        The whole use of the connection is bounded by ``[database] timeout``.
        """
        try:
            async with asyncio.timeout(self.config.timeout):
                if self.pooled:
                    conn = await self._borrow()
                    try:
                        yield conn
                    finally:
                        await self._give_back(conn)
                else:
                    conn = await psycopg.AsyncConnection.connect(self.config.url, **self._kwargs)
                    async with conn:
                        yield conn
        except _TRANSIENT as exc:
            if not self._logged_down:
                self._logged_down = True
                log.error("database unavailable: %s", type(exc).__name__)  # noqa: TRY400
            raise DatabaseUnavailable("database unavailable") from exc
        except psycopg.Error as exc:  # refused by the server: a schema or query mistake
            self._refused(exc)
            raise TemporaryBackendError(f"database error {exc.sqlstate}") from None
        else:
            if self._logged_down:
                self._logged_down = False
                log.warning("database available again")

    async def _borrow(self) -> psycopg.AsyncConnection[Any]:
        """An idle lent connection, else a new loan from the pool, else the next one.

        The next one: given back by another request, first come first served.  Every
        wait is bounded by the caller's deadline.
        """
        pool = await self._get_pool()
        while True:
            if self._idle:
                return self._idle.pop()
            if len(self._lent) + self._borrowing < self.config.pool_max:
                self._borrowing += 1
                try:
                    conn: psycopg.AsyncConnection[Any] = await pool.getconn()
                except BaseException:
                    self._wake_one()  # the loan it would have had is free again
                    raise
                finally:
                    self._borrowing -= 1
                self._lent[conn] = time.monotonic()
                return conn
            turn: asyncio.Future[psycopg.AsyncConnection[Any] | None] = \
                asyncio.get_running_loop().create_future()
            self._waiters.append(turn)
            try:
                handed = await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # served as it gave up: pass on
                    given = turn.result()
                    if given is None:
                        self._wake_one()
                    else:
                        self._pass_on(given)
                raise
            if handed is not None:
                return handed
            # None: a loan ended, so the pool may lend again; try anew

    def _wake_one(self) -> None:
        """Tell the first waiter to ask the pool itself."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return

    def _pass_on(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Hand a healthy lent connection to the first waiter, else keep it idle."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(conn)
                return
        self._idle.append(conn)

    async def _give_back(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Keep ``conn`` for the next statement, or return it to the pool."""
        pool = self._pool
        lent = self._lent.get(conn)
        if lent is None or pool is None:  # lent by a pool since closed or replaced
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()
            return
        pgconn = conn.pgconn
        if (pgconn.status == _OK and pgconn.transaction_status == _IDLE
                and time.monotonic() - lent < _LEND_FOR):
            self._pass_on(conn)
            idle = self._idle
            if not idle or time.monotonic() - self._lent[idle[0]] < _LEND_FOR:
                return
            conn = idle.pop(0)  # the least used, lent long ago: let the pool age it
        del self._lent[conn]
        try:
            await pool.putconn(conn)  # the pool repairs, replaces or keeps it
        finally:
            self._wake_one()  # the pool may lend again

    def _refused(self, exc: psycopg.Error) -> None:
        """Log a refused statement once per SQLSTATE (never its parameters)."""
        if exc.sqlstate not in self._refusals:
            self._refusals.add(exc.sqlstate)
            hint = " (has `pop3d db init` been run?)" if exc.sqlstate in _NO_SCHEMA else ""
            log.error("database refused a statement: SQLSTATE %s %s%s", exc.sqlstate,
                      type(exc).__name__, hint)

    @contextlib.asynccontextmanager
    async def long_connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection without the overall deadline (a delivery streaming a big message).

        Each statement is still bounded by ``statement_timeout``.
        """
        try:
            if self.pooled:
                pool = await self._get_pool()
                async with pool.connection(timeout=self.config.timeout) as conn:
                    yield conn
            else:
                async with asyncio.timeout(self.config.timeout):
                    conn = await psycopg.AsyncConnection.connect(self.config.url, **self._kwargs)
                async with conn:
                    yield conn
        except _TRANSIENT as exc:
            raise DatabaseUnavailable("database unavailable") from exc
        except psycopg.Error as exc:
            self._refused(exc)
            raise TemporaryBackendError(f"database error {exc.sqlstate}") from None

    async def close(self) -> None:
        """Close the pool (at shutdown)."""
        pool, self._pool = self._pool, None
        idle, self._idle, self._lent = self._idle, [], {}
        if pool is not None and self._pool_loop is asyncio.get_running_loop():
            for conn in idle:
                await pool.putconn(conn)
            await pool.close(timeout=1)
