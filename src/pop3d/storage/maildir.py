"""Maildir: serve, lock, expunge and deliver mail as Postfix, Dovecot, Courier, procmail do.

The layout is ``tmp/ new/ cur/`` (http://cr.yp.to/proto/maildir.html).

Rules of this file:

* **Names.**  A message file is ``<base>[<sep><info>]``: ``<sep>`` is ``:`` (standard) or
  ``!``/``;`` before ``2,`` (systems where ``:`` is not allowed).  ``<base>`` may carry
  Dovecot's ``,S=<file size>`` and ``,W=<virtual size>`` fields.  The message *key* is
  ``<base>`` without the ``S=``/``W=`` fields: it never changes for the life of the
  message (not when ``new/X`` becomes ``cur/X:2,``, not when flags change, not when
  someone adds ``W=``).  The UIDL is the key when it is 1-70 characters in 0x21-0x7E,
  else the SHA-1 hex of the key (as stdlib ``mailbox.Maildir`` keys on
  ``name.split(':')[0]``).
* **Never leave the Maildir** (the user may own it, pop3d may be root): every path is
  resolved below the template's mail root without following a symbolic link
  (:mod:`pop3d.storage.beneath`: ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``,
  else ``O_NOFOLLOW`` component by component).  The Maildir folder and ``cur/ new/ tmp/``
  are opened as descriptors and every listing, open, rename and unlink is relative to
  them (``dir_fd=``), so no path is resolved twice.  A Maildir folder (or a folder
  above it, below the root), ``cur/`` or ``new/`` that is a symbolic link (or not a
  folder) refuses the login with ``[SYS/PERM]``: retrying cannot help, and the owner
  must repair it; delivery into it fails temporarily (the MTA retries).
* **Only regular files** directly in ``cur/`` and ``new/`` whose names do not start with
  ``.`` are messages.  Entries are ``lstat``-ed and files opened with ``O_NOFOLLOW |
  O_NONBLOCK`` and ``fstat``-checked, so a symlink is never read and a FIFO never
  blocks; symlinks, FIFOs, sockets and devices are skipped and logged (one line per
  listing).  ``tmp/``, sub-folders, and our own files are never listed.
* **Sizes** are wire sizes (:mod:`pop3d.storage.wire`).  They come, in this order, from
  the size index ``pop3d-sizes`` (entry valid only while the file's inode, size and
  mtime are unchanged), from a trustworthy ``W=`` (``S=`` present and equal to the file
  size; one octet is read to learn whether a final CRLF must be added), or from reading
  the file.  The index is rewritten (tmp + rename, checksummed) only when it changed,
  under the maildrop lock, and never records a file modified in the last
  :data:`_RACY_SECONDS` (git's "racily clean" rule: a rewrite within the same mtime tick
  could otherwise go unnoticed).  The index is a cache: unreadable, corrupt or
  unwritable, it is ignored.  Its temporary file has a random name, ``O_EXCL |
  O_NOFOLLOW | O_NONBLOCK``, and the Maildir folder's mode without x bits.
* **Self-healing sizes.**  A read that finds a message's octets do not add up to its
  listed size (a lying ``W=``, a stale index, a file rewritten in place) fails that
  RETR (``[SYS/TEMP]``: the size was announced), measures the file, records the real
  size in the index (kept even while racy, since a ``W=`` would otherwise win again)
  and drops the remembered listing: the next session lists and serves it right.
  UIDLs come from the name's key only, never from sizes; a guard compares each new
  listing with the last one of the process and logs any file whose UIDL changed.
* **Open** takes the lock, then moves ``new/X`` to ``cur/X:2,`` (as Dovecot does), never
  over an existing name, and snapshots the listing.  Nothing else is changed before
  :meth:`MaildirMaildrop.commit`.  A maildrop without ``cur/`` and ``new/`` is an error
  (``-ERR [SYS/TEMP]`` at login), never an empty mailbox, and :meth:`MaildirStore.open`
  does not create it; :meth:`MaildirStore.deliver` does, as an LDA would.
* **Lock** (:mod:`pop3d.storage.locking`): the session lock named ``pop3d.lock`` in the
  Maildir, taken through the store's ``SessionLocks``: by default one byte of the shared
  lock table (:mod:`pop3d.storage.lock_table`; no file is created in the Maildir), or
  with ``lock_table = "per-mailbox"`` ``flock(LOCK_EX | LOCK_NB)`` on the file
  ``pop3d.lock`` itself.  Either belongs to an open file description, so two sessions
  conflict even in one process, workers in different processes conflict, and the lock
  dies with its holder (kill -9 included).  It is local to the host (NFS is a cluster
  lock's job: ``[storage] lock = "postgresql"``).
* **Read** streams chunks of at most ``chunk_size`` raw octets (smaller while the sender
  asks so: :class:`~pop3d.storage.base.Paced`).  Before the first chunk the
  file is ``fstat``-ed: if it is not the file that was listed and its wire size changed,
  :class:`TemporaryBackendError` is raised before anything is sent.  A file changed
  *while* it is being sent (a rewrite in place, which no Maildir program does) cannot be
  taken back: the reader never yields more than the listed size and raises
  :class:`TemporaryBackendError` when the octets run out or overflow, so the driver must
  drop the connection rather than end the response.  A file renamed by another program
  (flags changed) is found again by its key; one gone for good is :class:`MessageVanished`.
* **Commit** unlinks each deleted message (atomic); a file already gone counts as removed;
  nothing outside ``deleted`` is touched, so messages delivered during the session are
  safe, and kill -9 at any moment leaves every message either intact or deleted on
  request.
* **Deliver** writes ``tmp/<secs>.M<usec>P<pid>Q<n>R<random>.<host>`` (``O_EXCL |
  O_NOFOLLOW``, the mode of ``tmp/`` without x bits), fsyncs it, renames it to
  ``new/<same>,S=<size>,W=<virtual size>`` and fsyncs ``new/``, all relative to the
  folders' descriptors.  On any failure the tmp file is removed: nothing half written
  is ever visible in ``new/`` or ``cur/``.
* **Blocking I/O**: a login must stay fast, so the directory work of a normal maildrop
  (a few ``lstat`` per message and one small index read) runs inline, which is cheaper
  than a thread hop; a directory large enough to make that slow
  (:data:`_INLINE_SCAN_DIR_SIZE`), message bodies to measure above
  :data:`_INLINE_MEASURE_BYTES`, long commits and the fsyncs of delivery go to the
  default executor.  Message octets are read on the loop only with
  ``preadv(RWF_NOWAIT)`` (what the page cache holds); any read that would wait for the
  disk goes to a thread, and :meth:`MaildirMaildrop.read_inline` answers ``None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import logging
import os
import re
import secrets
import socket
import stat as st
import threading
import time
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Self, cast

from pop3d.errors import (
    LocalProtocolError,
    MessageVanished,
    PermanentBackendError,
    QuotaExceeded,
    TemporaryBackendError,
    WouldWait,
)
from pop3d.protocol import limits
from pop3d.protocol.values import MessageInfo, Principal
from pop3d.storage.base import MailboxStats
from pop3d.storage.beneath import DIR_FLAGS, PATH_FLAGS, MailRoot, is_link_refusal
from pop3d.storage.blocking import in_thread, nowait_reads, pread_nowait, preadv_nowait, write_all
from pop3d.storage.lock_table import LockTable, TableLock
from pop3d.storage.locking import SessionLock, SessionLocks, take_lock
from pop3d.storage.quota import charge, quota_for
from pop3d.storage.templated import TemplatedStore
from pop3d.storage.wire import CrlfNormaliser, WireCounter

__all__ = [
    "INDEX_NAME",
    "LOCK_NAME",
    "MaildirMaildrop",
    "MaildirStore",
    "message_key",
    "split_name",
    "uid_for_key",
]

#: The session lock's name inside the Maildir (a file only with per-mailbox locks).
LOCK_NAME = "pop3d.lock"
#: The size index inside the Maildir.
INDEX_NAME = "pop3d-sizes"

_INDEX_MAGIC = b"pop3d-sizes/1"
#: An index larger than this is ignored (about 1.5 million messages): reading it could
#: cost more than it saves.
_MAX_INDEX_BYTES = 64 * 1024 * 1024
#: Files modified this recently are not recorded in the index (see the module head).
_RACY_SECONDS = 2
#: Above this directory size (``st_size`` of ``cur/`` or ``new/``, which grows with the
#: number of entries on ext4, XFS, btrfs and tmpfs: 64 KiB is roughly 1-3 thousand
#: names) the scan at open runs in a thread: below it, a warm scan inline costs about
#: what one thread hop costs (figures: docs/performance.md).
_INLINE_SCAN_DIR_SIZE = 64 * 1024
#: Unindexed message octets read inline at open; above this, measuring goes to a thread.
_INLINE_MEASURE_BYTES = 1024 * 1024
#: Messages up to this size may be answered whole by ``read_inline`` (one page-cache
#: read is cheaper than a thread hop); bigger ones are streamed, each chunk
#: read on the loop if the page cache holds it, else in a thread.
_INLINE_READ_BYTES = 64 * 1024
#: Maildirs whose last listing a process remembers (see _ListingCache).
_LISTING_CACHE = 10_000
#: Users whose Maildir location a store remembers (``MaildirStore._where``); as many as
#: :func:`pop3d.storage.template.mail_path` remembers paths.
_WHERE_CACHE = 65_536
#: Commits deleting more messages than this run in a thread.
_INLINE_COMMIT = 64
#: Chunk size used to measure a file's wire size (memory only, nothing is kept).
_MEASURE_CHUNK = 1024 * 1024

_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_SIZE_FIELD = re.compile(r",([SW])=([0-9]+)(?=,|$)")
_VALID_UID = re.compile(r"[\x21-\x7e]{1,%d}" % limits.MAX_UIDL)  # noqa: UP031
_MAX_SECONDS_DIGITS = 12
_INDEX_LINE = re.compile(r"([0-9]+) ([0-9]+) ([0-9]+) ([0-9]+) ([^\n]+)\n")
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_delivery_counter = itertools.count(1)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- names


def split_name(name: str) -> tuple[str, str]:
    """Split a Maildir file name into ``(base, info)``; ``info`` is ``""`` when absent.

    ``1.M2P3.h,S=5:2,S`` -> ``("1.M2P3.h,S=5", "2,S")``; ``!2,`` and ``;2,`` also separate.
    """
    colon = name.find(":")
    if colon >= 0:
        return name[:colon], name[colon + 1 :]
    for sep in ("!2,", ";2,"):
        at = name.rfind(sep)
        if at >= 0:
            return name[:at], name[at + 1 :]
    return name, ""


def message_key(name: str) -> str:
    """Return the stable key of a message file name: its base without ``S=``/``W=``."""
    base = split_name(name)[0]
    if ",S=" in base or ",W=" in base:
        return _SIZE_FIELD.sub("", base)
    return base


def uid_for_key(key: str) -> str:
    """Return the UIDL of a key: the key itself when valid (RFC 1939 §7), else its SHA-1."""
    if _VALID_UID.fullmatch(key):
        return key
    return hashlib.sha1(os.fsencode(key), usedforsecurity=False).hexdigest()


def _name_sizes(name: str) -> tuple[int | None, int | None]:
    """Return the ``S=`` and ``W=`` values of a name (``None`` where absent)."""
    sizes: dict[str, int] = {}
    for field, value in _SIZE_FIELD.findall(split_name(name)[0]):
        sizes[field] = int(value)
    return sizes.get("S"), sizes.get("W")


_MICROSECONDS = re.compile(r"M(\d{1,6})(?!\d)")


def _delivery_order(e: _Entry) -> tuple[int, int, str, str]:
    """Delivery order: the leading seconds of the name, then its ``M<usec>``, then the name.

    All programs start names with the seconds; Dovecot, Postfix and pop3d put the
    microseconds after an ``M``, compared as a number (as text, "M89012" would sort after
    "M123456" within the same second).
    """
    head, _, rest = e.name.partition(".")
    usec_match = _MICROSECONDS.search(rest.partition(".")[0])
    usec = int(usec_match.group(1)) if usec_match else -1
    if head.isascii() and head.isdigit() and len(head) <= _MAX_SECONDS_DIGITS:
        return int(head), usec, e.name, e.folder
    return e.mtime_ns // 1_000_000_000, usec, e.name, e.folder


# ---------------------------------------------------------------------------- scanning


@dataclass(slots=True)
class _Entry:
    """A message file as listed: where it is, what it was, and its wire size."""

    folder: str
    name: str
    key: str
    ino: int
    file_size: int
    mtime_ns: int
    wire: int = -1
    uid: str = ""

    def same_file(self, s: os.stat_result) -> bool:
        return (s.st_ino, s.st_size, s.st_mtime_ns) == (self.ino, self.file_size, self.mtime_ns)

    def copy(self) -> _Entry:
        """A copy, made field by field (``dataclasses.replace`` takes three times as long)."""
        return _Entry(self.folder, self.name, self.key, self.ino, self.file_size,
                      self.mtime_ns, self.wire, self.uid)


_IndexRecord = tuple[int, int, int, int]  # inode, file size, mtime_ns, wire size


@dataclass(frozen=True, slots=True)
class _Where:
    """Where a Maildir is: ``rel`` below the store's mail ``root`` (and its full ``path``).

    Every file operation goes through descriptors opened from ``root`` without following
    a symbolic link (:mod:`pop3d.storage.beneath`); ``path`` only names it (in log lines,
    and as the session lock's name).
    """

    root: MailRoot
    rel: str
    path: Path


def _refusal(exc: OSError, what: str) -> TemporaryBackendError | PermanentBackendError:
    """The error for a folder that cannot be opened: a planted link is refused for good."""
    if is_link_refusal(exc):
        return PermanentBackendError(f"{what} refused: a symbolic link or not a folder")
    return TemporaryBackendError(f"{what} unavailable: {exc.strerror}")


def _open_folder(where: _Where, flags: int = DIR_FLAGS) -> int:
    """Open the Maildir folder, following no symbolic link below the mail root.

    Raises:
        PermanentBackendError: a component of its path is a symbolic link (or a file).
        TemporaryBackendError: it is missing or cannot be opened.

    """
    try:
        return where.root.open(where.rel, flags)
    except OSError as exc:
        raise _refusal(exc, "maildrop") from None


class _Dirs:
    """The open Maildir folder and, opened at first use, its ``cur/ new/ tmp/``.

    ``dirs["cur"]`` is the descriptor of ``cur/`` opened with ``O_NOFOLLOW``: a folder
    replaced by a symbolic link is refused, never followed.
    """

    __slots__ = ("_fds", "md", "path")

    def __init__(self, md: int, path: Path) -> None:
        #: The Maildir folder.
        self.md = md
        #: Its path, for log lines only.
        self.path = path
        self._fds: dict[str, int] = {}

    def __getitem__(self, folder: str) -> int:
        fd = self._fds.get(folder)
        if fd is None:
            try:
                fd = self._fds[folder] = os.open(folder, DIR_FLAGS, dir_fd=self.md)
            except OSError as exc:
                raise _refusal(exc, f"maildrop folder {folder}/") from None
        return fd

    def close(self) -> None:
        """Close every descriptor; idempotent."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        if self.md >= 0:
            md, self.md = self.md, -1
            os.close(md)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_maildir(md: int) -> tuple[os.stat_result, os.stat_result]:
    """Check that the open folder ``md`` is a Maildir; return the ``lstat`` of ``cur/ new/``.

    Whether the folders can be read is found out by reading them (:func:`_scan`): an
    ``access()`` here would be two more system calls on every login for the same answer.
    ``tmp/`` is not looked at: a session never uses it (delivery refuses a bad one).

    Raises:
        TemporaryBackendError: ``cur/`` or ``new/`` is missing.
        PermanentBackendError: ``cur/`` or ``new/`` is a symbolic link or not a folder.

    """
    # Unrolled (a login's path): ``new/`` is looked at only once ``cur/`` is a folder.
    try:
        cur = os.stat("cur", dir_fd=md, follow_symlinks=False)
        if st.S_ISDIR(cur.st_mode):
            new = os.stat("new", dir_fd=md, follow_symlinks=False)
            if st.S_ISDIR(new.st_mode):
                return cur, new
            folder = "new"
        else:
            folder = "cur"
    except OSError as exc:  # its filename is the folder's name
        raise TemporaryBackendError(
            f"maildrop unavailable: {exc.filename}/: {exc.strerror}"
        ) from None
    raise PermanentBackendError(f"maildrop refused: {folder}/ is a symbolic link or not a folder")


def _move_new_to_cur(dirs: _Dirs) -> bool:
    """Move each message of ``new/`` to ``cur/`` with an empty info, as Dovecot does.

    Never replaces an existing name; a message that cannot be moved stays in ``new/`` and
    is served from there.  Returns whether anything (a message left behind, or a file
    of any other kind) is still in ``new/``, so that the listing reads it again only then.
    Only regular files move (``lstat``); both folders are descriptors opened without
    following links, so nothing moves in or out of the Maildir.
    """
    new, cur = dirs["new"], dirs["cur"]
    left = False
    try:
        with os.scandir(new) as it:
            names = []
            for e in it:
                if not e.name.startswith(".") and e.is_file(follow_symlinks=False):
                    names.append(e.name)
                else:
                    left = True
    except OSError as exc:
        raise TemporaryBackendError(f"maildrop unreadable: new/: {exc.strerror}") from None
    for name in names:
        target = name if split_name(name)[1] else name + ":2,"
        try:
            os.stat(target, dir_fd=cur, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except OSError:
            left = True
            continue
        else:
            left = True  # never over an existing name
            continue
        try:
            os.rename(name, target, src_dir_fd=new, dst_dir_fd=cur)
        except OSError:
            left = True
    return left


#: What to list after the new/ -> cur/ move: new/ too only if something stayed there.
_FOLDERS = {False: ("cur",), True: ("cur", "new")}


def _scan(dirs: _Dirs, folders: tuple[str, ...] = ("cur", "new")) -> list[_Entry]:
    """List the regular, non-hidden files of ``folders``, in delivery order.

    Anything else (a symbolic link, FIFO, socket, device, sub-folder) is skipped, and
    logged: it is not mail, and may be a trap.

    Raises:
        TemporaryBackendError: a folder cannot be read.
        PermanentBackendError: a folder is a symbolic link.

    """
    entries: list[_Entry] = []
    for folder in folders:
        fd = dirs[folder]
        skipped: list[str] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    name = entry.name
                    if name.startswith("."):
                        continue
                    try:
                        # lstat: never follows a link, never opens (a FIFO cannot block).
                        s = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if st.S_ISREG(s.st_mode):
                        entries.append(
                            _Entry(folder, name, message_key(name), s.st_ino, s.st_size,
                                   s.st_mtime_ns)
                        )
                    elif not st.S_ISDIR(s.st_mode):
                        skipped.append(name)
        except OSError as exc:
            raise TemporaryBackendError(
                f"maildrop unreadable: {folder}/: {exc.strerror}"
            ) from None
        if skipped:
            log.warning(
                "%s/%s: skipped %d entries that are not regular files (%r%s)",
                dirs.path, folder, len(skipped), skipped[0], ", ..." if len(skipped) > 1 else "",
            )
    entries.sort(key=_delivery_order)
    return entries


def _assign_uids(entries: Sequence[_Entry]) -> None:
    """Give each entry its UIDL; a duplicated key (a broken Maildir) gets a name hash."""
    seen: set[str] = set()
    for e in entries:
        uid = uid_for_key(e.key)
        if uid in seen:
            uid = hashlib.sha1(
                os.fsencode(f"{e.folder}/{e.name}"), usedforsecurity=False
            ).hexdigest()
        seen.add(uid)
        e.uid = uid


# ---------------------------------------------------------------------------- sizes


def _measure_fd(fd: int, size: int = _MEASURE_CHUNK, *, nowait: bool = False) -> WireCounter:
    """Read the open file whole and count its wire size (``size``: its size, a hint).

    Raises:
        WouldWait: ``nowait`` and the page cache does not hold it all.
        OSError: it cannot be read.

    """
    counter = WireCounter()
    chunk = min(_MEASURE_CHUNK, max(size, 0) + 1)
    offset = 0
    while data := _pread(fd, chunk, offset, nowait=nowait):
        counter.feed(data)
        offset += len(data)
    return counter


def _pread(fd: int, size: int, offset: int, *, nowait: bool) -> bytes:
    """``os.pread``; with ``nowait`` only from the page cache, else :class:`WouldWait`."""
    if not nowait:
        return os.pread(fd, size, offset)
    data = pread_nowait(fd, size, offset)
    if data is None:
        raise WouldWait
    return data


def _open_regular(name: str, dir_fd: int) -> tuple[int, os.stat_result]:
    """Open a file of the folder ``dir_fd`` without following links or blocking.

    Refuses non-regular files.

    Raises:
        FileNotFoundError: the file is gone.
        OSError: anything else, including a symlink (ELOOP) or a non-regular file.

    """
    return _checked_regular(os.open(name, _OPEN_READ, dir_fd=dir_fd))


def _open_message(where: _Where, folder: str, name: str) -> tuple[int, os.stat_result]:
    """Open ``folder/name`` of the Maildir ``where``: one ``openat2``, no link followed.

    Raises:
        FileNotFoundError: the file is gone.
        OSError: anything else, including a symlink anywhere on the way (ELOOP).

    """
    return _checked_regular(where.root.open(f"{where.rel}/{folder}/{name}", _OPEN_READ))


def _checked_regular(fd: int) -> tuple[int, os.stat_result]:
    """``fd`` and its ``fstat`` if it is a regular file; closed and ``EINVAL`` otherwise."""
    try:
        s = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not st.S_ISREG(s.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd, s


def _indexable(key: str) -> bool:
    """Whether the size index (one line per key) can record ``key``."""
    return "\n" not in key and "\r" not in key


def _wire_from_name(entry: _Entry, fd: int, *, nowait: bool = False) -> int | None:
    """Use Dovecot's ``W=`` when ``S=`` proves the name describes this file.

    Not for a name the size index cannot record: a wrong ``W=`` could never be corrected
    there (:meth:`MaildirMaildrop._heal`), and the message would be refused at every open.
    """
    if not _indexable(entry.key):
        return None
    s_size, w_size = _name_sizes(entry.name)
    if s_size is None or w_size is None or s_size != entry.file_size:
        return None
    if not s_size <= w_size <= 2 * s_size:
        return None
    if s_size == 0:
        return 0
    # W= counts LFs as CRLF but adds no final line end: one octet tells.
    last = _pread(fd, 1, s_size - 1, nowait=nowait)
    return w_size + (0 if last == b"\n" else 2)


def _measure_entry(dirs: _Dirs, entry: _Entry, *, nowait: bool = False) -> bool:
    """Fill in ``entry.wire`` from its name or its bytes; False if it is not a message now.

    Raises:
        WouldWait: ``nowait`` and its octets are not all in the page cache.

    """
    try:
        fd, s = _open_regular(entry.name, dirs[entry.folder])
    except OSError:
        return False
    try:
        entry.ino, entry.file_size, entry.mtime_ns = s.st_ino, s.st_size, s.st_mtime_ns
        wire = _wire_from_name(entry, fd, nowait=nowait)
        if wire is None:
            wire = _measure_fd(fd, s.st_size, nowait=nowait).wire_size
        entry.wire = wire
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _apply_index(entries: Sequence[_Entry], index: dict[str, _IndexRecord]) -> list[_Entry]:
    """Size the entries the index knows (same inode, size, mtime); return the others."""
    misses: list[_Entry] = []
    for e in entries:
        record = index.get(e.key)
        if record is not None and record[0] == e.ino and record[1] == e.file_size and (
            record[2] == e.mtime_ns
        ):
            e.wire = record[3]
        else:
            misses.append(e)
    return misses


def _fill_sizes(dirs: _Dirs, entries: list[_Entry], index: dict[str, _IndexRecord]) -> list[_Entry]:
    """Give each entry its wire size, from the index or the file; drop vanished files."""
    return _measure_misses(dirs, entries, _apply_index(entries, index))


def _measure_misses(
    dirs: _Dirs, entries: list[_Entry], misses: list[_Entry], *, nowait: bool = False
) -> list[_Entry]:
    """Measure ``misses`` from their files; return ``entries`` without those now gone.

    Raises:
        WouldWait: ``nowait`` and a file is not all in the page cache.

    """
    gone = [e for e in misses if not _measure_entry(dirs, e, nowait=nowait)]
    if not gone:
        return entries
    dropped = {id(e) for e in gone}
    return [e for e in entries if id(e) not in dropped]


def _finish_listing(
    dirs: _Dirs,
    entries: list[_Entry],
    index: dict[str, _IndexRecord],
    misses: list[_Entry],
    *,
    nowait: bool = False,
) -> list[_Entry]:
    """Measure what the index missed, refresh the index if it changed, assign UIDLs.

    Raises:
        WouldWait: ``nowait`` and a file to measure is not all in the page cache
            (nothing was written then).

    """
    entries = _measure_misses(dirs, entries, misses, nowait=nowait)
    fresh = _index_of(entries, time.time_ns(), index)
    if fresh != index:
        _write_index(dirs.md, fresh)
    _assign_uids(entries)
    return entries


def _load_index(md: int, *, nowait: bool = False) -> dict[str, _IndexRecord]:
    """Read the size index; any problem at all yields an empty index (it is a cache).

    Raises:
        WouldWait: ``nowait`` and the index is not all in the page cache.

    """
    try:
        fd, s = _open_regular(INDEX_NAME, md)
    except OSError:
        return {}
    try:
        if s.st_size > _MAX_INDEX_BYTES:
            return {}
        # One read of one octet more than fstat said sees the whole file and its end.
        data = _pread(fd, s.st_size + 1, 0, nowait=nowait)
        if len(data) > s.st_size:  # it grew since: read the rest the slow way
            data += b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    except OSError:
        return {}
    finally:
        os.close(fd)
    head, _, body = data.partition(b"\n")
    parts = head.split(b" ")
    if len(parts) != 2 or parts[0] != _INDEX_MAGIC:
        return {}
    try:
        if int(parts[1], 16) != zlib.crc32(body):
            return {}
    except ValueError:
        return {}
    # One C-level pass over the whole text: this runs at every login.
    records = _INDEX_LINE.findall(body.decode("utf-8", "surrogateescape"))
    if len(records) != body.count(b"\n"):
        return {}
    return {key: (int(i), int(s), int(m), int(w)) for i, s, m, w, key in records}


def _index_of(
    entries: Sequence[_Entry], now_ns: int, index: dict[str, _IndexRecord] | None = None
) -> dict[str, _IndexRecord]:
    """The index worth recording for ``entries``: no racy or unrepresentable entries.

    A racy entry that ``index`` (the index read) already records as it is stays: it was
    put there by a correction (:meth:`MaildirMaildrop._heal`), and without it a wrong
    ``W=`` would be believed again.
    """
    racy_after = now_ns - _RACY_SECONDS * 1_000_000_000
    known = index or {}
    fresh: dict[str, _IndexRecord] = {}
    for e in entries:
        record = (e.ino, e.file_size, e.mtime_ns, e.wire)
        if not _indexable(e.key):
            continue
        if e.mtime_ns < racy_after or known.get(e.key) == record:
            fresh[e.key] = record
    return fresh


def _create_mode(dir_fd: int) -> int:
    """The mode of a file created in the folder ``dir_fd``: the folder's, without x bits."""
    return st.S_IMODE(os.fstat(dir_fd).st_mode) & 0o666


def _create_private(dir_fd: int, prefix: str) -> tuple[int, str]:
    """Create a new file ``<prefix><random>.tmp`` in ``dir_fd``, with the folder's mode.

    The name is unpredictable and the file new (``O_EXCL | O_NOFOLLOW | O_NONBLOCK``):
    nothing planted in the folder (a FIFO, a link) can be opened in its place.

    Raises:
        OSError: it cannot be created.

    """
    name = f"{prefix}{secrets.token_hex(8)}.tmp"
    fd = os.open(name, _CREATE, _create_mode(dir_fd), dir_fd=dir_fd)
    return fd, name


def _write_index(md: int, index: dict[str, _IndexRecord]) -> None:
    """Replace the index atomically (tmp + rename); failures are ignored (it is a cache)."""
    body = b"".join(
        b"%d %d %d %d %s\n" % (*record, os.fsencode(key)) for key, record in index.items()
    )
    data = b"%s %08x\n%s" % (_INDEX_MAGIC, zlib.crc32(body), body)
    try:
        fd, tmp = _create_private(md, f".{INDEX_NAME}.")
    except OSError:
        return
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        # rename() replaces whatever has the name, a planted link included, never follows.
        os.rename(tmp, INDEX_NAME, src_dir_fd=md, dst_dir_fd=md)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=md)


def _find_renamed(where: _Where, entry: _Entry) -> _Entry | None:
    """Find ``entry`` under another name (flags changed by another program), or None."""
    with _Dirs(_open_folder(where), where.path) as dirs:
        return _renamed_map(dirs).get(entry.key)


def _renamed_map(dirs: _Dirs) -> dict[str, _Entry]:
    """Map each key in ``cur/`` and ``new/`` now to its file (first one if duplicated)."""
    found: dict[str, _Entry] = {}
    for e in _scan(dirs):
        found.setdefault(e.key, e)
    return found


# ---------------------------------------------------------------------------- store


def _safe_hostname() -> str:
    """The host part of a delivery name: ``/`` and ``:`` escaped as the Maildir spec says."""
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


class _ListingCache:
    """The last listing of each Maildir in this process, valid while its folders stay.

    Any message added, removed or renamed in ``cur/`` or ``new/`` changes that folder's
    mtime, so an unchanged (inode, mtime) of both means an unchanged listing, and a login
    skips both directory scans, the ``lstat`` of every message and the index read.  As
    for the size index, a listing is remembered only when both folders are older than
    :data:`_RACY_SECONDS` (a change within the file system's timestamp granularity of the
    scan could otherwise go unseen).  A message rewritten in place under the same name
    keeps its old size here; RETR still checks the file (``same_file``) and refuses one
    whose wire size changed.  The listing also keeps the Maildir's lock-table byte
    (:attr:`_Listing.lock_offset`, from the folder's device and inode); only a Maildir
    folder replaced by another into which the same ``cur/`` and ``new/`` were moved,
    untouched, would keep an old byte, until a message comes or goes.
    """

    def __init__(self) -> None:
        self._known: dict[Path, tuple[tuple[int, int, int, int], _Listing]] = {}

    @staticmethod
    def _key(cur: os.stat_result, new: os.stat_result) -> tuple[int, int, int, int]:
        return cur.st_ino, cur.st_mtime_ns, new.st_ino, new.st_mtime_ns

    def recall(self, root: Path, cur: os.stat_result, new: os.stat_result) -> _Listing | None:
        """Return the remembered listing if the folders are unchanged."""
        known = self._known.get(root)
        if known is None or known[0] != self._key(cur, new):
            return None
        return known[1]

    def remember(self, root: Path, md: int, listing: _Listing) -> None:
        """Remember ``listing`` as the listing of ``root``, if its folders are not racy.

        ``md`` is the open Maildir folder.  A message (same inode, size and mtime) that
        the previous listing knew under another UIDL is logged: UIDLs must never change.
        """
        try:
            cur, new = _check_maildir(md)
        except (TemporaryBackendError, PermanentBackendError):
            return
        known = self._known.get(root)
        if known is not None:
            _guard_uids(root, known[1], listing)
        racy_after = time.time_ns() - _RACY_SECONDS * 1_000_000_000
        if max(cur.st_mtime_ns, new.st_mtime_ns) >= racy_after:
            self._known.pop(root, None)
            return
        if len(self._known) >= _LISTING_CACHE:
            self._known.clear()
        self._known[root] = (self._key(cur, new), listing)

    def forget(self, root: Path) -> None:
        """Drop what is remembered of ``root`` (its listing was found wrong)."""
        self._known.pop(root, None)


def _guard_uids(root: Path, old: _Listing, new: _Listing) -> None:
    """Log each message whose UIDL changed between two listings (the file is the same)."""
    before = {(e.ino, e.file_size, e.mtime_ns): e.uid for e in old.by_uid.values()}
    for e in new.by_uid.values():
        uid = before.get((e.ino, e.file_size, e.mtime_ns))
        if uid is not None and uid != e.uid:
            log.error("%s: the UIDL of %s/%s changed from %r to %r", root, e.folder, e.name,
                      uid, e.uid)


class _Listing:
    """A Maildir's messages as listed at an open; shared, and never changed.

    The sessions that open the Maildir while it stays the same share it (see
    :class:`_ListingCache`).  A session that finds a message renamed records the new
    name in a copy of its entry, in its own ``by_uid`` (:class:`MaildirMaildrop`), never
    here.
    """

    __slots__ = ("by_uid", "infos", "lock_offset")

    def __init__(self, entries: Sequence[_Entry]) -> None:
        #: Each entry by its UID.
        self.by_uid = {e.uid: e for e in entries}
        #: What a session lists, in delivery order.
        self.infos = tuple(MessageInfo(e.uid, e.wire) for e in entries)
        #: The lock-table byte of the Maildir, when its store locks with a table: found
        #: once (a ``stat`` of the folder and a hash), not at every login.
        self.lock_offset: int | None = None


class MaildirStore(TemplatedStore):
    """Users' Maildirs found by a path template.

    A ``MailStore``, a ``Deliverer`` and a ``MailboxInspector`` (storage/base.py).

    Args:
        template: the template of a user's Maildir; it, ``base``, ``quota``,
            ``chunk_size`` and ``session_locks`` as :class:`TemplatedStore` takes them.
        hostname: host part of delivered file names (default: this host's name).

    """

    kind = "maildir"

    def __init__(
        self,
        template: str,
        base: Path = Path(),
        *,
        quota: int | None = None,
        chunk_size: int = limits.READ_CHUNK,
        hostname: str | None = None,
        session_locks: SessionLocks | None = None,
    ) -> None:
        super().__init__(
            template, base, quota=quota, chunk_size=chunk_size, session_locks=session_locks
        )
        self._listings = _ListingCache()
        self.hostname = hostname if hostname is not None else _safe_hostname()
        #: Where each user's Maildir is, for a template whose paths depend on the user
        #: name only (below the mail root, not ``%h``): made once, not at every login.
        self._wheres: dict[str, _Where] = {}

    def _where(self, principal: Principal) -> _Where:
        """Where the user's Maildir is, below the mail root (for ``%h``, the user's home).

        Remembered per user name where only the name decides (not for ``%h``): a refused
        name is never remembered, and the same name always gives the same place.

        Raises:
            UnsafeUserName: the name could escape the mail root.
            NoHome: the template uses ``%h`` and the user has no usable home.

        """
        where = self._wheres.get(principal.username)
        if where is None:
            where = _Where(*self._located(principal))
            if where.root is self.mail_root:  # the user name alone decides
                if len(self._wheres) >= _WHERE_CACHE:
                    self._wheres.clear()
                self._wheres[principal.username] = where
        return where

    # -------------------------------------------------------------- MailStore

    async def open(self, principal: Principal) -> MaildirMaildrop:
        """Lock the user's Maildir, move ``new/`` to ``cur/``, and snapshot the listing.

        Raises:
            MaildropLocked: another session (any process on this host) holds it.
            TemporaryBackendError: the Maildir is missing or unreadable, the lock cannot
                be taken, or the user name is unsafe.
            PermanentBackendError: the Maildir's folder, ``cur/`` or ``new/`` is a
                symbolic link (or not a folder).

        """
        where = self._where(principal)
        dirs = _Dirs(_open_folder(where), where.path)
        try:
            cur, new = _check_maildir(dirs.md)
            with contextlib.suppress(WouldWait):
                known = self._open_known(where, dirs.md, cur, new)
                dirs.close()
                return known
            if max(cur.st_size, new.st_size) > _INLINE_SCAN_DIR_SIZE:
                dirs.close()
                return await in_thread(lambda: self._open_sync(where), _release_late)
            lock = take_lock(self.session_locks, where.path / LOCK_NAME, dirs.md)
        except BaseException:
            dirs.close()
            raise
        try:
            scanned = _scan(dirs, _FOLDERS[_move_new_to_cur(dirs)])
            index = _load_index(dirs.md, nowait=True)
            misses = _apply_index(scanned, index)
            listing: _Listing | None = None
            if sum(e.file_size for e in misses) <= _INLINE_MEASURE_BYTES:
                # Inline only while the page cache answers; else the rest in a thread.
                with contextlib.suppress(WouldWait):
                    listing = self._list(where, dirs=dirs, lock=lock, scanned=scanned,
                                         index=index, misses=misses, nowait=True)
        except WouldWait:  # the index is not in the page cache: list in the thread
            rescan: list[_Entry] | None = None
            index, misses, listing = {}, [], None
        except BaseException:
            dirs.close()
            lock.close()
            raise
        else:
            rescan = scanned
        if listing is not None:
            dirs.close()
            return MaildirMaildrop(where, listing, lock, self.chunk_size, self._listings)
        # The thread owns ``dirs`` (it closes them); a cancelled caller's lock is released
        # once it ends.
        listing = await in_thread(
            lambda: self._list_guarded(where, dirs=dirs, lock=lock, scanned=rescan,
                                       index=index, misses=misses),
            lambda _: lock.close(),
        )
        return MaildirMaildrop(where, listing, lock, self.chunk_size, self._listings)

    def _list(
        self,
        where: _Where,
        *,
        dirs: _Dirs,
        lock: SessionLock,
        scanned: list[_Entry],
        index: dict[str, _IndexRecord],
        misses: list[_Entry],
        nowait: bool = False,
    ) -> _Listing:
        """Finish the listing of an open (measure, index, UIDLs) and remember it.

        Raises:
            WouldWait: ``nowait`` and a file to measure is not in the page cache.

        """
        listing = _Listing(_finish_listing(dirs, scanned, index, misses, nowait=nowait))
        if isinstance(lock, TableLock):
            listing.lock_offset = lock.offset
        self._listings.remember(where.path, dirs.md, listing)
        return listing

    def _list_guarded(
        self,
        where: _Where,
        *,
        dirs: _Dirs,
        lock: SessionLock,
        scanned: list[_Entry] | None,
        index: dict[str, _IndexRecord],
        misses: list[_Entry],
    ) -> _Listing:
        """:meth:`_list` in a thread, which closes ``dirs``; the lock is released on failure.

        Without a scan (``scanned`` is None: reading the index inline would have waited),
        the listing is made here from the start.
        """
        try:
            if scanned is None:
                scanned = _scan(dirs, _FOLDERS[_move_new_to_cur(dirs)])
                index = _load_index(dirs.md)
                misses = _apply_index(scanned, index)
            return self._list(where, dirs=dirs, lock=lock, scanned=scanned, index=index,
                              misses=misses)
        except BaseException:
            lock.close()
            raise
        finally:
            dirs.close()

    def open_now(self, principal: Principal) -> MaildirMaildrop:
        """:meth:`open` without waiting, when the listing is the one remembered.

        The login fast path: an unchanged Maildir (see :class:`_ListingCache`) is locked
        and opened here, with no task or coroutine.

        Raises:
            WouldWait: the Maildir must be scanned: use :meth:`open`.
            MaildropLocked, TemporaryBackendError, PermanentBackendError: as :meth:`open`.

        """
        where = self._where(principal)
        md = _open_folder(where, PATH_FLAGS)  # only stat, fstat and open relative to it
        try:
            cur, new = _check_maildir(md)
            return self._open_known(where, md, cur, new)
        finally:
            os.close(md)

    def _open_known(
        self, where: _Where, md: int, cur: os.stat_result, new: os.stat_result
    ) -> MaildirMaildrop:
        """Lock and open ``where`` with its remembered listing, if it has one and it holds.

        Raises:
            WouldWait: a big Maildir, or nothing remembered for these ``cur/`` and
                ``new/`` (nothing is locked then).

        """
        if max(cur.st_size, new.st_size) > _INLINE_SCAN_DIR_SIZE:
            raise WouldWait  # big: opened in a thread, listing and all
        # The folders' stats were taken before the lock either way: asking the cache
        # first only spares a miss the lock and unlock.
        listed = self._listings.recall(where.path, cur, new)
        if listed is None:
            raise WouldWait
        locks, offset = self.session_locks, listed.lock_offset
        if offset is not None and isinstance(locks, LockTable):
            lock: SessionLock = locks.lock(offset)
        else:
            lock = take_lock(locks, where.path / LOCK_NAME, md)
        return MaildirMaildrop(where, listed, lock, self.chunk_size, self._listings)

    def _open_sync(self, where: _Where) -> MaildirMaildrop:
        """:meth:`open` all in one thread, for big Maildirs."""
        with _Dirs(_open_folder(where), where.path) as dirs:
            _check_maildir(dirs.md)
            lock = take_lock(self.session_locks, where.path / LOCK_NAME, dirs.md)
            try:
                scanned = _scan(dirs, _FOLDERS[_move_new_to_cur(dirs)])
                index = _load_index(dirs.md)
                entries = _finish_listing(dirs, scanned, index, _apply_index(scanned, index))
            except BaseException:
                lock.close()
                raise
        return MaildirMaildrop(where, _Listing(entries), lock, self.chunk_size, self._listings)

    # -------------------------------------------------------------- MailboxInspector

    async def stat(self, principal: Principal) -> MailboxStats:
        """Count the user's messages and wire octets without locking or changing anything.

        Raises:
            TemporaryBackendError: the Maildir is missing or unreadable (a folder of it
                a symbolic link included), or the name unsafe.

        """
        where = self._where(principal)
        try:
            return await in_thread(lambda: self._stat_sync(where))
        except PermanentBackendError as exc:  # the inspector's contract has one error
            raise TemporaryBackendError(str(exc)) from None

    @staticmethod
    def _stat_sync(where: _Where) -> MailboxStats:
        with _Dirs(_open_folder(where), where.path) as dirs:
            _check_maildir(dirs.md)
            entries = _fill_sizes(dirs, _scan(dirs), _load_index(dirs.md))
        oldest = min((e.mtime_ns for e in entries), default=None)
        return MailboxStats(
            count=len(entries),
            size=sum(e.wire for e in entries),
            oldest=None if oldest is None else oldest / 1e9,
        )

    # -------------------------------------------------------------- Deliverer

    async def deliver(self, principal: Principal, message: AsyncIterable[bytes]) -> None:
        """Deliver one message: ``tmp/`` -> fsync -> ``new/``, creating the Maildir if needed.

        The Maildir's folders are created (mode 0700) or opened below the mail root
        without following a link; the file is created in ``tmp/`` under an unpredictable
        name, ``O_EXCL | O_NOFOLLOW``, with the mode of ``tmp/`` (without x bits).

        Raises:
            QuotaExceeded: the user's wire size plus this message would exceed the quota.
            TemporaryBackendError: any I/O error (ENOSPC, EDQUOT, ...), a symbolic link
                in the Maildir's path, or an unsafe user name; nothing of the message is
                left behind.

        """
        where = self._where(principal)
        limit = quota_for(principal.attributes, self.quota)
        dirs = _make_maildir(where)
        try:
            used = await self._used(principal, limit)
            now = time.time()
            secs, usec = int(now), int((now % 1) * 1_000_000)
            unique = (
                f"{secs}.M{usec}P{os.getpid()}Q{next(_delivery_counter)}"
                f"R{secrets.token_hex(8)}.{self.hostname}"
            )
            try:
                tmp_dir = dirs["tmp"]
                fd = os.open(unique, _CREATE, _create_mode(tmp_dir), dir_fd=tmp_dir)
            except (OSError, PermanentBackendError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise TemporaryBackendError(
                    f"cannot create a delivery file: {reason}"
                ) from None
        except BaseException:
            dirs.close()
            raise
        try:
            counter = WireCounter()
            async for chunk in message:
                counter.feed(chunk)
                # Writes land in the page cache: cheap enough inline; the fsync below is
                # where the disk is waited for.
                write_all(fd, chunk)
        except BaseException as exc:
            os.close(fd)
            _unlink_quietly(unique, tmp_dir)
            dirs.close()
            if isinstance(exc, OSError):
                raise TemporaryBackendError(f"delivery failed: {exc.strerror}") from None
            raise
        if limit is not None and used + counter.wire_size > limit:
            os.close(fd)
            _unlink_quietly(unique, tmp_dir)
            dirs.close()
            raise QuotaExceeded("message exceeds the mailbox quota")
        final = f"{unique},S={counter.size},W={counter.virtual_size}"
        # Once the data is complete the delivery finishes even if the caller is cancelled
        # (the thread cannot be stopped): at worst the sender retries and the user gets a
        # duplicate, never a half message.  The thread closes ``dirs``.
        if limit is None:
            await in_thread(lambda: _finish_delivery(fd, dirs, unique, final))
            return
        # Under a quota, count and rename under the maildrop's quota lock (storage/quota.py),
        # so that concurrent deliveries never overshoot it by more than one message.
        await charge(
            where.path, counter.wire_size, limit,
            usage=lambda: self._stat_sync(where).size,
            commit=lambda: _finish_delivery(fd, dirs, unique, final),
            abandon=lambda: _abandon_delivery(fd, dirs, unique),
        )

    async def _used(self, principal: Principal, limit: int | None) -> int:
        """The user's wire octets when a quota applies (0 otherwise).

        Raises:
            QuotaExceeded: they already reach ``limit``.

        """
        if limit is None:
            return 0
        used = (await self.stat(principal)).size
        if used >= limit:
            raise QuotaExceeded("mailbox is full")
        return used


def _make_maildir(where: _Where) -> _Dirs:
    """Create (or open) the Maildir ``where`` and its ``tmp/ new/ cur/``; no link followed.

    Raises:
        TemporaryBackendError: a folder cannot be created or opened, or is a symbolic link.

    """
    try:
        fd = where.root.fd(create=True)
        for part in where.rel.split("/"):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=fd)
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            if fd != where.root.fd():
                os.close(fd)
            fd = nxt
    except OSError as exc:
        if is_link_refusal(exc):
            raise TemporaryBackendError(
                "cannot create the Maildir: a symbolic link or file is in its path"
            ) from None
        raise TemporaryBackendError(f"cannot create the Maildir: {exc.strerror}") from None
    dirs = _Dirs(fd, where.path)
    try:
        for folder in ("tmp", "new", "cur"):
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700, dir_fd=fd)
            dirs[folder]
    except OSError as exc:
        dirs.close()
        raise TemporaryBackendError(f"cannot create the Maildir: {exc.strerror}") from None
    except PermanentBackendError as exc:
        dirs.close()
        raise TemporaryBackendError(f"cannot deliver: {exc}") from None
    return dirs


def _finish_delivery(fd: int, dirs: _Dirs, unique: str, final: str) -> None:
    """Flush (fsync) and close the tmp file, rename it into ``new/``, fsync ``new/``.

    Closes ``dirs``.

    Raises:
        TemporaryBackendError: any step failed; the tmp file is removed.

    """
    with dirs:
        tmp_dir, new_dir = dirs["tmp"], dirs["new"]
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # ``final`` holds a random part: it names no existing file.
            os.rename(unique, final, src_dir_fd=tmp_dir, dst_dir_fd=new_dir)
        except OSError as exc:
            _unlink_quietly(unique, tmp_dir)
            raise TemporaryBackendError(f"delivery failed: {exc.strerror}") from None
        try:
            os.fsync(new_dir)
        except OSError as exc:
            # The message is complete and visible; only its durability is in doubt.
            # Saying "failed" would make the sender retry and duplicate it.
            del exc


def _abandon_delivery(fd: int, dirs: _Dirs, unique: str) -> None:
    """Close and remove a delivery's tmp file (refused over quota); closes ``dirs``."""
    with dirs:
        os.close(fd)
        _unlink_quietly(unique, dirs["tmp"])


def _unlink_quietly(name: str, dir_fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def _release_late(done: asyncio.Future[MaildirMaildrop]) -> None:
    """Release the lock of a maildrop opened for a caller that was cancelled meanwhile."""
    if not done.cancelled() and done.exception() is None:
        done.result().release()


# ---------------------------------------------------------------------------- maildrop


class MaildirMaildrop:
    """One session's locked view of a Maildir (a ``Maildrop``)."""

    def __init__(
        self,
        where: _Where,
        listing: _Listing,
        lock: SessionLock,
        chunk_size: int,
        listings: _ListingCache | None = None,
    ) -> None:
        #: The Maildir's path (for messages; files are reached through ``where``).
        self.root = where.path
        self._where = where
        #: The listing's entries; a renamed message's entry is replaced by a renamed copy.
        self._by_uid = dict(listing.by_uid)
        self._listing = listing.infos
        self._lock: SessionLock | None = lock
        self._chunk_size = chunk_size
        self._listings = listings
        self._commit: asyncio.Future[None] | None = None
        #: ``cur/`` and ``new/`` opened below the mail root (no link followed) at the
        #: session's first read, so that a message is one ``openat`` of its name
        #: (``O_NOFOLLOW``) and not an ``openat2`` of its whole path; None once closed.
        self._folders: dict[str, int] | None = {}

    def _open_message(self, folder: str, name: str) -> tuple[int, os.stat_result]:
        """:func:`_open_message` through the session's open ``folder``.

        Raises:
            FileNotFoundError: the file is gone.
            OSError: anything else, including a symbolic link (ELOOP).

        """
        folders = self._folders
        fd = None if folders is None else folders.get(folder)
        if fd is None:
            if folders is None or folder not in _FOLDER_NAMES:
                return _open_message(self._where, folder, name)
            try:
                fd = folders[folder] = self._where.root.open(
                    f"{self._where.rel}/{folder}", DIR_FLAGS
                )
            except OSError:
                return _open_message(self._where, folder, name)  # its error, as before
        return _checked_regular(os.open(name, _OPEN_READ, dir_fd=fd))

    def _close_folders(self) -> None:
        folders, self._folders = self._folders, None
        if folders:
            for fd in folders.values():
                os.close(fd)

    def listing(self) -> Sequence[MessageInfo]:
        """Return the messages as they were at open, in delivery order."""
        return self._listing

    def read(self, uid: str) -> AsyncIterator[bytes]:
        """Stream message ``uid`` CRLF-normalised; exactly its listed size in total.

        The iterator opens the file at its first step, so errors come before any octet.
        Use it with :func:`contextlib.aclosing` (or exhaust it) to release the file at once.

        Raises:
            KeyError: ``uid`` is not in the listing.
            MessageVanished: the file is gone (also under another name).
            TemporaryBackendError: it cannot be read, or changed since it was listed.

        """
        self._check_open()
        return _MessageReader(self._where, self._by_uid, uid, self._chunk_size, self._heal,
                              opener=self._open_message)

    def read_inline(self, uid: str) -> bytes | None:
        """Return message ``uid`` whole, read now, if it is small and cached; else ``None``.

        The fast path of RETR/TOP for the common small message: one open and one read on
        the event loop, no task and no iterator.  The read is ``preadv(RWF_NOWAIT)``: a
        file the page cache does not hold whole is left to :meth:`read` (``None``), so the
        event loop never waits for the disk.  Same checks and errors as :meth:`read`.
        """
        self._check_open()
        entry = self._by_uid[uid]
        if entry.file_size > _INLINE_READ_BYTES or not nowait_reads():
            return None
        # One read of file_size + 1 octets sees the whole file and its end at once, into
        # the thread's scratch buffer: no zero-filled buffer per message.
        reader = _MessageReader(self._where, self._by_uid, uid, entry.file_size + 1,
                                opener=self._open_message)
        reader.borrow(_scratch(entry.file_size + 1))
        try:
            if not reader.open():
                return None  # changed since listed: measured off the loop by read()
            parts: list[bytes] = []
            while not reader.done:
                part = reader.step_nowait()
                if part is None:
                    return None  # not (all) in the page cache: the task path reads it
                parts.append(part)
        except _SizeMismatch:
            self._heal_later(reader.entry)
            raise
        finally:
            reader.close()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _heal_later(self, entry: _Entry) -> None:
        """:meth:`_heal` in a thread (it reads the index and the file: not on the loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop here: nothing to block
            self._heal(entry)
            return
        done = loop.run_in_executor(None, self._heal, entry)
        done.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _heal(self, entry: _Entry) -> None:
        """Correct a listed size found wrong (a lying ``W=``, a stale index) from the file.

        The file is measured; if its wire size is not the listed one, the size index
        records the real size (so the next session lists it right, whatever the name
        says) and the remembered listing is dropped.  This session keeps its sizes: they
        were announced.  Runs under the session lock; failures change nothing.
        """
        where = self._where
        try:
            fd, s = _open_message(where, entry.folder, entry.name)
        except OSError:
            return
        try:
            wire = _measure_fd(fd, s.st_size).wire_size
        except OSError:
            return
        finally:
            os.close(fd)
        if wire == entry.wire:
            return
        log.warning("%s/%s/%s: listed as %d octets, the file has %d: size index corrected",
                    where.path, entry.folder, entry.name, entry.wire, wire)
        if self._listings is not None:
            self._listings.forget(where.path)
        try:
            with _Dirs(_open_folder(where), where.path) as dirs:
                index = _load_index(dirs.md)
                index[entry.key] = (s.st_ino, s.st_size, s.st_mtime_ns, wire)
                _write_index(dirs.md, index)
        except (TemporaryBackendError, PermanentBackendError):
            return

    async def commit(self, deleted: Collection[str]) -> None:
        """Unlink the messages ``deleted`` (UIDs of the listing; others are ignored).

        Raises:
            TemporaryBackendError: some could not be removed (the rest were).

        """
        targets = self._targets(deleted)
        if not targets:
            return
        if len(targets) <= _INLINE_COMMIT:
            _commit_sync(self._where, targets)
            return
        self._commit = asyncio.get_running_loop().run_in_executor(
            None, _commit_sync, self._where, targets
        )
        await asyncio.shield(self._commit)

    def commit_now(self, deleted: Collection[str]) -> None:
        """:meth:`commit` without waiting, for the few deletions it does inline anyway.

        Raises:
            WouldWait: too many to unlink on the event loop: use :meth:`commit`.
            TemporaryBackendError: some could not be removed (the rest were).

        """
        if not deleted:  # a QUIT that deletes nothing (most): only the check
            self._check_open()
            return
        targets = self._targets(deleted)
        if len(targets) > _INLINE_COMMIT:
            raise WouldWait
        if targets:
            _commit_sync(self._where, targets)

    def _targets(self, deleted: Collection[str]) -> list[_Entry]:
        self._check_open()
        return [self._by_uid[uid] for uid in set(deleted) if uid in self._by_uid]

    async def close(self) -> None:
        """Release the lock (after a commit still running in a thread).  Changes nothing."""
        lock, self._lock = self._lock, None
        self._close_folders()
        if lock is None:
            return
        if self._commit is not None and not self._commit.done():
            self._commit.add_done_callback(lambda _: lock.close())
            return
        lock.close()

    def release(self) -> None:
        """Release the lock synchronously (for cleanup paths without an event loop)."""
        lock, self._lock = self._lock, None
        self._close_folders()
        if lock is not None:
            lock.close()

    def _check_open(self) -> None:
        if self._lock is None:
            raise LocalProtocolError("maildrop used after close()")


def _commit_sync(where: _Where, targets: Sequence[_Entry]) -> None:
    """Unlink each target; gone counts as removed; collect and report other failures.

    Every unlink is relative to ``cur/`` or ``new/`` opened without following a link,
    so nothing outside the Maildir can be removed.  A target renamed by another program
    (same key, and the same inode, size and mtime: a rename keeps all three) is unlinked
    under its new name; a different file with the same key is left alone.
    """
    try:
        dirs = _Dirs(_open_folder(where), where.path)
    except PermanentBackendError as exc:
        raise TemporaryBackendError(f"no message could be removed: {exc}") from None
    failed = 0
    moved: dict[str, _Entry] | None = None
    with dirs:
        for e in targets:
            try:
                os.unlink(e.name, dir_fd=dirs[e.folder])
                continue
            except FileNotFoundError:
                pass
            except (OSError, PermanentBackendError, TemporaryBackendError):
                failed += 1
                continue
            try:
                if moved is None:
                    moved = _renamed_map(dirs)  # once: many may be gone (another deleter)
                other = moved.get(e.key)
                if other is not None and (other.ino, other.file_size, other.mtime_ns) == (
                    e.ino, e.file_size, e.mtime_ns
                ):
                    os.unlink(other.name, dir_fd=dirs[other.folder])
            except FileNotFoundError:
                pass
            except (OSError, PermanentBackendError, TemporaryBackendError):
                failed += 1
    if failed:
        raise TemporaryBackendError(f"{failed} of {len(targets)} messages could not be removed")


_scratches = threading.local()


def _scratch(size: int) -> memoryview:
    """``size`` octets of this thread's scratch buffer (for ``read_inline``'s one read)."""
    buffer: bytearray | None = getattr(_scratches, "buffer", None)
    if buffer is None:
        buffer = _scratches.buffer = bytearray(_INLINE_READ_BYTES + 1)
    return memoryview(buffer)[:size]


#: Opens a message file by folder and name: ``(fd, fstat)`` of a regular file.
_Opener = Callable[[str, str], tuple[int, os.stat_result]]
#: The folders a message may be in.
_FOLDER_NAMES = frozenset({"cur", "new"})


class _SizeMismatch(TemporaryBackendError):
    """A message's octets did not add up to its listed size."""


class _MessageReader:
    """The async iterator of :meth:`MaildirMaildrop.read` (see the module head)."""

    def __init__(
        self,
        where: _Where,
        by_uid: dict[str, _Entry],
        uid: str,
        chunk_size: int,
        heal: Callable[[_Entry], None] | None = None,
        *,
        opener: _Opener | None = None,
    ) -> None:
        self._where = where
        self._opener: _Opener = opener or partial(_open_message, where)
        #: The session's entries (a rename is recorded there, in a copy: see _Listing).
        self._by_uid = by_uid
        self._entry = entry = by_uid[uid]
        #: Raw octets the next read asks for (:meth:`pace`), at most ``_max_chunk``.
        self._chunk_size = self._max_chunk = chunk_size
        self._heal = heal
        self._fd = -1
        self._size = entry.file_size
        self._remaining = entry.wire
        self._normaliser = CrlfNormaliser()
        self._started = False
        self._done = False
        self._inflight: asyncio.Future[bytes] | None = None
        #: Where the next read starts (pread: no shared file position to go wrong).
        self._offset = 0
        self._buffer: bytearray | memoryview | None = None
        #: Whether ``_buffer`` is lent (:meth:`borrow`): what is read is copied out of it.
        self._borrowed = False

    def pace(self, size: int) -> None:
        """Read at most ``size`` octets a chunk from now on (at most the store's chunk size)."""
        size = min(max(size, 1), self._max_chunk)
        if size != self._chunk_size:
            self._chunk_size = size
            self.shrink()  # the next read makes a buffer of the new size

    def shrink(self) -> None:
        """Drop the read buffer (the peer stalls); the next read makes a new one."""
        if not self._borrowed:
            self._buffer = None

    def borrow(self, buffer: memoryview) -> None:
        """Read into ``buffer`` (``chunk_size`` octets), which stays its lender's."""
        self._buffer = buffer
        self._borrowed = True

    @property
    def entry(self) -> _Entry:
        """The entry being read (a renamed copy once the file was found renamed)."""
        return self._entry

    def __aiter__(self) -> _MessageReader:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            if not self._started:
                self._started = True
                if not self.open():
                    self._inflight = asyncio.get_running_loop().run_in_executor(
                        None, self.verify
                    )
                    await asyncio.shield(self._inflight)
                    self._inflight = None
            out: bytes | None = b""
            while not out and not self._done:
                # Page-cached data is read right here (a thread hop costs more than the
                # read); only a read that would wait for the disk goes to a thread.
                out = self.step_nowait()
                if out is None:
                    self._inflight = asyncio.get_running_loop().run_in_executor(None, self.step)
                    out = await asyncio.shield(self._inflight)
                    self._inflight = None
        except _SizeMismatch:
            self._done = True
            self.close()
            if self._heal is not None:
                heal, entry = self._heal, self._entry
                with contextlib.suppress(Exception):
                    await in_thread(lambda: heal(entry))
            raise
        except BaseException:
            self._done = True
            pending = self._inflight
            if pending is not None and not pending.done():
                pending.add_done_callback(self._close_late)
            else:
                self.close()
            raise
        if not out:
            raise StopAsyncIteration
        return out

    def open(self) -> bool:
        """Open the listed file (or its renamed self); True if it is still the same file.

        False: another file (rewritten, replaced) that :meth:`verify` must measure before
        anything is sent.
        """
        e = self._entry
        try:
            # One openat2 from the mail root: no link followed, nothing outside it.
            self._fd, s = self._opener(e.folder, e.name)
        except FileNotFoundError:
            try:
                moved = _find_renamed(self._where, e)
            except (TemporaryBackendError, PermanentBackendError):
                raise TemporaryBackendError("message unreadable: maildrop unavailable") from None
            if moved is None:
                raise MessageVanished("message file is gone") from None
            try:
                self._fd, s = self._opener(moved.folder, moved.name)
            except FileNotFoundError:
                raise MessageVanished("message file is gone") from None
            except OSError as exc:
                raise TemporaryBackendError(f"message unreadable: {exc.strerror}") from None
            e = self._entry = self._by_uid[e.uid] = e.copy()
            e.folder, e.name = moved.folder, moved.name
        except OSError as exc:
            raise TemporaryBackendError(f"message unreadable: {exc.strerror}") from None
        self._size = s.st_size
        return e.same_file(s)

    def verify(self) -> bytes:
        """Measure a file :meth:`open` found changed: it is sent only with the listed size.

        Reads the whole file (blocking): run it in a thread.  Returns ``b""``.

        Raises:
            TemporaryBackendError: it cannot be read, or its wire size is not the listed one.

        """
        try:
            wire = _measure_fd(self._fd, self._size).wire_size
        except OSError as exc:
            raise TemporaryBackendError(f"message unreadable: {exc.strerror}") from None
        if wire != self._entry.wire:
            raise _SizeMismatch("message changed since the maildrop was opened")
        return b""

    @property
    def done(self) -> bool:
        """True once the whole message has been returned (or reading failed)."""
        return self._done

    def _read_nowait(self) -> bytes | None:
        """The next chunk if the page cache has it (RWF_NOWAIT), else ``None``."""
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = bytearray(self._chunk_size)
        n = preadv_nowait(self._fd, buffer, self._offset)
        if n is None:
            return None
        if n == len(buffer) and not self._borrowed:
            # A full chunk is normalised straight from the buffer, without a copy out of
            # it: the normaliser returns a new object for a bytearray (bytearray methods
            # never return self), so the buffer is free for the next read.  The chunks
            # that go on are bytearrays, which every later step (stuffing, the core's
            # output, the transport) treats as bytes.
            return cast("bytes", buffer)
        return bytes(buffer[:n]) if self._borrowed else bytes(memoryview(buffer)[:n])

    def step(self) -> bytes:
        """Read and normalise the next chunk; b"" with ``done`` set at the end."""
        try:
            data = os.pread(self._fd, self._chunk_size, self._offset)
        except OSError as exc:
            raise TemporaryBackendError(f"message unreadable: {exc.strerror}") from None
        return self._consume(data)

    def step_nowait(self) -> bytes | None:
        """:meth:`step`, or ``None`` (changing nothing) if it would wait for the disk."""
        try:
            data = self._read_nowait()
        except OSError as exc:
            raise TemporaryBackendError(f"message unreadable: {exc.strerror}") from None
        return None if data is None else self._consume(data)

    def _consume(self, data: bytes) -> bytes:
        """Account for and normalise ``data``, the octets read at the current offset."""
        self._offset += len(data)
        if data:
            out = self._normaliser.feed(data)
        else:
            out = self._normaliser.finish()
            self._done = True
        if not self._done and len(data) < self._chunk_size and self._remaining == len(out):
            # A short read that completes the listed size: the end, without another read.
            out += self._normaliser.finish()
            self._done = True
        if len(out) > self._remaining:
            raise _SizeMismatch("message grew while being sent")
        self._remaining -= len(out)
        if self._done:
            self.close()
            if self._remaining:
                raise _SizeMismatch("message shrank while being sent")
        return out

    def close(self) -> None:
        """Release the file; idempotent."""
        self._done = True
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _close_late(self, done: asyncio.Future[bytes]) -> None:
        if not done.cancelled():
            done.exception()  # retrieved: the reader was abandoned
        self.close()

    async def aclose(self) -> None:
        """Stop early (TOP, a dropped client) and release the file."""
        self._done = True
        pending = self._inflight
        if pending is not None and not pending.done():
            pending.add_done_callback(self._close_late)
            return
        self.close()

    def __del__(self) -> None:
        if self._inflight is None or self._inflight.done():
            self.close()
