"""The session lock: one POP3 session per maildrop, shared by the Maildir and mbox stores.

Rules of this file:

* A store names each maildrop's lock by a *lock path* (``pop3d.lock`` in a Maildir,
  ``.<name>.pop3d`` beside an mbox) and takes it through its :class:`SessionLocks`,
  chosen by ``[storage] lock_table`` (:func:`session_locks_for`):

  - a **lock table** (:mod:`pop3d.storage.lock_table`, the default where the platform
    has open-file-description locks): the lock is one byte of the table (a folder of
    :data:`~pop3d.storage.lock_table.SHARDS` files) shared by every pop3d process,
    found from the lock path's folder and name; the lock path itself is never created.
    A process holds one descriptor per table file for all its sessions.
  - **per-mailbox** lock files (``lock_table = "per-mailbox"``, templates without a
    static folder, platforms without OFD locks): ``flock(LOCK_EX | LOCK_NB)`` on the
    lock path itself, created if needed, opened with ``O_NOFOLLOW`` (a symlink planted
    in its place is refused, never followed).  One descriptor per session.

* Both are locks of an open file description: two sessions conflict even in one
  process, workers in different processes conflict, and the lock dies with its holder
  (kill -9 included).  Both are local to the host.
* A busy lock is :class:`MaildropLocked` (``-ERR [IN-USE]``) at once, never waited for:
  the other session may last for minutes.
* The default table is ``.pop3d-locks`` in the *static folder* of the storage template:
  the folder part of the text before its first ``%u``/``%n``/``%d``, resolved against the
  config's base (``mail/%u/Maildir`` -> ``<base>/mail/.pop3d-locks``, ``/var/mail/%u``
  -> ``/var/mail/.pop3d-locks``).  A user name never expands to that name: the first
  variable's path component starts with the variable (whose values never start with
  ``.``, :mod:`pop3d.storage.template`) or with the static text before it; if that text
  could begin ``.pop3d-locks`` (``mail/.%u``), or the template has no static folder
  (``%u/Maildir``), per-mailbox files are used instead.
* All pop3d processes serving the same mail must use the same kind of lock and the same
  table: a per-mailbox lock file and a table byte do not see each other.
"""

from __future__ import annotations

import fcntl
import os
import stat as st
from pathlib import Path
from typing import IO, Final, Literal, Protocol

from pop3d.errors import MaildropLocked, TemporaryBackendError
from pop3d.storage import lock_table
from pop3d.storage.template import static_prefix

__all__ = [
    "PER_MAILBOX",
    "TABLE_NAME",
    "PerMailboxLocks",
    "SessionLock",
    "SessionLocks",
    "default_table_path",
    "session_lock",
    "session_locks_for",
    "take_lock",
]

#: The ``[storage] lock_table`` value that asks for per-mailbox lock files.
PER_MAILBOX: Final = "per-mailbox"
#: Folder name of the default lock table, in the static folder of the template.
TABLE_NAME: Final = ".pop3d-locks"

LockTableSetting = Path | Literal["per-mailbox"] | None


class SessionLock(Protocol):
    """A held session lock."""

    def close(self) -> None:
        """Release it; idempotent."""


class SessionLocks(Protocol):
    """How a store takes its session locks."""

    def acquire(self, lock_path: Path) -> SessionLock:
        """Take the session lock named ``lock_path``; held until closed (or collected).

        Raises:
            MaildropLocked: another session holds it.
            TemporaryBackendError: it cannot be taken for another reason.

        """
        ...


_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def session_lock(lock_path: Path, dir_fd: int | None = None) -> IO[bytes]:
    """Take the per-mailbox session lock on the file ``lock_path`` (created if needed).

    With ``dir_fd`` (the open folder of the lock file) only the file's name is looked
    up, relative to it.  The file is opened ``O_NOFOLLOW | O_NONBLOCK`` and must be a
    regular file: a symbolic link or FIFO planted in its place is refused.

    Held until the returned file is closed (or garbage-collected).

    Raises:
        MaildropLocked: another open file description holds it.
        TemporaryBackendError: the lock file cannot be created or locked.

    """
    try:
        if dir_fd is None:
            fd = os.open(lock_path, _LOCK_FLAGS, 0o600)
        else:
            fd = os.open(lock_path.name, _LOCK_FLAGS, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise TemporaryBackendError(f"cannot open the session lock: {exc.strerror}") from None
    if not st.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TemporaryBackendError("cannot open the session lock: not a regular file")
    # A file object closes the descriptor (and so releases the lock) even if a session
    # object is dropped without close(); a bare int would hold the lock until exit.
    handle = os.fdopen(fd, "rb", buffering=0)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise MaildropLocked("maildrop already locked") from None
    except OSError as exc:
        handle.close()
        raise TemporaryBackendError(f"cannot lock the maildrop: {exc.strerror}") from None
    return handle


class PerMailboxLocks:
    """Session locks as ``flock`` on one lock file per maildrop (:func:`session_lock`)."""

    def acquire(self, lock_path: Path) -> IO[bytes]:
        """Take the lock on the file ``lock_path``; see :func:`session_lock`."""
        return session_lock(lock_path)

    def __repr__(self) -> str:
        return "<PerMailboxLocks>"


#: The one per-mailbox strategy (it has no state).
PER_MAILBOX_LOCKS: Final = PerMailboxLocks()


def take_lock(locks: SessionLocks, lock_path: Path, dir_fd: int) -> SessionLock:
    """Take the session lock ``lock_path`` whose folder is open at ``dir_fd``.

    The stores' way to lock: the lock-table byte comes from the ``fstat`` of ``dir_fd``
    and a per-mailbox file is opened relative to it, so no path is resolved again (and
    no link followed).  Other ``SessionLocks`` get the path.

    Raises:
        MaildropLocked: another session holds it.
        TemporaryBackendError: it cannot be taken for another reason.

    """
    if isinstance(locks, lock_table.LockTable):
        return locks.lock(lock_table.offset_in(dir_fd, lock_path.name))
    if isinstance(locks, PerMailboxLocks):
        return session_lock(lock_path, dir_fd)
    return locks.acquire(lock_path)


def default_table_path(template: str, base: Path) -> Path | None:
    """Return the default lock table of a storage template, or ``None`` for per-mailbox.

    See the module head: ``.pop3d-locks`` in the template's static folder, resolved
    against ``base``; ``None`` when the template has no static folder, or when the text
    between that folder and the first variable could spell ``.pop3d-locks``.
    """
    prefix = static_prefix(template)
    slash = prefix.rfind("/")
    if slash < 0:
        return None  # "%u/Maildir": no folder shared by every user
    head = prefix[slash + 1 :]
    if head and TABLE_NAME.startswith(head):
        return None  # "mail/.%u": the user "pop3d-locks" would land on the table
    return base / (prefix[:slash] or "/") / TABLE_NAME


def session_locks_for(
    template: str, base: Path, setting: LockTableSetting = None
) -> SessionLocks:
    """Return the session locks for a store of ``template`` (``[storage] lock_table``).

    ``setting`` is a table path (already resolved against the config's base),
    :data:`PER_MAILBOX`, or ``None`` for the default (:func:`default_table_path`).
    Without OFD locks on this platform, always per-mailbox files.
    """
    if setting == PER_MAILBOX or not lock_table.AVAILABLE:
        return PER_MAILBOX_LOCKS
    path = default_table_path(template, base) if setting is None else setting
    if path is None:
        return PER_MAILBOX_LOCKS
    return lock_table.shared_table(path)
