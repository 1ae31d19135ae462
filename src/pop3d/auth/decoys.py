"""Stand-ins for users that do not exist: same bytes, same work, from one shared key.

An attacker probing names learns who exists from anything that differs between a real
user and a stranger: the SCRAM salt and iteration count in the server-first message, the
time the first step of a challenge mechanism takes, the time a refused password takes.
This module makes the stranger's side of each of those:

* **A secret key** every worker shares and that survives a restart
  (:func:`load_or_create_key`): 32 random octets in a file of mode 0600, created once.
  Per-process random keys would give a stranger a different fake salt from each worker
  (and after each restart) while a real user's is fixed: an oracle.
* **Decoy secrets** (:class:`Decoys`): a stranger's SCRAM salt and iteration count, and
  a password its decoy SCRAM keys and CRAM-MD5 context are derived from, all
  HMAC-SHA-256 of the key and the name: the same on every worker, every time.  The
  iteration count and salt length are drawn (keyed by the name) from the shapes the real
  users' SCRAM secrets have, so a stranger's challenge looks like a real user's.  The
  derivation is *done* (PBKDF2, MD5 blocks), as for a real user: the first step costs
  the same.
* Nothing here decides *whether* a user exists; the authenticator does, and then asks
  for the decoy or the real thing by the same path.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from pop3d.auth import schemes
from pop3d.errors import ConfigError

__all__ = ["KEY_LEN", "Decoys", "load_or_create_key"]

log = logging.getLogger(__name__)

#: Octets of the shared key (HMAC-SHA-256's block-size-friendly 256 bits).
KEY_LEN: Final = 32

#: A SCRAM secret's shape: (iteration count, salt length).  PLAIN users get this one.
PLAIN_SCRAM_SHAPE: Final = (schemes.SCRAM_ITERATIONS, 16)


def load_or_create_key(path: Path) -> bytes:
    """Read the shared secret key at ``path``; create it (mode 0600) if it does not exist.

    Creation is race-free across workers started at once: the key is written and
    fsynced in a temporary file in the same folder, then ``link()``ed to ``path``, which
    fails with EEXIST if another process was first (then its key is read).  So no process
    ever reads a half-written key, and all end up with the same one.

    Raises:
        ConfigError: the key cannot be read or created, or is not :data:`KEY_LEN` octets.

    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(KEY_LEN)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise ConfigError(f"[auth] key_file {path}: cannot create: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_key(path)  # another worker won the race: use its key
        except OSError as exc:
            raise ConfigError(f"[auth] key_file {path}: cannot create: {exc.strerror}") from None
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        log.info("%s: created the authentication key", path)
        return key
    finally:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()


def _read_key(path: Path) -> bytes:
    """Read the key.  Raises FileNotFoundError (absent) or ConfigError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"[auth] key_file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        data = os.read(fd, KEY_LEN + 1)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or len(data) != KEY_LEN:
        raise ConfigError(f"[auth] key_file {path}: not a {KEY_LEN}-octet key file")
    if st.st_mode & 0o077:
        log.warning("%s: the authentication key is readable by others (chmod 600)", path)
    return data


class Decoys:
    """Deterministic, keyed decoy secrets for names that have no usable secret."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "Decoys(<key>)"

    def _prf(self, label: bytes, username: str) -> bytes:
        return hmac.digest(self._key, label + b"\0" + username.encode("utf-8"), "sha512")

    def password(self, username: str) -> bytes:
        """A password nobody knows, stable per name (what decoy secrets derive from)."""
        return self._prf(b"pop3d decoy password", username)[:32]

    def scram_shape(self, username: str, shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """The (iterations, salt length) a stranger's SCRAM secret has: one of ``shapes``.

        ``shapes`` lists the real users' shapes (with repeats, so common ones are drawn
        more often), in a fixed order; empty: :data:`PLAIN_SCRAM_SHAPE`.
        """
        if not shapes:
            return PLAIN_SCRAM_SHAPE
        pick = int.from_bytes(self._prf(b"pop3d decoy scram shape", username)[:8], "big")
        return shapes[pick % len(shapes)]

    def scram_salt(self, username: str, length: int) -> bytes:
        """A stranger's SCRAM salt of ``length`` octets.

        For PLAIN's shape it is :func:`.schemes.scram_salt`, the very function real users
        with PLAIN passwords get their salts from.
        """
        if length == PLAIN_SCRAM_SHAPE[1]:
            return schemes.scram_salt(self._key, username)
        return self._prf(b"pop3d decoy scram salt", username)[: max(1, min(length, 64))]

    def scram_secret(
        self, username: str, shapes: Sequence[tuple[int, int]]
    ) -> schemes.ScramSecret:
        """A stranger's SCRAM secret: a real derivation (one PBKDF2), matching no proof."""
        iterations, salt_len = self.scram_shape(username, shapes)
        salt = self.scram_salt(username, salt_len)
        return schemes.ScramSecret.derive(self.password(username), salt, iterations)

    def burn_scram(self, username: str, salt: bytes, iterations: int) -> None:
        """Spend one SCRAM derivation's work (for a stored secret that needs none)."""
        schemes.ScramSecret.derive(self.password(username), salt, iterations)

    def cram_md5_context(self, username: str) -> bytes:
        """A stranger's CRAM-MD5 context, computed as a PLAIN user's is."""
        return schemes.cram_md5_context(self.password(username))
