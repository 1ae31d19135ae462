"""Open paths below a mail root without following a symbolic link or leaving the root.

Where users own their mail folders, everything below the storage template's mail root
(:func:`pop3d.storage.template.mail_root`) is attacker-controlled, and pop3d usually
runs as root: a ``cur -> /etc`` symlink must not turn RETR into a way to read
``/etc/shadow``, nor DELE + QUIT into a way to unlink it.

Rules of this file:

* **The root** (:class:`MailRoot`) is the operator's folder.  It is opened once per
  process (following links: ``/var/mail`` may be one) and kept; every path below it is
  opened *relative to that descriptor*.
* **Below the root nothing is followed.**  :func:`open_beneath` opens ``a/b/c`` with
  ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` (Linux 5.6+):
  one system call that fails with ``ELOOP`` at a symbolic link in any component, the last
  one included, and with ``EXDEV`` on any way out of the root.  Where ``openat2`` is
  missing (older kernels, seccomp filters) it walks the components one ``openat(...,
  O_DIRECTORY | O_NOFOLLOW)`` at a time, which refuses the same links at a few more
  system calls.  Relative paths given here never hold ``..`` or empty components (the
  template and user-name checks make sure, and :func:`open_beneath` refuses them too).
* Callers then work with ``dir_fd=`` operations on the descriptors they got (``os.open``,
  ``os.stat(..., follow_symlinks=False)``, ``os.rename(src_dir_fd=, dst_dir_fd=)``,
  ``os.unlink(dir_fd=)``, ``os.scandir(fd)``), so no path is ever resolved twice.
* Errors are ``OSError`` as the kernel gives them; :func:`is_link_refusal` tells a planted
  symbolic link (or escape) from an ordinary failure, for the stores' messages.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import threading
from pathlib import Path

__all__ = ["DIR_FLAGS", "PATH_FLAGS", "MailRoot", "is_link_refusal", "open_beneath"]

#: Flags of a folder opened below the root (readable, so ``scandir`` and ``fsync`` work).
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: Flags of a folder opened only as the base of ``dir_fd=`` calls and ``fstat`` (not
#: read): the kernel opens no file for it, a little cheaper than :data:`DIR_FLAGS`.
PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
#: ``openat2`` on the 64-bit Linux ABIs (the number is the same on x86_64 and aarch64).
_SYS_OPENAT2 = 437
#: Flags :func:`open_beneath` always adds.
_ALWAYS = os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    """``struct open_how`` (linux/openat2.h)."""

    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64))


def _load_syscall() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        # PyDLL: the call keeps the GIL.  ``openat2`` of a cached path takes a few µs;
        # releasing and taking back the GIL around it is not worth it on the event loop.
        libc = ctypes.PyDLL(None, use_errno=True)
        func = libc.syscall
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_long
    # No ``argtypes``: with them every call converts each argument through a Python-level
    # ``from_param`` call.  Without, the number, the descriptor and the size go as C ints
    # (small; libffi sign-extends them to the registers' 64 bits), the path as a
    # ``char *`` to the bytes and the ``open_how`` as a kept pointer object.
    return func


_syscall = _load_syscall()
#: Whether ``openat2`` is used; cleared at its first ENOSYS/EPERM (seccomp) refusal.
_openat2 = _syscall is not None
_HOW_SIZE = ctypes.sizeof(_OpenHow)
#: A pointer to a kept ``open_how`` per (flags, mode): built once, not per open.
_hows: dict[tuple[int, int], ctypes._Pointer[_OpenHow]] = {}


def _how(flags: int, mode: int) -> ctypes._Pointer[_OpenHow]:
    """A pointer to a new kept ``open_how`` for ``flags`` and ``mode``."""
    how = _hows[flags, mode] = ctypes.pointer(_OpenHow(flags, mode, _RESOLVE))
    return how


def is_link_refusal(exc: OSError) -> bool:
    """Whether ``exc`` is :func:`open_beneath` refusing a symbolic link or an escape."""
    return exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR)


def open_beneath(dir_fd: int, rel: str, flags: int, mode: int = 0o600) -> int:
    """Open ``rel`` (``a/b/c``) relative to the folder ``dir_fd``, following no link.

    ``O_NOFOLLOW`` and ``O_CLOEXEC`` are always added.

    Raises:
        OSError: as ``open``; ``ELOOP`` (or ``ENOTDIR``) where a component is a symbolic
            link, ``EXDEV`` on an escape, ``EINVAL`` for a path with ``..`` or ``/``-led.

    """
    global _openat2  # noqa: PLW0603 (learned once per process)
    if not rel or rel[0] == "/" or (".." in rel and ".." in rel.split("/")):
        raise OSError(errno.EINVAL, "not a path below the mail root", rel)
    flags |= _ALWAYS
    if _openat2 and _syscall is not None:
        key = (flags, mode if flags & os.O_CREAT else 0)
        how = _hows.get(key)
        if how is None:
            how = _how(*key)
        fd: int = _syscall(_SYS_OPENAT2, dir_fd, rel.encode("utf-8", "surrogateescape"), how,
                           _HOW_SIZE)
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM, errno.E2BIG):
            raise OSError(err, os.strerror(err), rel)
        _openat2 = False
    return _walk(dir_fd, rel, flags, mode)


def _walk(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    """:func:`open_beneath` one component at a time (no ``openat2``)."""
    *folders, last = [part for part in rel.split("/") if part]
    fd = dir_fd
    try:
        for part in folders:
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = nxt
        return os.open(last, flags, mode, dir_fd=fd)
    finally:
        if fd != dir_fd:
            os.close(fd)


class MailRoot:
    """The mail root of a store: opened once per process, the base of every path below it.

    Args:
        path: the root folder (the template's static folder, see
            :func:`pop3d.storage.template.mail_root`, or a user's home).
        may_create: whether :meth:`fd` may create it (not a user's home: that is the
            user database's business).

    """

    def __init__(self, path: Path, *, may_create: bool = True) -> None:
        #: The folder.
        self.path = path
        self.may_create = may_create
        self._fd = -1
        self._guard = threading.Lock()

    def fd(self, *, create: bool = False) -> int:
        """The root's descriptor, opened at the first use (created if ``create``).

        Raises:
            OSError: the root cannot be opened (missing, not a folder, no permission).

        """
        fd = self._fd
        if fd >= 0:
            return fd
        with self._guard:
            if self._fd < 0:
                if create and self.may_create:
                    self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return self._fd

    def reopen(self) -> None:
        """Forget the descriptor (the root was replaced); the next :meth:`fd` opens it again."""
        with self._guard:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def open(self, rel: str, flags: int, mode: int = 0o600) -> int:
        """:func:`open_beneath` ``rel`` below the root; once more after a replaced root.

        Raises:
            OSError: see :func:`open_beneath` and :meth:`fd`.

        """
        try:
            return open_beneath(self.fd(), rel, flags, mode)
        except FileNotFoundError:
            if self._root_is_current():
                raise
            self.reopen()
            return open_beneath(self.fd(), rel, flags, mode)

    def _root_is_current(self) -> bool:
        """Whether the kept descriptor is still the folder at :attr:`path`."""
        try:
            kept = os.fstat(self._fd)
            now = self.path.stat()
        except OSError:
            return False
        return (kept.st_dev, kept.st_ino) == (now.st_dev, now.st_ino)

    def __del__(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def __repr__(self) -> str:
        return f"<MailRoot {os.fspath(self.path)!r}>"
