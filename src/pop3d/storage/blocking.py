"""Blocking file work of the on-disk stores (Maildir, mbox), and how it leaves the loop.

Rules of this file:

* :func:`in_thread` is the one way a store runs a blocking step in the default executor.
  A thread cannot be stopped: a cancelled caller gets its ``CancelledError`` at once,
  the step still runs to the end, and a ``late`` callback then undoes what it left (a
  lock, an open maildrop).  Its late failure is retrieved, never reported as "never
  retrieved".
* The system-call loops (:func:`write_all`, :func:`fsync_dir`) raise ``OSError`` as it
  comes; each store maps it to its own :class:`TemporaryBackendError` text.
* :func:`pread_nowait` is the one read a store does on the event loop: it returns only
  what the page cache holds (``preadv(RWF_NOWAIT)``), ``None`` where the disk would be
  waited for, or where the kernel or file system cannot tell (tmpfs answers
  ``EOPNOTSUPP``: every read of it then goes to a thread, correct but slower).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["fsync_dir", "in_thread", "pread_nowait", "write_all"]

_T = TypeVar("_T")


async def in_thread(
    func: Callable[[], _T], late: Callable[[asyncio.Future[_T]], None] | None = None
) -> _T:
    """Run ``func`` in the default executor; if the caller is cancelled it still finishes.

    ``late`` is then called with its future, to undo what it left (a session lock).
    """
    future = asyncio.get_running_loop().run_in_executor(None, func)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def _finished(done: asyncio.Future[_T]) -> None:
            if not done.cancelled():
                done.exception()  # retrieved: a late failure is nobody's to report
            if late is not None:
                late(done)

        future.add_done_callback(_finished)
        raise


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` at the current offset of ``fd`` (short writes continued)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    """Make a rename or a creation in the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Whether ``preadv(..., RWF_NOWAIT)`` works here; cleared at the first refusal.
_nowait = hasattr(os, "RWF_NOWAIT")


def nowait_reads() -> bool:
    """Whether reads from the page cache without waiting (:func:`preadv_nowait`) work here."""
    return _nowait


def preadv_nowait(fd: int, buffer: bytearray | memoryview, offset: int) -> int | None:
    """Fill ``buffer`` from ``offset`` if the page cache can answer at once, else ``None``.

    Returns the octets read (short at the end of the file, or where only part of the
    range is cached).  ``None`` also where the kernel or the file system cannot tell (an
    old kernel, tmpfs): the caller reads in a thread.

    Raises:
        OSError: the read failed for another reason.

    """
    global _nowait  # noqa: PLW0603 (learned once per process)
    if not _nowait:
        return None
    try:
        return os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            _nowait = False  # a kernel without RWF_NOWAIT
            return None
        if exc.errno == errno.EOPNOTSUPP:
            return None  # this file system (tmpfs) cannot tell: the caller uses a thread
        raise


def pread_nowait(fd: int, size: int, offset: int) -> bytes | None:
    """Read up to ``size`` octets at ``offset`` if the page cache has them all, else ``None``.

    A short read that is not the end of the file (part of the range is cached) is
    ``None`` too, so a caller never blocks and never has to piece reads together.

    Raises:
        OSError: the read failed for another reason.

    """
    buffer = bytearray(size)
    n = preadv_nowait(fd, buffer, offset)
    if n is None:
        return None
    if n < size and n < os.fstat(fd).st_size - offset:
        return None
    return bytes(buffer) if n == size else bytes(memoryview(buffer)[:n])
