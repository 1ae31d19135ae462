"""RFC 2449 LOGIN-DELAY: a minimum time between two logins of one user.

Clients that poll every few seconds cost a password check and a maildrop scan each time.
With ``[auth] login_delay = N`` the server advertises ``LOGIN-DELAY N`` in CAPA and answers
a login that comes less than N seconds after the user's last *allowed* login with
``-ERR [LOGIN-DELAY]`` (a refused attempt does not push the next one further away).

The refusal comes only after good credentials, so it tells nothing to someone guessing
names or passwords (GNU Mailutils does the same).  When each user last logged in is the
modification time of one empty file per user in a folder shared by every pop3d process
(workers included): a ``stat`` to check and a ``touch`` to record, no database and no
lock, and the session lock already keeps two logins of one maildrop apart.  The files
are named by a hash of the user name, so any name makes a safe file name.

The delay sheds load; it is not a security boundary.  If the folder cannot be read or
written, the login is allowed and a warning logged, rather than locking every user out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("pop3d.login_delay")


class LoginDelay:
    """At least ``seconds`` between two allowed logins of a user, across processes.

    Args:
        seconds: the minimum delay; positive.
        folder: where the per-user stamp files live (created, mode 0700, when missing;
            with its parents).
        clock: wall-clock seconds, as file times are; tests pass their own.

    """

    def __init__(
        self, seconds: int, folder: Path, clock: Callable[[], float] = time.time
    ) -> None:
        if seconds <= 0:
            raise ValueError("the login delay must be positive")
        self.seconds = seconds
        self.folder = folder
        self._clock = clock

    def _stamp_of(self, username: str) -> str:
        digest = hashlib.blake2b(username.encode("utf-8", "surrogateescape"), digest_size=16)
        return f"{os.fspath(self.folder)}/{digest.hexdigest()}"

    def too_soon(self, username: str) -> bool:
        """Whether ``username``'s last allowed login was less than :attr:`seconds` ago.

        A stamp in the future (the clock was set back) does not count: the login is
        allowed and its stamp then puts the time right.
        """
        try:
            last = os.stat(self._stamp_of(username)).st_mtime  # noqa: PTH116 (login path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("login delay not checked for %r: %s", username, exc.strerror)
            return False
        return 0 <= self._clock() - last < self.seconds

    def record(self, username: str) -> None:
        """Note that ``username`` logged in now."""
        path = self._stamp_of(username)
        now = self._clock()
        try:
            try:
                os.utime(path, (now, now))
            except FileNotFoundError:
                self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.close(fd)
                os.utime(path, (now, now))
        except OSError as exc:
            log.warning("login of %r not recorded for the login delay: %s", username, exc)
