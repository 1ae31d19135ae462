"""Per-user storage quota: which limit applies to a delivery.

Rules of this file:

* The store's default (``[storage] quota``, octets, ``None`` = unlimited) applies unless
  the user's record overrides it with an extra field ``quota``, ``quota_rule`` or
  ``userdb_quota_rule`` (the first present wins).
* An override is a plain size (``100M``, ``1048576``) or Dovecot's rule form
  ``*:storage=100M``; Dovecot's ``*:ignore``, ``*:storage=0``, ``0``, ``none`` and
  ``unlimited`` mean no limit.  Sizes are octets with optional K/M/G/T suffixes, as
  :func:`pop3d.config.parse_size` reads them (Dovecot 2.x also counts bare numbers in octets).
* A field that cannot be read is a :class:`TemporaryBackendError`: the MTA retries while
  the operator fixes the record, and no mail is bounced or accepted over an unknown limit.
* Usage is counted in wire octets (what LIST/STAT report), so what a user sees in STAT is
  what the quota limits.
* **Checked and charged atomically** (:func:`charge`): a store whose append is not
  already under a lock of its own (Maildir: a message appears by a rename) counts the
  usage and commits the message while holding an exclusive ``flock`` on
  ``.pop3d-quota.lock`` in the maildrop, taken by every process that delivers (the LMTP
  listener of each worker, ``pop3d deliver``).  So concurrent deliveries never store
  more than the quota: ten parallel 90 KB messages into a 100 KB quota store one.  Inside
  one process an :class:`asyncio.Lock` per maildrop queues the deliveries, so that at
  most one executor thread per maildrop and process waits for the ``flock``.  mbox
  appends check the quota under the mbox's own lock and need none of this.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pop3d.config import parse_size
from pop3d.errors import ConfigError, QuotaExceeded, TemporaryBackendError
from pop3d.storage.blocking import in_thread

__all__ = ["LOCK_NAME", "QUOTA_FIELDS", "charge", "parse_quota", "quota_for"]

#: The lock file of :func:`charge`, in the maildrop's folder (Maildir readers look only in
#: ``tmp/``, ``new/`` and ``cur/``).
LOCK_NAME = ".pop3d-quota.lock"

#: Extra fields of a user record that carry a quota, in order of precedence.
QUOTA_FIELDS = ("quota", "quota_rule", "userdb_quota_rule")

_UNLIMITED = frozenset({"", "0", "none", "unlimited", "ignore", "noenforcing"})


def parse_quota(value: str) -> int | None:
    """Read a quota field: octets, or ``None`` for no limit.

    Raises:
        TemporaryBackendError: the value is neither a size nor a Dovecot storage rule.

    """
    text = value.strip()
    if text.startswith("*:"):
        text = text[2:].strip()
        if text.lower().startswith("storage="):
            text = text[len("storage=") :]
        elif text.lower() not in _UNLIMITED:
            raise TemporaryBackendError("unreadable quota rule in the user record")
    if text.lower() in _UNLIMITED:
        return None
    try:
        limit = parse_size(text, "quota")
    except ConfigError:
        raise TemporaryBackendError("unreadable quota in the user record") from None
    return limit or None


def quota_for(attributes: Mapping[str, str], default: int | None) -> int | None:
    """Return the limit in octets for a user with these record fields; ``None`` = unlimited.

    Raises:
        TemporaryBackendError: the user's quota field cannot be read.

    """
    for name in QUOTA_FIELDS:
        if name in attributes:
            return parse_quota(attributes[name])
    return default


#: The in-process queue of :func:`charge` per maildrop folder (entries go when unused).
_queues: dict[Path, tuple[asyncio.Lock, int]] = {}


async def charge(
    folder: Path,
    size: int,
    limit: int,
    *,
    usage: Callable[[], int],
    commit: Callable[[], None],
    abandon: Callable[[], None],
) -> None:
    """Store a message of ``size`` wire octets only if it fits, atomically across processes.

    Under the maildrop's quota lock (see the module head), in an executor thread:
    ``usage()`` counts what the maildrop holds; if ``usage() + size > limit`` the message
    is ``abandon()``ed (its temporary file removed) and refused, else ``commit()`` makes it
    part of the maildrop.  Exactly one of ``commit`` and ``abandon`` runs, even if the
    caller is cancelled meanwhile (then ``abandon``, if it had not started yet).

    Raises:
        QuotaExceeded: the message does not fit.
        TemporaryBackendError: the lock file cannot be opened or locked.

    """
    job = _Charge(folder, size, limit, usage, commit, abandon)
    lock, users = _queues.get(folder) or (asyncio.Lock(), 0)
    _queues[folder] = (lock, users + 1)
    try:
        try:
            await lock.acquire()
        except BaseException:
            abandon()
            raise
        try:
            await in_thread(job.run)
        finally:
            lock.release()
    finally:
        lock, users = _queues[folder]
        if users == 1:
            del _queues[folder]
        else:
            _queues[folder] = (lock, users - 1)


@dataclass(frozen=True, slots=True)
class _Charge:
    """One :func:`charge`: what to count, and what to do with the message."""

    folder: Path
    size: int
    limit: int
    usage: Callable[[], int]
    commit: Callable[[], None]
    abandon: Callable[[], None]

    def run(self) -> None:
        """Runs in a thread: take the flock, count, commit or abandon."""
        try:
            fd = os.open(
                self.folder / LOCK_NAME,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            )
        except OSError as exc:
            self.abandon()
            raise TemporaryBackendError(f"cannot open the quota lock: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                used = self.usage()
            except BaseException:
                self.abandon()
                raise
            if used + self.size > self.limit:
                self.abandon()
                raise QuotaExceeded("message exceeds the mailbox quota")
            self.commit()
        finally:
            os.close(fd)  # releases the flock
