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
* **The socket stays watched.**  psycopg's own wait adds the connection's socket to the
  event loop and removes it again at every wait, with a timer each time: two
  ``epoll_ctl`` calls and a timer per statement.  A pooled connection here
  (:class:`_Connection`) registers a duplicate of its socket once and keeps it while the
  connection is lent; the duplicate is ours alone, so libpq closing its socket (a lost
  connection) can never leave a closed or reused descriptor in the loop.  Data that
  arrives while no statement waits (the server hanging up an idle connection) drops the
  registration; the next statement makes a new one.
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
import os
import select
import time
from collections.abc import AsyncIterator, Generator
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg.waiting import READY_R, READY_W, WAIT_R, WAIT_W

from pop3d.config import DatabaseConfig
from pop3d.errors import TemporaryBackendError

__all__ = ["Database", "DatabaseUnavailable", "cursor_for"]

log = logging.getLogger("pop3d.database")



#: Seconds a connection stays lent from the pool before it is given back.
_LEND_FOR = 60.0

_OK = psycopg.pq.ConnStatus.OK
_IDLE = psycopg.pq.TransactionStatus.IDLE

#: SQLSTATEs of a missing table or function: the schema was not created.
_NO_SCHEMA = frozenset({"42P01", "42883"})


_RV = TypeVar("_RV")
_ACTIVE = psycopg.pq.TransactionStatus.ACTIVE
_INTERRUPTED = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)


class _Watch:
    """A duplicate of a connection's socket, registered with one loop for reading."""

    __slots__ = ("fd", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, socket: int) -> None:
        self.loop = loop
        self.fd = os.dup(socket)
        self.waiter: asyncio.Future[None] | None = None
        try:
            loop.add_reader(self.fd, self._readable)
        except BaseException:
            os.close(self.fd)
            raise

    def _readable(self) -> None:
        waiter = self.waiter
        if waiter is None:  # nothing expected: the server hung up, or a notice; re-made
            self.close()    # by the next wait (a readable socket would call us forever)
        elif not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Unregister and close the duplicate (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            if not self.loop.is_closed():
                self.loop.remove_reader(fd)
        finally:
            os.close(fd)
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)  # its wait sees the socket itself


def _ready_now(fd: int, wait: int) -> int:
    """The socket's readiness for ``wait`` right now (a zero-timeout poll)."""
    poller = select.poll()
    poller.register(fd, (select.POLLIN if wait & WAIT_R else 0)
                    | (select.POLLOUT if wait & WAIT_W else 0))
    ready = 0
    for _, events in poller.poll(0):
        if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
            ready |= READY_R
        if events & select.POLLOUT:
            ready |= READY_W
    return ready


class _Connection(psycopg.AsyncConnection[Any]):
    """A pooled connection whose socket stays registered with the loop between waits."""

    _watch: _Watch | None = None
    _cursors: dict[str, psycopg.AsyncCursor[Any]] | None = None

    def cursor_for(self, query: str) -> psycopg.AsyncCursor[Any]:
        """The cursor kept for ``query`` on this connection (see :func:`cursor_for`)."""
        cursors = self._cursors
        if cursors is None:
            cursors = self._cursors = {}
        cur = cursors.get(query)
        if cur is None:
            if len(cursors) >= _CURSORS:
                cursors.clear()
            cur = cursors[query] = self.cursor()
        return cur

    async def wait(self, gen: Generator[Any, Any, _RV], interval: float = 0.1,
                   timeout: float | None = None) -> _RV:  # noqa: ASYNC109 (psycopg's)
        """Wait as psycopg does, on the kept registration (a bounded wait: psycopg's own)."""
        if timeout is not None:
            return await super().wait(gen, interval, timeout)
        try:
            return await self._wait_watched(gen)
        except _INTERRUPTED:
            # As psycopg: cancel the query in the server and drain its answer, so that
            # the connection is idle and reusable; else it is closed.
            if self.pgconn.transaction_status == _ACTIVE:
                try:
                    await self.cancel_safe(timeout=5.0)
                    await super().wait(gen, interval, 5.0)
                except psycopg.errors.QueryCanceled:
                    pass
                except BaseException:  # interrupted again, or timed out
                    self.unwatch()
                    self.pgconn.finish()
            raise

    async def _wait_watched(self, gen: Generator[Any, Any, _RV]) -> _RV:
        try:
            wait = next(gen)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        loop = asyncio.get_running_loop()
        fd = self.pgconn.socket
        try:
            while True:
                ready = _ready_now(fd, wait) if wait & WAIT_W else 0
                if not ready and wait & WAIT_W:  # a full send buffer (a big COPY): rare
                    ready = await self._wait_once(loop, fd, wait)
                elif not ready:
                    watch = self._watch
                    if watch is None or watch.fd < 0 or watch.loop is not loop:
                        if watch is not None:
                            watch.close()
                        watch = self._watch = _Watch(loop, fd)
                    waiter = watch.waiter = loop.create_future()
                    try:
                        await waiter
                    finally:
                        watch.waiter = None
                    ready = READY_R
                wait = gen.send(ready)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        except OSError as exc:
            raise psycopg.OperationalError("connection socket closed") from exc
        finally:
            if self.pgconn.status != _OK:  # lost: libpq may have closed its socket
                self.unwatch()

    @staticmethod
    async def _wait_once(loop: asyncio.AbstractEventLoop, fd: int, wait: int) -> int:
        """Register ``fd`` for this wait only, as psycopg does."""
        waiter: asyncio.Future[int] = loop.create_future()

        def wake(state: int) -> None:
            if not waiter.done():
                waiter.set_result(state)

        if wait & WAIT_R:
            loop.add_reader(fd, wake, READY_R)
        loop.add_writer(fd, wake, READY_W)
        try:
            return await waiter
        finally:
            if wait & WAIT_R:
                loop.remove_reader(fd)
            loop.remove_writer(fd)

    def unwatch(self) -> None:
        """Drop the kept registration (before the pool takes the connection back)."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    async def close(self) -> None:
        """Unwatch, then close."""
        self.unwatch()
        self._cursors = None
        await super().close()


#: Kept cursors per connection (a few statements run on the login path).
_CURSORS = 16


def cursor_for(conn: psycopg.AsyncConnection[Any], query: str) -> psycopg.AsyncCursor[Any]:
    """A cursor to run ``query`` on: kept per pooled connection and query.

    psycopg gives every new cursor its own adapters map and parameter/row transformer,
    whose caches (which dumper for a ``str``, which loader for a ``text`` column) a
    one-statement cursor fills for nothing; a cursor that runs the very same query
    again keeps its transformer.  ``query`` must be the same string object each time
    (a constant), and the connection used by one request at a time (as lent here).
    """
    if isinstance(conn, _Connection):
        return conn.cursor_for(query)
    return conn.cursor()


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
            for conn in self._lent:
                if isinstance(conn, _Connection):
                    conn.unwatch()
            self._lent, self._idle, self._waiters = {}, [], collections.deque()
            self._pool = psycopg_pool.AsyncConnectionPool(
                self.config.url,
                kwargs=self._kwargs,
                connection_class=_Connection,
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
        if isinstance(conn, _Connection):
            conn.unwatch()
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
                if isinstance(conn, _Connection):
                    conn.unwatch()
                await pool.putconn(conn)
            await pool.close(timeout=1)
