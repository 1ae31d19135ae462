"""What a storage backend promises.

The rules every backend keeps (tests/storage/contract.py checks them for each):

* :meth:`MailStore.open` takes the maildrop's exclusive lock, which dies with the process
  holding it, and snapshots the listing.  The listing never changes for the session:
  mail delivered later is not in it, and :meth:`Maildrop.commit` never touches it.
* Sizes are *wire* sizes: the message as sent, with CRLF line ends, before byte-stuffing,
  with a final CRLF added if the stored message lacks one (RFC 1939 §11).
* UIDs are 1-70 characters in 0x21-0x7E and stable for the life of the message, across
  sessions and restarts (RFC 1939 §7).
* Nothing is deleted, renamed or otherwise changed except by :meth:`Maildrop.commit`,
  called only in the UPDATE state.  :meth:`Maildrop.close` releases the lock and changes
  nothing.  A crash at any moment loses no message that was not asked to be deleted.
* Backends never see message numbers; the protocol core owns them.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pop3d.protocol.values import MessageInfo, Principal


class Maildrop(Protocol):
    """An open, locked maildrop: one session's view of one user's mail."""

    def listing(self) -> Sequence[MessageInfo]:
        """Return the messages as they were when the maildrop was opened."""
        ...

    def read(self, uid: str) -> AsyncIterator[bytes]:
        """Yield the message in bounded chunks, CRLF-normalised, ending with CRLF.

        The concatenated chunks are exactly ``size`` octets long.

        Raises:
            MessageVanished: the message disappeared under the session.
            TemporaryBackendError: it could not be read.

        """
        ...

    async def commit(self, deleted: Collection[str]) -> None:
        """Remove the messages ``deleted`` (UPDATE state only), then release nothing.

        Each removal is atomic; a message already gone counts as removed.

        Raises:
            TemporaryBackendError: some messages could not be removed (those that could
                were; none that was not asked for was touched).

        """
        ...

    async def close(self) -> None:
        """Release the lock.  Changes nothing.  Safe to call twice."""
        ...


class MailStore(Protocol):
    """The set of all users' maildrops."""

    async def open(self, principal: Principal) -> Maildrop:
        """Lock and open the user's maildrop.

        Raises:
            MaildropLocked: another session holds it.
            TemporaryBackendError: it is missing, unreadable, or the user name is unsafe.

        """
        ...


# ---------------------------------------------------------------------------- fast paths
#
# Optional capabilities a backend may add to its MailStore / Maildrop: answering a request
# at once, on the event loop, when it can do so without waiting.  The one rule of each
# ``*_now`` method: it either finishes the request (returns, or raises the request's own
# errors: that IS the answer) or raises :class:`~pop3d.errors.WouldWait` BEFORE doing
# anything that counts (no lock taken, no file unlinked, nothing read), so the async form
# can take over without repeating work or a verdict.  The session (``session.py``) is the
# only caller; it checks for these with ``isinstance`` once per backend type.


@runtime_checkable
class InlineOpen(Protocol):
    """A :class:`MailStore` that can often lock and open a maildrop at once."""

    def open_now(self, principal: Principal) -> Maildrop:
        """:meth:`MailStore.open` without waiting.

        Raises:
            WouldWait: it would wait (a scan, a thread); nothing was locked.
            MaildropLocked, TemporaryBackendError, PermanentBackendError: as ``open``.

        """
        ...


@runtime_checkable
class Paced(Protocol):
    """A message stream (what :meth:`Maildrop.read` returns) whose reads the sender sizes.

    The sender drops the read buffer while the peer stalls, and reads small chunks after
    a stall until the peer has shown again that it takes them (``server/connection.py``),
    so that a peer reading a little now and then holds a small chunk, not a full one.
    """

    def pace(self, size: int) -> None:
        """Read at most ``size`` octets for the next chunks (at most the store's chunk size)."""
        ...

    def shrink(self) -> None:
        """Free the memory kept for the next read while the peer is not reading."""
        ...


@runtime_checkable
class InlineRead(Protocol):
    """A :class:`Maildrop` that can read a small message whole, at once."""

    def read_inline(self, uid: str) -> bytes | None:
        """Return message ``uid`` (as :meth:`Maildrop.read` would join it), or ``None``.

        ``None``: the message is too big to read on the event loop (nothing was read).

        Raises:
            MessageVanished, TemporaryBackendError: as :meth:`Maildrop.read`.

        """
        ...


@runtime_checkable
class InlineCommit(Protocol):
    """A :class:`Maildrop` that can apply a small UPDATE and release its lock at once."""

    def commit_now(self, deleted: Collection[str]) -> None:
        """:meth:`Maildrop.commit` without waiting.

        Raises:
            WouldWait: too much to do on the event loop; nothing was removed.
            TemporaryBackendError: as :meth:`Maildrop.commit`.

        """
        ...

    def release(self) -> None:
        """:meth:`Maildrop.close` without waiting: release the lock.  Safe to call twice."""
        ...


@runtime_checkable
class Fenced(Protocol):
    """A :class:`Maildrop` whose lock can be lost while it is open (a cluster lease)."""

    def still_held(self) -> bool:
        """Whether the session still holds the maildrop's lock (no I/O: a clock read).

        False once the lock expired or was taken: the session must stop serving it.
        """
        ...


class Deliverer(Protocol):
    """Something that puts new mail into maildrops (LDA, LMTP)."""

    async def deliver(self, principal: Principal, message: AsyncIterable[bytes]) -> None:
        """Store one message atomically: after a failure nothing of it is visible.

        Raises:
            QuotaExceeded: the user's quota would be exceeded.
            TemporaryBackendError: disk full, lock timeout, I/O error.

        """
        ...


@dataclass(frozen=True, slots=True)
class MailboxStats:
    """A maildrop's totals, read without taking its lock (``pop3d mailbox stat``)."""

    #: Number of messages.
    count: int
    #: Sum of the messages' wire sizes (as :attr:`MessageInfo.size`).
    size: int
    #: Modification time (seconds since the epoch) of the oldest message; ``None`` if empty.
    oldest: float | None


class MailboxInspector(Protocol):
    """A store that can report a maildrop's totals without locking it."""

    async def stat(self, principal: Principal) -> MailboxStats:
        """Count the user's messages and their wire sizes; never takes the lock.

        Raises:
            TemporaryBackendError: the maildrop is missing or unreadable, or the name unsafe.

        """
        ...
