"""The PostgreSQL mail store (``[storage] backend = "postgresql"``), as DBMail keeps mail.

The schema is migrations/0001_initial.sql: ``mailboxes``, ``messages`` (one row per
message: its UIDL and wire size, fixed at delivery) and ``message_chunks`` (the stored
octets in rows of at most :data:`CHUNK_ROW`).

Rules of this module:

* **Login: one round trip.**  ``pop3d_leases`` takes the maildrop's cluster lease
  (:mod:`pop3d.cluster_lock`) and returns the listing (id, UIDL, size) from one
  index-only scan, in one call shared with the other sessions of the process opening or
  ending at that moment.  STAT, LIST and UIDL are answered from that listing.
* **RETR streams.**  A read fetches at most :data:`ROWS_PER_FETCH` chunk rows at a time
  (1 MiB), on a pooled connection given back between fetches, so neither a 1 GiB message
  nor a slow client holds memory or a connection.  Each fetch first checks the session
  still holds its lease.
* **Delivery: one transaction per message.**  A message that fits in one chunk row is
  stored by one statement (mailbox, message and chunk, with the quota check); a bigger
  one streams into ``message_chunks`` with ``COPY`` inside a transaction whose last
  statement sets the wire size and checks the quota.  A failure anywhere rolls it all
  back: nothing of the message is visible.
* **UPDATE: one transaction.**  ``pop3d_commit`` deletes the messages asked for, only
  while the session's lease is live in the database (fencing a node that lost it).
* The stored octets are the message as delivered (bare LF or CRLF, byte for byte);
  reads give the wire form (:class:`~pop3d.storage.wire.CrlfNormaliser`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Collection, Sequence
from typing import Any

import psycopg

from pop3d.cluster_lock import Lease, LeaseManager
from pop3d.database import Database
from pop3d.errors import (
    LocalProtocolError,
    MaildropLocked,
    MessageVanished,
    QuotaExceeded,
    TemporaryBackendError,
)
from pop3d.protocol import limits
from pop3d.protocol.values import MessageInfo, Principal
from pop3d.storage.base import MailboxStats
from pop3d.storage.quota import quota_for
from pop3d.storage.template import check_username
from pop3d.storage.wire import CrlfNormaliser, WireCounter

__all__ = ["CHUNK_ROW", "NoSuchMaildrop", "PostgresMaildrop", "PostgresStore", "new_uidl"]

log = logging.getLogger("pop3d.storage.postgresql")

#: Octets of one ``message_chunks`` row.
CHUNK_ROW = 256 * 1024
#: Chunk rows one read fetches (so at most 1 MiB in memory).
ROWS_PER_FETCH = 4

_NO_MAILDROP = "P3D01"
_IN_USE = "P3D02"
_LEASE_LOST = "P3D03"


class NoSuchMaildrop(TemporaryBackendError):
    """The user has no maildrop (nothing delivered yet, not added by ``pop3d user``)."""

    #: Read by ``pop3d mailbox stat``: an absent maildrop is empty, not an error.
    missing_maildrop = True


def new_uidl() -> str:
    """A fresh UIDL: ``P`` and 20 random base-32 characters (0x21-0x7E, unique per box)."""
    return "P" + secrets.token_hex(10)


def _raise_for(exc: psycopg.Error) -> None:
    """Turn the schema's own SQLSTATEs into the store's errors; re-raise any other."""
    state = getattr(exc, "sqlstate", None)
    if state == _NO_MAILDROP:
        raise NoSuchMaildrop("no such maildrop") from None
    if state == _IN_USE:
        raise MaildropLocked("maildrop in use") from None
    if state == _LEASE_LOST:
        raise TemporaryBackendError("maildrop lease lost") from None
    if isinstance(exc, psycopg.errors.CheckViolation | psycopg.errors.UniqueViolation):
        raise TemporaryBackendError(f"refused by the database: {type(exc).__name__}") from None
    raise exc  # the database layer logs it (once) and makes it TemporaryBackendError


class PostgresStore:
    """A :class:`~pop3d.storage.base.MailStore`, Deliverer and MailboxInspector in SQL."""

    def __init__(
        self,
        database: Database,
        leases: LeaseManager,
        *,
        quota: int | None = None,
        chunk_size: int = limits.READ_CHUNK,
    ) -> None:
        self.database = database
        self.leases = leases
        self.quota = quota
        self.chunk_size = chunk_size

    async def open(self, principal: Principal) -> PostgresMaildrop:
        """Lease and list the maildrop in one round trip.

        Raises:
            MaildropLocked: another session (on any node) holds it.
            TemporaryBackendError: it does not exist, the name is unsafe, or the
                database is unavailable.

        """
        name = principal.username
        check_username(name)
        try:
            lease, rows = await self.leases.open(name)
        except LookupError:
            raise NoSuchMaildrop("no such maildrop") from None
        return PostgresMaildrop(self, lease, rows)

    async def stat(self, principal: Principal) -> MailboxStats:
        """Count, wire size and oldest arrival, without the lease."""
        check_username(principal.username)
        async with self.database.connection() as conn:
            cur = await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM mailboxes WHERE name = %(n)s), count(*), "
                "coalesce(sum(size), 0), extract(epoch FROM min(received)) "
                "FROM messages WHERE mailbox = %(n)s",
                {"n": principal.username},
            )
            row = await cur.fetchone()
        if row is None or not row[0]:
            raise NoSuchMaildrop("no such maildrop")
        return MailboxStats(int(row[1]), int(row[2]), None if row[3] is None else float(row[3]))

    async def create(self, username: str) -> bool:
        """Create ``username``'s empty maildrop; whether it was new."""
        check_username(username)
        async with self.database.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO mailboxes (name) VALUES (%s) ON CONFLICT DO NOTHING RETURNING 1",
                (username,),
            )
            return await cur.fetchone() is not None

    async def deliver(
        self,
        principal: Principal,
        message: AsyncIterable[bytes],
        *,
        uidl: str | None = None,
    ) -> None:
        """Store one message in one transaction (creating the maildrop).

        ``uidl`` keeps a message's UIDL (``pop3d import``); a message of that UIDL
        already in the maildrop is left alone (the import is idempotent).

        Raises:
            QuotaExceeded: it would not fit in the user's quota.
            TemporaryBackendError: the database is unavailable or refused it.

        """
        name = principal.username
        check_username(name)
        limit = quota_for(principal.attributes, self.quota)
        iterator = aiter(message)
        buffered = bytearray()
        counter = WireCounter()
        done = False
        while len(buffered) <= CHUNK_ROW:
            try:
                piece = await anext(iterator)
            except StopAsyncIteration:
                done = True
                break
            buffered += piece
        if done:  # the whole message fits in one row: one statement
            counter.feed(bytes(buffered))
            await self._deliver_small(name, bytes(buffered), counter.wire_size, limit, uidl)
            return
        async with self.database.long_connection() as conn:
            try:
                async with conn.transaction():
                    await self._deliver_big(conn, name=name, first=buffered, rest=iterator,
                                            limit=limit, uidl=uidl)
            except psycopg.Error as exc:
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.UNKNOWN:
                    raise
                _raise_for(exc)

    async def _deliver_small(
        self, name: str, data: bytes, size: int, limit: int | None, uidl: str | None
    ) -> None:
        async with self.database.connection() as conn:
            try:
                cur = await conn.execute(
                    """
                    WITH box AS (
                        INSERT INTO mailboxes (name) VALUES (%(n)s) ON CONFLICT DO NOTHING
                    ), msg AS (
                        INSERT INTO messages (mailbox, uidl, size, stored_size)
                        SELECT %(n)s, %(u)s, %(size)s, %(stored)s
                        WHERE %(limit)s::bigint IS NULL
                           OR (SELECT coalesce(sum(size), 0) FROM messages
                               WHERE mailbox = %(n)s) + %(size)s <= %(limit)s::bigint
                        ON CONFLICT (mailbox, uidl) DO NOTHING
                        RETURNING id
                    ), chunk AS (
                        INSERT INTO message_chunks (message, seq, data)
                        SELECT id, 0, %(data)s FROM msg
                    )
                    SELECT (SELECT count(*) FROM msg),
                           EXISTS (SELECT 1 FROM messages WHERE mailbox = %(n)s
                                   AND uidl = %(u)s)
                    """,
                    {"n": name, "u": uidl or new_uidl(), "size": size, "stored": len(data),
                     "limit": limit, "data": data},
                )
                row = await cur.fetchone()
            except psycopg.Error as exc:
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.UNKNOWN:
                    raise
                _raise_for(exc)
                return
        if row is not None and not row[0] and not row[1]:
            raise QuotaExceeded("mailbox is over quota")

    async def _deliver_big(
        self,
        conn: Any,
        *,
        name: str,
        first: bytearray,
        rest: AsyncIterator[bytes],
        limit: int | None,
        uidl: str | None,
    ) -> None:
        await conn.execute("INSERT INTO mailboxes (name) VALUES (%s) ON CONFLICT DO NOTHING",
                           (name,))
        wanted = uidl or new_uidl()
        cur = await conn.execute(
            "INSERT INTO messages (mailbox, uidl, size, stored_size) VALUES (%s, %s, 0, 0) "
            "ON CONFLICT (mailbox, uidl) DO NOTHING RETURNING id",
            (name, wanted),
        )
        row = await cur.fetchone()
        if row is None:
            return  # that UIDL is already there (an import run twice)
        message_id = int(row[0])
        counter = WireCounter()
        stored = 0
        seq = 0
        buffered = first
        async with conn.cursor().copy(
            "COPY message_chunks (message, seq, data) FROM STDIN"
        ) as copy:
            while True:
                while len(buffered) >= CHUNK_ROW:
                    piece = bytes(buffered[:CHUNK_ROW])
                    del buffered[:CHUNK_ROW]
                    counter.feed(piece)
                    stored += len(piece)
                    await copy.write_row((message_id, seq, piece))
                    seq += 1
                try:
                    buffered += await anext(rest)
                except StopAsyncIteration:
                    break
            if buffered or seq == 0:
                piece = bytes(buffered)
                counter.feed(piece)
                stored += len(piece)
                await copy.write_row((message_id, seq, piece))
        cur = await conn.execute(
            "UPDATE messages SET size = %(size)s, stored_size = %(stored)s WHERE id = %(id)s "
            "RETURNING %(limit)s::bigint IS NULL OR (SELECT coalesce(sum(size), 0) "
            "FROM messages WHERE mailbox = %(n)s AND id <> %(id)s) + %(size)s "
            "<= %(limit)s::bigint",
            {"size": counter.wire_size, "stored": stored, "id": message_id, "n": name,
             "limit": limit},
        )
        fits = await cur.fetchone()
        if fits is None or not fits[0]:
            raise QuotaExceeded("mailbox is over quota")


class PostgresMaildrop:
    """One session's leased maildrop in PostgreSQL."""

    def __init__(
        self, store: PostgresStore, lease: Lease, rows: list[tuple[int, str, int]]
    ) -> None:
        self._store = store
        self._lease = lease
        self._listing = [MessageInfo(uid, size) for _, uid, size in rows]
        self._ids = {uid: (message_id, size) for message_id, uid, size in rows}
        self._closed = False

    def listing(self) -> Sequence[MessageInfo]:
        """The messages as they were at login."""
        return self._listing

    def read(self, uid: str) -> AsyncIterator[bytes]:
        """Stream the message's wire form, :data:`ROWS_PER_FETCH` rows at a time."""
        self._check_open()
        if uid not in self._ids:
            raise MessageVanished("no such message")
        return self._read(*self._ids[uid])

    async def _read(self, message_id: int, size: int) -> AsyncIterator[bytes]:
        normaliser = CrlfNormaliser()
        step = self._store.chunk_size
        seq = 0
        sent = 0
        while True:
            self._lease.check()
            async with self._store.database.connection() as conn:
                cur = await conn.execute(
                    "SELECT seq, data FROM message_chunks WHERE message = %s AND seq >= %s "
                    "ORDER BY seq LIMIT %s",
                    (message_id, seq, ROWS_PER_FETCH),
                )
                rows = await cur.fetchall()
            if not rows and seq == 0:
                raise MessageVanished("message removed")
            for row_seq, data in rows:
                seq = int(row_seq) + 1
                view = memoryview(data)
                for start in range(0, len(view), step):
                    out = normaliser.feed(bytes(view[start : start + step]))
                    if out:
                        sent += len(out)
                        yield out
            if len(rows) < ROWS_PER_FETCH:
                break
        tail = normaliser.finish()
        if tail:
            sent += len(tail)
            yield tail
        if sent != size:
            raise MessageVanished("message removed while it was read")

    def still_held(self) -> bool:
        """Whether the session's lease still holds (:class:`~pop3d.storage.base.Fenced`)."""
        return self._lease.valid()

    async def commit(self, deleted: Collection[str]) -> None:
        """Delete the messages in one transaction, fenced by the session's lease."""
        self._check_open()
        ids = [self._ids[uid][0] for uid in deleted if uid in self._ids]
        if not ids:
            return
        self._lease.check()
        async with self._store.database.connection() as conn:
            try:
                await conn.execute(
                    "SELECT pop3d_commit(%s, %s, %s)",
                    (self._lease.mailbox, self._lease.owner, ids),
                )
            except psycopg.Error as exc:
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.UNKNOWN:
                    raise
                _raise_for(exc)

    async def close(self) -> None:
        """Release the lease; changes nothing."""
        if self._closed:
            return
        self._closed = True
        await self._store.leases.release(self._lease)

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError("maildrop used after close")
