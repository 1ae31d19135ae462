"""The lock table: all session locks of a host as bytes of a few shared files.

A POP3 session holds its maildrop's session lock for its whole TRANSACTION state; with
one lock file per maildrop each session costs a second descriptor beside its socket.
Here every session lock is one byte of one of :data:`SHARDS` *table files* (``00`` to
``3f`` in the table folder) shared by all pop3d processes of the host, so a process
holds at most :data:`SHARDS` descriptors for all its sessions' locks, however many.

Rules of this file:

* **The lock** is a Linux open-file-description (OFD) byte-range lock
  (``fcntl(F_OFD_SETLK)``, write lock, 1 byte) on the table file.  OFD locks of
  different open file descriptions conflict (whatever process holds them), and an OFD
  lock dies with the last descriptor of its description: a killed process (kill -9
  included) releases all its locks.  It is local to the host.  The byte's file is
  ``offset % SHARDS`` (see **Cost**).
* **The byte** of a maildrop is :func:`offset_of` its ``lock_path`` (the path the store
  would use for a per-mailbox lock file): the BLAKE2b-64 hash of ``lock_path.parent``'s
  ``(st_dev, st_ino)`` and ``lock_path.name``, masked to 62 bits.  The folder's identity,
  not its path, so that every path to one maildrop (symlinks, bind mounts, a relative
  ``base``) gives the same byte; a stable hash, not ``hash()``, which differs per
  process.  Two sessions of one maildrop always compute the same byte, so a hash
  collision can never let two sessions in: it can only refuse one (a false
  ``[IN-USE]``, the client retries).  A new session's byte meets one of *n* bytes held
  at the moment with probability at most ``n / 2**62`` (4e-15 for 20,000 sessions).
* **In one process** all sessions share the table's one open file description, and OFD
  locks of one description do not conflict, so the table also keeps the set of bytes
  it holds, under a lock (maildrops may be opened in threads), and refuses a byte
  already in it with :class:`MaildropLocked`.  The set is changed only together with
  the kernel lock (unlock first, then forget), so a second session of this process
  never sees a byte as free while this process still holds it.
* **One descriptor per file and process, opened after fork.**  The table folder is
  created (mode 0700) if missing, never its parent; each file is opened lazily
  (``O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC``, mode 0600) at the first lock of the
  process that falls in it.  A forked child
  must not share its parent's open file description (their locks would not conflict),
  so an at-fork hook gives every table in the child a fresh state: the inherited
  descriptors are closed (an OFD lock stays held while any descriptor of its description
  is open, so this releases nothing of the parent's, and a child that outlives its
  parent does not keep the parent's locks alive), the set of held bytes is emptied,
  and the pid that the next open records is the child's.  Handles inherited by the
  child release nothing.  The pid is :func:`pop3d.process.pid`, kept rather than asked
  of the kernel at each lock, and renewed before this module's hook runs.
* **Release** is ``F_UNLCK`` of the byte, then the byte leaves the set; idempotent.  A
  handle releases on :meth:`TableLock.close` and, if dropped without it, when it is
  garbage-collected, as the file object of a per-mailbox lock closes its descriptor.
* **Cost.**  A lock and an unlock are one ``fcntl`` each, plus one ``stat`` of the folder
  to compute the byte: 3 system calls, where a lock file costs 5 (open, 2 fstat, flock,
  close), and no descriptor per session.  The kernel keeps one list of the locks of an
  inode and every ``F_OFD_SETLK`` walks it (under the inode's spinlock), so on a single
  file a lock and unlock cost more the more sessions hold bytes of it, all processes
  together.  Spreading the bytes over :data:`SHARDS` files divides those lists
  (docs/performance.md has the figures, with and without shards).
* **Where it works.**  ``struct flock`` is packed for 64-bit Linux (``x86_64``,
  ``aarch64``: two shorts, padding, two 64-bit offsets, the pid, padding; 32 octets).
  Elsewhere :data:`AVAILABLE` is false and stores use per-mailbox lock files
  (:mod:`pop3d.storage.locking`).
* **The table file** must never be removed or replaced while a pop3d runs (locks on the
  old inode would no longer be seen by processes that open the new one), and every
  pop3d serving the same mail must use the same table: servers using different tables,
  or per-mailbox lock files, do not exclude each other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import platform
import stat as st
import struct
import sys
import threading
import weakref
from pathlib import Path

from pop3d import process
from pop3d.errors import MaildropLocked, TemporaryBackendError

__all__ = [
    "AVAILABLE",
    "LockTable",
    "TableLock",
    "ofd_setlk",
    "offset_in",
    "offset_of",
    "shared_table",
]

#: ``struct flock`` of 64-bit Linux: l_type, l_whence, (pad), l_start, l_len, l_pid, (pad).
_FLOCK = struct.Struct("@hhqqi4x")
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", -1)
#: Whether this platform has OFD locks with the ``struct flock`` layout packed here.
AVAILABLE = (
    sys.platform == "linux"
    and _F_OFD_SETLK >= 0
    and platform.machine() in {"x86_64", "aarch64"}
    and _FLOCK.size == 32
)


def ofd_setlk(fd: int, kind: int, start: int, length: int) -> None:
    """``fcntl(F_OFD_SETLK)``: lock (``F_RDLCK``/``F_WRLCK``) or unlock bytes of ``fd``.

    ``length`` 0 means "to the end of the file, however it grows".  Only where
    :data:`AVAILABLE`: the ``struct flock`` is packed for that platform's layout.

    Raises:
        OSError: EAGAIN or EACCES when another holds a conflicting lock.

    """
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))


#: Offsets are below this: far from the signed 64-bit ``off_t`` limit, whatever ``l_len``.
_OFFSET_MASK = (1 << 62) - 1
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_BUSY = frozenset({errno.EAGAIN, errno.EACCES})
#: Files of a table.  Part of the on-disk format: every pop3d sharing a table must agree.
SHARDS = 64

#: Every table of this process, for the at-fork hook.
_tables: weakref.WeakSet[LockTable] = weakref.WeakSet()
#: The table of each path, shared by every store of this process that names it.
_shared: weakref.WeakValueDictionary[Path, LockTable] = weakref.WeakValueDictionary()
_shared_guard = threading.Lock()


def offset_of(lock_path: Path) -> int:
    """Return the byte of the table that stands for ``lock_path`` (see the module head).

    Raises:
        TemporaryBackendError: the folder of ``lock_path`` cannot be examined.

    """
    folder, name = os.path.split(lock_path)
    try:
        s = os.stat(folder or ".")  # noqa: PTH116 (login hot path: no Path objects)
    except OSError as exc:
        raise TemporaryBackendError(f"cannot lock the maildrop: {exc.strerror}") from None
    return _offset(s, name)


def offset_in(dir_fd: int, name: str) -> int:
    """:func:`offset_of` the lock ``name`` in the folder open at ``dir_fd`` (no path walk).

    Raises:
        TemporaryBackendError: the folder cannot be examined.

    """
    try:
        s = os.fstat(dir_fd)
    except OSError as exc:
        raise TemporaryBackendError(f"cannot lock the maildrop: {exc.strerror}") from None
    return _offset(s, name)


def _offset(s: os.stat_result, name: str) -> int:
    key = b"%d:%d:%s" % (s.st_dev, s.st_ino, os.fsencode(name))
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") & _OFFSET_MASK


class TableLock:
    """One held session lock of a :class:`LockTable`; :meth:`close` releases it."""

    __slots__ = ("_owner", "_table", "offset")

    def __init__(self, table: LockTable, offset: int, owner: int) -> None:
        self._table: LockTable | None = table
        #: The byte of the table this lock holds.
        self.offset = offset
        self._owner = owner

    @property
    def closed(self) -> bool:
        """True once released."""
        return self._table is None

    def close(self) -> None:
        """Release the lock; idempotent.  In a forked child, releases nothing."""
        table, self._table = self._table, None
        if table is not None:
            table.release(self.offset, self._owner)

    def __del__(self) -> None:
        if self._table is not None:  # (a closed one, as most are: no call)
            self.close()

    def __repr__(self) -> str:
        state = "released" if self._table is None else "held"
        return f"<TableLock offset={self.offset:#x} {state}>"


class LockTable:
    """The session locks of a host as bytes of the file ``path`` (see the module head).

    A ``SessionLocks`` of :mod:`pop3d.storage.locking`.  Stores normally get theirs
    from :func:`shared_table`, so that a process holds one descriptor per table file.
    """

    def __init__(self, path: Path) -> None:
        if not AVAILABLE:
            raise OSError(errno.ENOSYS, "no open-file-description locks here")
        #: The table folder (created at the first lock if missing; its parent never is).
        self.path = path
        # Reentrant: a handle dropped inside the guarded code (a garbage collection may
        # run at any allocation) releases its lock from that same thread.
        self._guard = threading.RLock()
        #: Descriptor of each file of the table, -1 where not opened yet.
        self._fds = [-1] * SHARDS
        #: The process that opened ``_fds`` (0: none opened in this process).
        self._fd_pid = 0
        self._held: set[int] = set()
        _tables.add(self)

    def file_of(self, offset: int) -> Path:
        """The file of the table that holds byte ``offset``."""
        return self.path / f"{offset % SHARDS:02x}"

    def acquire(self, lock_path: Path) -> TableLock:
        """Take the session lock of the maildrop whose per-mailbox lock file is ``lock_path``.

        Raises:
            MaildropLocked: another session (of this or any process) holds it.
            TemporaryBackendError: the table file cannot be opened or locked, or the
                folder of ``lock_path`` cannot be examined.

        """
        return self.lock(offset_of(lock_path))

    def lock(self, offset: int) -> TableLock:
        """Take the byte ``offset`` (``0 <= offset < 2**62``) of the table.

        Raises:
            MaildropLocked: this process or another holds it.
            TemporaryBackendError: the table file cannot be opened or locked.

        """
        if not 0 <= offset <= _OFFSET_MASK:
            raise ValueError("offset out of range")
        pid = process.pid()
        shard = offset % SHARDS
        with self._guard:
            if self._fd_pid != pid:
                self._forget_inherited()
            fd = self._fds[shard]
            if fd < 0:
                fd = self._open(shard)
            if offset in self._held:
                raise MaildropLocked("maildrop already locked")
            try:
                ofd_setlk(fd, fcntl.F_WRLCK, offset, 1)
            except OSError as exc:
                if exc.errno in _BUSY:
                    raise MaildropLocked("maildrop already locked") from None
                raise TemporaryBackendError(f"cannot lock the maildrop: {exc.strerror}") from None
            self._held.add(offset)
            return TableLock(self, offset, pid)

    def release(self, offset: int, owner: int) -> None:
        """Release the byte ``offset`` taken by process ``owner``; nothing if not held.

        A handle inherited by a forked child (``owner`` is not this process) releases
        nothing: the byte is the parent's.
        """
        if owner != process.pid():
            return
        with self._guard:
            if offset not in self._held or self._fd_pid != owner:  # owner: this process
                return
            try:
                ofd_setlk(self._fds[offset % SHARDS], fcntl.F_UNLCK, offset, 1)
            except OSError:
                # Only a kernel out of memory splitting a lock range fails here; the byte
                # then stays locked until this process ends (a false [IN-USE], never two
                # sessions), and this process may take it again.
                pass
            self._held.discard(offset)

    @property
    def held(self) -> int:
        """How many bytes this process holds in the table."""
        return len(self._held) if self._fd_pid == process.pid() else 0

    def _open(self, shard: int) -> int:
        """Open file ``shard`` of the table for this process (the guard is held).

        Raises:
            TemporaryBackendError: it cannot be opened, or is not a regular file.

        """
        path = self.path / f"{shard:02x}"
        try:
            try:
                fd = os.open(path, _OPEN_FLAGS, 0o600)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.path, 0o700)  # noqa: PTH102 (a str-free hot path)
                fd = os.open(path, _OPEN_FLAGS, 0o600)
        except OSError as exc:
            raise TemporaryBackendError(
                f"cannot open the session lock table {os.fspath(path)}: {exc.strerror}"
            ) from None
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            os.close(fd)
            raise TemporaryBackendError(
                f"cannot open the session lock table {os.fspath(path)}: {exc.strerror}"
            ) from None
        if not st.S_ISREG(mode):
            os.close(fd)
            raise TemporaryBackendError(f"session lock table {os.fspath(path)}: not a regular file")
        self._fds[shard] = fd
        self._fd_pid = process.pid()
        return fd

    def _forget_inherited(self) -> None:
        """Drop what this process did not open itself: a parent's descriptors and bytes."""
        if self._fd_pid != process.pid():
            for fd in self._fds:
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)  # the parent keeps its description, and its locks
            self._fds = [-1] * SHARDS
            self._fd_pid = 0
            self._held = set()

    def _after_fork(self) -> None:
        """In a forked child: a fresh guard, no descriptor, no bytes held."""
        self._guard = threading.RLock()  # another thread of the parent may have held it
        self._forget_inherited()

    def close(self) -> None:
        """Close the descriptors, releasing every lock of this process in the table.

        For tests and shutdown; stores never call it (a dropped table closes itself).
        """
        with self._guard:
            if self._fd_pid == process.pid():
                self._close_all()
                self._held = set()

    def _close_all(self) -> None:
        fds, self._fds, self._fd_pid = self._fds, [-1] * SHARDS, 0
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def __del__(self) -> None:
        if self._fd_pid == process.pid():
            self._close_all()

    def __repr__(self) -> str:
        return f"<LockTable {os.fspath(self.path)!r} held={self.held}>"


def shared_table(path: Path) -> LockTable:
    """Return this process's table of the file ``path`` (one per path while it is used)."""
    with _shared_guard:
        table = _shared.get(path)
        if table is None:
            table = _shared[path] = LockTable(path)
        return table


def _after_fork_in_child() -> None:
    for table in list(_tables):
        table._after_fork()  # noqa: SLF001 (the hook is this module's own)


os.register_at_fork(after_in_child=_after_fork_in_child)
