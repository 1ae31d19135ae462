"""The cluster-wide maildrop lock: a lease row in PostgreSQL, renewed by a heartbeat.

Several pop3d nodes serve the same maildrops; a session must be alone in its maildrop on
every node, not just on one host (``flock`` is per kernel).  ``[storage] lock =
"postgresql"`` (the default when ``[database]`` is set) takes a *lease*: a row of
``maildrop_leases`` naming the session (``owner``), the process holding it (``node``)
and when it ends (``expires``, on the database's clock only).

Why a lease row and not a session-level advisory lock: an advisory lock lives on one
connection, so each node would pin a connection for all its sessions and serialise every
login through it, and the lock could not be taken in the same statement as the listing.
A lease row is taken by any pooled connection, in the login's second round trip
(``pop3d_leases`` leases and lists in one call, see migrations/0002_lease_batches.sql;
the opens and releases of all the sessions of a process waiting at one moment share one
such call).

The rules:

* **Taken** with ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expires < now``: a live
  lease of another session refuses (``-ERR [IN-USE]``); an expired one is taken over.
* **Released** at the end of the session (QUIT, a timeout, a closed connection), by
  deleting the row, before the QUIT is answered.  The sessions that end while one release
  statement is on its way share the next one: under load a QUIT costs a fraction of a
  round trip.
* **Renewed** by one ``UPDATE ... WHERE node = me`` per process every ``ttl / 3``
  seconds, whatever the number of sessions.
* **Dies with the node** within ``ttl``: a process killed with SIGKILL renews nothing,
  and its leases expire ``ttl`` after their last renewal; the next login takes them over.
* **A node cut off** from the database cannot renew: each lease counts as lost locally
  once ``ttl`` has passed since the *start* of its last successful renewal -- never after
  the database's expiry, which is ``ttl`` after that renewal *committed*.  A session whose
  lease is lost stops: its next command is answered ``-ERR [SYS/TEMP]`` and the
  connection closes without UPDATE (the maildrops are :class:`~pop3d.storage.base.Fenced`:
  the connection asks :meth:`Lease.valid` before each batch of commands); a read or an
  UPDATE already running is refused (nothing deleted).  The PostgreSQL store also
  fences in the database: ``pop3d_commit`` deletes only while the session's lease is
  live there, under a row lock.
* Maildir on storage shared by all nodes is wrapped by :class:`LeasedStore`: the lease
  first, then the Maildir's own open (and its local lock); UPDATE renews the lease in the
  database (proving it is still held, for ``ttl`` more seconds) before touching a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from pop3d.database import Database, cursor_for
from pop3d.errors import LocalProtocolError, MaildropLocked, TemporaryBackendError
from pop3d.protocol.values import MessageInfo, Principal
from pop3d.storage.base import MailboxStats, Maildrop
from pop3d.storage.template import check_username

__all__ = ["Lease", "LeaseLost", "LeaseManager", "LeasedStore"]

log = logging.getLogger("pop3d.cluster_lock")


def _own(shared: BaseException) -> BaseException:
    """A fresh exception for one of the sessions that a shared statement failed.

    One instance raised in several tasks would pile up their tracebacks.
    """
    own: BaseException
    if isinstance(shared, TemporaryBackendError):
        try:
            own = type(shared)(*shared.args)
        except TypeError:
            own = TemporaryBackendError(str(shared))
    else:
        own = RuntimeError(f"lease statement failed: {type(shared).__name__}")
    own.__cause__ = shared
    return own


#: The shared lease statement: releases, then opens with their listings (migration 0002).
_LEASES = "SELECT k, status, id, uidl, size FROM pop3d_leases(%s, %s, %s, %s, %s, %s)"
#: Releases alone.
_RELEASE = ("DELETE FROM maildrop_leases AS l USING unnest(%s::text[], %s::text[]) "
            "AS r (mailbox, owner) WHERE l.mailbox = r.mailbox AND l.owner = r.owner")


class LeaseLost(TemporaryBackendError):
    """The session's maildrop lease expired or was taken: it may not read or UPDATE."""


@dataclass(eq=False)
class Lease:
    """One session's hold on one maildrop."""

    mailbox: str
    owner: str
    #: time.monotonic() after which this process no longer counts on the lease.
    deadline: float
    #: time.monotonic() when the database's grant had arrived (it was committed by then).
    granted: float = field(default_factory=time.monotonic)
    lost: bool = False
    released: bool = False

    def valid(self) -> bool:
        """Whether the session may still act on its maildrop."""
        return not self.lost and not self.released and time.monotonic() < self.deadline

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless :meth:`valid`."""
        if not self.valid():
            self.lost = True
            raise LeaseLost("maildrop lease lost")


@dataclass
class LeaseManager:
    """The leases of one pop3d process, and the heartbeat that renews them."""

    database: Database
    ttl: float
    #: Names this process in ``maildrop_leases.node``: host, pid and a random part.
    node: str = field(
        default_factory=lambda: f"{socket.gethostname()[:40]}:{os.getpid()}:"
        f"{secrets.token_hex(4)}"
    )
    _held: dict[str, Lease] = field(default_factory=dict)
    _serial: itertools.count[int] = field(default_factory=itertools.count)
    _heartbeat: asyncio.Task[None] | None = None
    _heartbeat_loop: asyncio.AbstractEventLoop | None = None
    #: Leases waiting for the next batch to release them, with what their callers await
    #: (None: no one awaits, an open abandoned by its session).
    _releasing: list[tuple[str, str, asyncio.Future[BaseException | None] | None]] = field(
        default_factory=list)
    #: Maildrops waiting for the next batch to lease and list them (:meth:`open`).
    _opening: list[tuple[str, str, asyncio.Future[Any]]] = field(default_factory=list)
    _batcher: asyncio.Task[None] | None = None
    _batcher_loop: asyncio.AbstractEventLoop | None = None

    def new_owner(self) -> str:
        """A fresh owner name for one session."""
        return f"{self.node}/{next(self._serial)}"

    def held(self, mailbox: str, owner: str, started: float) -> Lease:
        """Record a lease the database granted to a request sent at ``started``."""
        lease = Lease(mailbox, owner, started + self.ttl)
        self._held[owner] = lease
        self._ensure_heartbeat()
        return lease

    async def acquire(self, mailbox: str) -> Lease:
        """Take the lease of ``mailbox`` (one round trip).

        Raises:
            MaildropLocked: a live lease of another session holds it.
            TemporaryBackendError: the database is unavailable.

        """
        owner = self.new_owner()
        started = time.monotonic()
        async with self.database.connection() as conn:
            cur = await conn.execute(
                "SELECT pop3d_lease(%s, %s, %s, %s)", (mailbox, owner, self.node, self.ttl)
            )
            row = await cur.fetchone()
        if not row or not row[0]:
            raise MaildropLocked("maildrop in use on another node")
        return self.held(mailbox, owner, started)

    async def open(self, mailbox: str) -> tuple[Lease, list[tuple[int, str, int]]]:
        """Lease ``mailbox`` and list its messages (id, UIDL, size) in one round trip.

        The sessions of this process that open or end while one lease statement is on
        its way share the next one (``pop3d_leases``, migration 0002): under load a login
        costs a fraction of a statement here, and alone exactly one.

        Raises:
            MaildropLocked: a live lease of another session holds it.
            LookupError: the maildrop does not exist.
            TemporaryBackendError: the database is unavailable.

        """
        owner = self.new_owner()
        started = time.monotonic()
        answer = self._loop_queue().create_future()
        self._opening.append((mailbox, owner, answer))
        self._kick()
        try:
            result = await asyncio.shield(answer)
        except asyncio.CancelledError:  # the session went: give back what it may get
            answer.add_done_callback(lambda done: self._abandoned(mailbox, owner, done))
            raise
        if isinstance(result, BaseException):
            raise _own(result)
        status, rows = result
        if status == 1:
            raise LookupError("no such maildrop")
        if status == 2:
            raise MaildropLocked("maildrop in use")
        return self.held(mailbox, owner, started), rows

    def _abandoned(self, mailbox: str, owner: str, done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            return
        result = done.result()
        if isinstance(result, tuple) and result[0] == 0:
            self._releasing.append((mailbox, owner, None))
            self._kick()

    async def release(self, lease: Lease) -> None:
        """Give the lease back; return once it is deleted, or failed to be (then it expires).

        Releases share the lease statements of :meth:`open` (one round trip for all the
        sessions that end together); the QUIT is answered after it.
        """
        if lease.released:
            return
        lease.released = True
        self._held.pop(lease.owner, None)
        done: asyncio.Future[BaseException | None] = self._loop_queue().create_future()
        self._releasing.append((lease.mailbox, lease.owner, done))
        self._kick()
        failure = await asyncio.shield(done)
        if isinstance(failure, TemporaryBackendError):
            log.warning("lease of %s not released (database unavailable); it expires "
                        "within %.0f s", lease.mailbox, self.ttl)
        elif failure is not None:
            raise _own(failure)

    def _loop_queue(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._batcher_loop is not loop:  # a new loop (tests): the old one's queue goes
            self._batcher_loop, self._batcher = loop, None
            self._releasing, self._opening = [], []
        return loop

    def _kick(self) -> None:
        if self._batcher is None or self._batcher.done():
            loop = asyncio.get_running_loop()
            self._batcher = loop.create_task(self._batches(), name="pop3d-leases")

    async def _batches(self) -> None:
        """Send the waiting opens and releases, all in one statement, until none wait."""
        while self._releasing or self._opening:
            frees, self._releasing = self._releasing, []
            opens, self._opening = self._opening, []
            failure: BaseException | None = TemporaryBackendError("lease statement cancelled")
            answers: dict[int, tuple[int, list[tuple[int, str, int]]]] = {}
            try:
                async with self.database.connection() as conn:
                    if opens:
                        cur = await cursor_for(conn, _LEASES).execute(
                            _LEASES,
                            ([m for m, _, _ in frees], [o for _, o, _ in frees],
                             [m for m, _, _ in opens], [o for _, o, _ in opens],
                             self.node, self.ttl),
                        )
                        for k, status, message_id, uidl, size in await cur.fetchall():
                            _, rows = answers.setdefault(int(k), (int(status), []))
                            if message_id is not None:
                                rows.append((int(message_id), str(uidl), int(size)))
                    else:
                        await cursor_for(conn, _RELEASE).execute(
                            _RELEASE,
                            ([m for m, _, _ in frees], [o for _, o, _ in frees]),
                        )
                failure = None
            except Exception as exc:  # each waiter reports it
                failure = exc
            finally:  # also when cancelled (loop shutdown): no waiter is left hanging
                for _, _, done in frees:
                    if done is not None and not done.done():
                        done.set_result(failure)
                for k, (_, _, answer) in enumerate(opens, 1):
                    if not answer.done():
                        answer.set_result(failure if failure is not None else answers.get(
                            k, TemporaryBackendError("no answer for the maildrop")))

    async def confirm(self, lease: Lease) -> None:
        """Renew ``lease`` in the database now, proving it is still held (before UPDATE).

        Raises:
            LeaseLost: it expired or another session took it.
            TemporaryBackendError: the database is unavailable.

        """
        lease.check()
        started = time.monotonic()
        async with self.database.connection() as conn:
            cur = await conn.execute(
                "UPDATE maildrop_leases SET expires = clock_timestamp() + "
                "make_interval(secs => %s) WHERE mailbox = %s AND owner = %s "
                "AND expires > clock_timestamp() RETURNING 1",
                (self.ttl, lease.mailbox, lease.owner),
            )
            row = await cur.fetchone()
        if row is None:
            lease.lost = True
            raise LeaseLost("maildrop lease lost")
        lease.deadline = started + self.ttl

    async def renew_all(self) -> None:
        """One heartbeat: renew every live lease of this node (one round trip)."""
        if not self._held:
            return
        started = time.monotonic()
        async with self.database.connection() as conn:
            cur = await conn.execute(
                "UPDATE maildrop_leases SET expires = clock_timestamp() + "
                "make_interval(secs => %s) WHERE node = %s AND expires > clock_timestamp() "
                "RETURNING owner",
                (self.ttl, self.node),
            )
            renewed = {r[0] for r in await cur.fetchall()}
        for owner, lease in list(self._held.items()):
            if owner in renewed:
                lease.deadline = max(lease.deadline, started + self.ttl)
            elif lease.granted < started:  # committed before this renewal began, yet gone
                lease.lost = True
                self._held.pop(owner, None)
                log.warning("lease of %s lost; its session may not UPDATE", lease.mailbox)

    def _ensure_heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        if self._heartbeat is not None and self._heartbeat_loop is loop \
                and not self._heartbeat.done():
            return
        self._heartbeat_loop = loop
        self._heartbeat = loop.create_task(self._beat(), name="pop3d-lease-heartbeat")

    async def _beat(self) -> None:
        interval = self.ttl / 3
        failing = False
        while self._held:
            await asyncio.sleep(interval)
            try:
                await self.renew_all()
            except TemporaryBackendError:
                if not failing:  # one line per outage
                    log.warning("lease heartbeat failed; leases lapse %.0f s after the "
                                "last renewal", self.ttl)
                failing = True
            except Exception:
                log.exception("lease heartbeat failed")
            else:
                failing = False

    async def close(self) -> None:
        """Stop the heartbeat and release every lease (at shutdown)."""
        task, self._heartbeat = self._heartbeat, None
        if task is not None and self._heartbeat_loop is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for lease in list(self._held.values()):
            await self.release(lease)


class LeasedMaildrop:
    """A maildrop of another store, held under a cluster lease."""

    def __init__(self, inner: Maildrop, lease: Lease, manager: LeaseManager) -> None:
        self._inner = inner
        self._lease = lease
        self._manager = manager
        self._closed = False

    def listing(self) -> Sequence[MessageInfo]:
        """The inner maildrop's listing."""
        return self._inner.listing()

    def still_held(self) -> bool:
        """Whether the session's lease still holds (:class:`~pop3d.storage.base.Fenced`)."""
        return self._lease.valid()

    def read(self, uid: str) -> AsyncIterator[bytes]:
        """The inner read, refused once the lease is lost."""
        if self._closed:
            raise LocalProtocolError("maildrop used after close")
        self._lease.check()
        return self._inner.read(uid)

    async def commit(self, deleted: Collection[str]) -> None:
        """Confirm the lease in the database, then the inner commit."""
        if self._closed:
            raise LocalProtocolError("maildrop used after close")
        await self._manager.confirm(self._lease)
        await self._inner.commit(deleted)

    async def close(self) -> None:
        """Close the inner maildrop, then release the lease."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._inner.close()
        finally:
            await self._manager.release(self._lease)


class LeasedStore:
    """A Maildir or mbox store on shared storage, locked cluster-wide by leases."""

    def __init__(self, inner: Any, manager: LeaseManager) -> None:
        self.inner = inner
        self.manager = manager

    async def open(self, principal: Principal) -> LeasedMaildrop:
        """Lease the maildrop, then open it (and take its local lock)."""
        check_username(principal.username)
        lease = await self.manager.acquire(principal.username)
        try:
            inner = await self.inner.open(principal)
        except BaseException:
            await self.manager.release(lease)
            raise
        return LeasedMaildrop(inner, lease, self.manager)

    async def deliver(self, principal: Principal, message: Any, **kwargs: Any) -> None:
        """Delivery takes no session lock: the inner store's."""
        await self.inner.deliver(principal, message, **kwargs)

    async def stat(self, principal: Principal) -> MailboxStats:
        """The inner store's totals."""
        stats: MailboxStats = await self.inner.stat(principal)
        return stats

    def path_for(self, username: str, home: str | None = None) -> Any:
        """The inner store's path of ``username``'s maildrop."""
        return self.inner.path_for(username, home)

    async def close(self) -> None:
        """Release every lease."""
        await self.manager.close()
