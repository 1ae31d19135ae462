"""The session lock: one POP3 session per maildrop, shared by the Maildir and mbox stores.

Rules of this file:

* The lock is ``flock(LOCK_EX | LOCK_NB)`` on a lock file the store names (``pop3d.lock``
  in a Maildir, ``.<name>.pop3d`` beside an mbox).  A BSD lock belongs to the open file
  description, so two sessions conflict even in one process, workers in different
  processes conflict, and the lock dies with its holder (kill -9 included).  It is local
  to the host.
* The lock file is opened with ``O_NOFOLLOW``: a symlink planted in its place is refused,
  never followed.
* A busy lock is :class:`MaildropLocked` (``-ERR [IN-USE]``) at once, never waited for:
  the other session may last for minutes.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from pop3d.errors import MaildropLocked, TemporaryBackendError

__all__ = ["session_lock"]


def session_lock(lock_path: Path) -> IO[bytes]:
    """Take the session lock on ``lock_path`` (created if needed); held until closed.

    Raises:
        MaildropLocked: another open file description holds it.
        TemporaryBackendError: the lock file cannot be created or locked.

    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise TemporaryBackendError(f"cannot open the session lock: {exc.strerror}") from None
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
