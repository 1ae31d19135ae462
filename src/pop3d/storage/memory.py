"""An in-memory mail store: the reference backend, for tests and embedding.

Rules of this file: the same contract as every backend (storage/base.py, checked by
tests/storage/contract.py), with nothing on disk:

* A user has a maildrop once :meth:`MemoryStore.create`, :meth:`MemoryStore.add` or a
  delivery made it; opening any other user is :class:`TemporaryBackendError`, as a
  missing Maildir is.  User names are checked as the file backends check them, so a
  test of a hostile name behaves the same on every backend.
* Messages are kept exactly as added; sizes and reads use the same wire form
  (:mod:`pop3d.storage.wire`) and the same chunking as the file backends.
* UIDs are ``m<n>`` from a per-store counter: stable for the life of the store.
* One session per user: a second :meth:`MemoryStore.open` raises :class:`MaildropLocked`
  until the first closes.  The listing is a snapshot; commit removes only listed
  messages that were asked for.
* Everything runs on the event loop: no thread, no I/O, nothing that blocks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterable, AsyncIterator, Collection, Sequence

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
from pop3d.storage.wire import CrlfNormaliser, wire_size

__all__ = ["MemoryMaildrop", "MemoryStore"]


class _Box:
    """One user's messages: uid -> (bytes, time added), in delivery order."""

    __slots__ = ("locked", "messages")

    def __init__(self) -> None:
        self.messages: dict[str, tuple[bytes, float]] = {}
        self.locked = False


class MemoryStore:
    """Maildrops held in memory: a ``MailStore``, ``Deliverer`` and ``MailboxInspector``.

    Args:
        quota: default quota in wire octets (``None``: unlimited); a user's record may
            override it (:mod:`pop3d.storage.quota`).
        chunk_size: raw octets per chunk yielded by :meth:`MemoryMaildrop.read`.

    """

    def __init__(
        self, *, quota: int | None = None, chunk_size: int = limits.READ_CHUNK
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.quota = quota
        self.chunk_size = chunk_size
        self._boxes: dict[str, _Box] = {}
        self._uids = itertools.count(1)

    # -------------------------------------------------------------- seeding and inspection

    def create(self, username: str) -> None:
        """Give ``username`` an empty maildrop (no-op if there is one).

        Raises:
            UnsafeUserName: the name is refused (as the file backends refuse it).

        """
        check_username(username)
        self._boxes.setdefault(username, _Box())

    def add(self, username: str, message: bytes) -> str:
        """Store ``message`` exactly as given for ``username``; return its UID.

        Raises:
            UnsafeUserName: the name is refused (as the file backends refuse it).

        """
        self.create(username)
        uid = f"m{next(self._uids)}"
        self._boxes[username].messages[uid] = (bytes(message), time.time())
        return uid

    def messages(self, username: str) -> dict[str, bytes]:
        """Return ``username``'s messages as stored, by UID, in delivery order."""
        box = self._boxes.get(username)
        return {} if box is None else {uid: m for uid, (m, _) in box.messages.items()}

    def remove(self, username: str, uid: str) -> None:
        """Remove a message behind the sessions' back (as another deleter would)."""
        box = self._boxes.get(username)
        if box is not None:
            box.messages.pop(uid, None)

    def is_locked(self, username: str) -> bool:
        """Tell whether a session holds ``username``'s maildrop."""
        box = self._boxes.get(username)
        return box is not None and box.locked

    # -------------------------------------------------------------- MailStore

    async def open(self, principal: Principal) -> MemoryMaildrop:
        """Lock the user's maildrop and snapshot its listing.

        Raises:
            MaildropLocked: another session holds it.
            TemporaryBackendError: the user has no maildrop, or the name is unsafe.

        """
        check_username(principal.username)
        box = self._boxes.get(principal.username)
        if box is None:
            raise TemporaryBackendError("maildrop unavailable")
        if box.locked:
            raise MaildropLocked("maildrop already locked")
        box.locked = True
        return MemoryMaildrop(box, self.chunk_size)

    # -------------------------------------------------------------- MailboxInspector

    async def stat(self, principal: Principal) -> MailboxStats:
        """Count the user's messages and wire octets without locking.

        Raises:
            TemporaryBackendError: the user has no maildrop, or the name is unsafe.

        """
        check_username(principal.username)
        box = self._boxes.get(principal.username)
        if box is None:
            raise TemporaryBackendError("maildrop unavailable")
        stored = list(box.messages.values())
        return MailboxStats(
            count=len(stored),
            size=sum(wire_size(m) for m, _ in stored),
            oldest=min((t for _, t in stored), default=None),
        )

    # -------------------------------------------------------------- Deliverer

    async def deliver(self, principal: Principal, message: AsyncIterable[bytes]) -> None:
        """Store one message; nothing of it is kept if the stream fails.

        Raises:
            QuotaExceeded: the user's wire size plus this message would exceed the quota.
            TemporaryBackendError: the user name is unsafe, or the quota field unreadable.

        """
        check_username(principal.username)
        limit = quota_for(principal.attributes, self.quota)
        data = bytearray()
        async for chunk in message:
            data += chunk
        if limit is not None:
            box = self._boxes.get(principal.username)
            used = 0 if box is None else sum(wire_size(m) for m, _ in box.messages.values())
            if used + wire_size(bytes(data)) > limit:
                raise QuotaExceeded("message exceeds the mailbox quota")
        self.add(principal.username, bytes(data))


class MemoryMaildrop:
    """One session's locked view of a memory maildrop (a ``Maildrop``)."""

    def __init__(self, box: _Box, chunk_size: int) -> None:
        self._box: _Box | None = box
        self._chunk_size = chunk_size
        self._listing = tuple(
            MessageInfo(uid, wire_size(m)) for uid, (m, _) in box.messages.items()
        )
        self._uids = frozenset(info.uid for info in self._listing)

    def listing(self) -> Sequence[MessageInfo]:
        """Return the messages as they were at open, in delivery order."""
        return self._listing

    def read(self, uid: str) -> AsyncIterator[bytes]:
        """Stream message ``uid`` CRLF-normalised, in chunks of about ``chunk_size``.

        Raises:
            KeyError: ``uid`` is not in the listing.
            MessageVanished: it was removed behind the session's back.

        """
        box = self._open_box()
        if uid not in self._uids:
            raise KeyError(uid)
        return self._chunks(box, uid)

    async def _chunks(self, box: _Box, uid: str) -> AsyncIterator[bytes]:
        stored = box.messages.get(uid)
        if stored is None:
            raise MessageVanished("message is gone")
        data, step = stored[0], self._chunk_size
        normaliser = CrlfNormaliser()
        for start in range(0, len(data), step):
            out = normaliser.feed(data[start : start + step])
            if out:
                yield out
        tail = normaliser.finish()
        if tail:
            yield tail

    async def commit(self, deleted: Collection[str]) -> None:
        """Remove the listed messages in ``deleted``; others (and later mail) stay."""
        box = self._open_box()
        for uid in deleted:
            if uid in self._uids:
                box.messages.pop(uid, None)

    async def close(self) -> None:
        """Release the lock.  Changes nothing; safe to call twice."""
        box, self._box = self._box, None
        if box is not None:
            box.locked = False

    def __del__(self) -> None:
        # A session dropped without close() must not lock its user out for good.
        if self._box is not None:
            self._box.locked = False

    def _open_box(self) -> _Box:
        if self._box is None:
            raise LocalProtocolError("maildrop used after close()")
        return self._box
