"""Dovecot passwd-file backend: users from ``user:password[:uid:gid:gecos:home:shell:extra]``.

The format (Dovecot's passwd-file, compatible with /etc/passwd):

* one user a line; empty lines and lines starting with ``#`` are ignored;
* the password is ``{SCHEME}data`` or a bare crypt(3) string (see :mod:`.schemes`); an
  empty password never matches, unless the ``nopassword`` extra field is set (Dovecot:
  "If you want to allow all passwords, use an empty password and this field");
* extra fields are space-separated ``key=value`` (a bare ``key`` means ``key=``, as in
  Dovecot); they may contain ``:``.  They become :attr:`Principal.attributes`, with the
  ``userdb_`` prefix stripped (a ``userdb_x`` beats a plain ``x``), plus ``uid``, ``gid``
  and ``home`` from their columns when set.  ``nologin`` refuses the login even with the
  right password;
* user names match exactly (case-sensitive, as Dovecot's default); the first line of a
  name wins, as in Dovecot.

Rules of this module:

* A malformed line is skipped with a warning naming the file and line number, never the
  line itself (it holds a password).  Nothing here logs a password or a hash.
* The file is re-read when ``(st_mtime_ns, st_size, st_ino)`` changes, checked at most once
  per ``check_interval``.  A file that vanishes or cannot be read keeps the last good table
  (and logs an error once); a missing file at start-up is a :class:`ConfigError`.
* No enumeration (:mod:`.decoys`): every refusal -- unknown user, wrong password,
  ``nologin`` -- costs one verification of each *cost class* of hash the file holds
  (:func:`.schemes.cost_class`: PLAIN/digests, ``$6$``, ``$argon2id$m=..``...): the
  user's own hash, then a dummy verification of a stored hash of every other class; an
  unknown user gets dummies of all of them.  So a stranger costs what an ARGON2ID user
  among PLAIN users costs, and the other way round.  A right password is answered as soon
  as its own hash matched (a success shows anyway).  SCRAM-SHA-256 and CRAM-MD5 secrets
  are never ``None``: a user without one gets a decoy (keyed, stable across workers and
  restarts, derived with the same work as a real one), so a challenge says nothing either.
* Slow schemes (crypt, bcrypt, argon2, PBKDF2, SCRAM) run in a small thread pool of our
  own, at most ``2 * workers`` submitted at once (the rest wait in asyncio, where a client
  that leaves costs nothing); fast ones (PLAIN, SHA*) run inline, since a thread hop would
  cost more than the hash.
* :func:`update_user` and :func:`list_users` are the administration side (``pop3d user``):
  the file is rewritten atomically (temporary file, fsync, rename), every other line kept
  byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pop3d import process
from pop3d.auth import schemes
from pop3d.auth.decoys import PLAIN_SCRAM_SHAPE, Decoys, load_or_create_key
from pop3d.auth.verdict import Refused, Unfinished, Verdict
from pop3d.config import AuthConfig
from pop3d.errors import ConfigError, TemporaryBackendError, WouldWait
from pop3d.protocol import limits
from pop3d.protocol.values import Principal

__all__ = [
    "PasswdFileAuthenticator",
    "UserInfo",
    "list_users",
    "parse_passwd_file",
    "update_user",
    "valid_username",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The shared key's file name next to the passwd-file, unless ``[auth] key_file`` says.
DEFAULT_KEY_FILE = "pop3d-auth.key"

#: Default interval between two ``stat()`` checks of the file (seconds).
DEFAULT_CHECK_INTERVAL = 1.0

#: Characters that never occur in a user name we accept: field and line separators,
#: path separators (the name becomes a folder through ``%u``), and the comment mark.
_FORBIDDEN = frozenset(":/\\")


def valid_username(name: str) -> bool:
    """Whether ``name`` can be a user name (else it never matches and cannot be added).

    1 to :data:`~pop3d.protocol.limits.MAX_USERNAME` octets of printable UTF-8; no ``:``,
    ``/``, backslash, white space or control
    characters; not starting with ``#`` or ``.`` (``%u`` makes it a folder name).
    """
    return (
        0 < len(name.encode("utf-8", "surrogatepass")) <= limits.MAX_USERNAME
        and name.isprintable()
        and not any(c in _FORBIDDEN or c.isspace() for c in name)
        and not name.startswith(("#", "."))
    )


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One parsed line of the file."""

    username: str
    #: The stored password (``{SCHEME}data``); ``""`` for none.  Kept out of ``repr``.
    password: str = field(repr=False)
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: Any password is accepted (empty password field plus ``nopassword``).
    nopassword: bool = field(init=False, repr=False, compare=False)
    #: The user may not log in, whatever the password (Dovecot's ``nologin``).
    nologin: bool = field(init=False, repr=False, compare=False)
    #: The :class:`Principal` for this user (made once per table, not per login).
    principal: Principal = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Derived once when the file is read: a login reads them as plain attributes.
        set_ = object.__setattr__
        set_(self, "nopassword", not self.password and "nopassword" in self.attributes)
        set_(self, "nologin", "nologin" in self.attributes)
        set_(self, "principal", Principal(self.username, self.attributes))


def _parse_line(line: str) -> UserRecord | None:
    fields = line.split(":")
    if len(fields) < 2 or not valid_username(fields[0]):
        return None
    username, password = fields[0], fields[1]
    attributes: dict[str, str] = {}
    for key, index in (("uid", 2), ("gid", 3), ("home", 5)):
        if len(fields) > index and fields[index]:
            attributes[key] = fields[index]
    if len(fields) > 7:  # extra fields may hold ':'
        userdb: dict[str, str] = {}
        for item in ":".join(fields[7:]).split():
            key, _, value = item.partition("=")
            if not key:
                return None
            if key.startswith("userdb_") and len(key) > len("userdb_"):
                userdb[key.removeprefix("userdb_")] = value
            else:
                attributes[key] = value
        attributes.update(userdb)
    return UserRecord(username, password, attributes)


@dataclass(frozen=True, slots=True)
class _Table:
    users: Mapping[str, UserRecord]
    #: (st_mtime_ns, st_size, st_ino) of what was read.
    signature: tuple[int, int, int]
    #: One stored hash per cost class, (class, hash), for dummy verifications; a file
    #: without any gets the default dummy (``None``: :func:`.schemes.dummy_verify`'s).
    dummies: tuple[tuple[str, str | None], ...]
    #: The (iterations, salt length) of every user's SCRAM secret, sorted (decoy shapes).
    scram_shapes: tuple[tuple[int, int], ...]


def parse_passwd_file(data: bytes, source: str = "passwd-file") -> dict[str, UserRecord]:
    """Parse a passwd-file's content; malformed lines are skipped with a warning.

    Args:
        data: the file's octets (UTF-8).
        source: how log messages name the file.

    Returns:
        The users by name (the first line of a name wins).

    """
    users: dict[str, UserRecord] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw_line = raw.removesuffix(b"\r")
        if not raw_line.strip() or raw_line.startswith(b"#"):
            continue
        try:
            record = _parse_line(raw_line.decode("utf-8"))
        except UnicodeDecodeError:
            record = None
        if record is None:
            log.warning("%s line %d: malformed entry skipped", source, number)
            continue
        if record.username in users:
            log.warning(
                "%s line %d: user %s exists more than once; the first entry wins",
                source, number, record.username,
            )
            continue
        if record.password and not schemes.is_supported(record.password):
            log.warning(
                "%s line %d: user %s: unsupported or malformed {%s} password; "
                "logins will fail", source, number, record.username,
                schemes.scheme_of(record.password),
            )
        users[record.username] = record
    return users


def _dummies(users: Mapping[str, UserRecord]) -> tuple[tuple[str, str | None], ...]:
    """The first stored hash of each cost class, slow classes first ("" classes left out)."""
    found: dict[str, str] = {}
    for u in users.values():
        if u.password:
            found.setdefault(schemes.cost_class(u.password), u.password)
    found.pop("", None)
    if not found:
        return (("default", None),)
    return tuple(sorted(found.items(), key=lambda item: item[0] == "fast"))


def _scram_shapes(users: Mapping[str, UserRecord]) -> tuple[tuple[int, int], ...]:
    shapes = []
    for u in users.values():
        if not u.password:
            continue
        if schemes.plain_secret(u.password) is not None:
            shapes.append(PLAIN_SCRAM_SHAPE)
        elif schemes.scheme_of(u.password) == "SCRAM-SHA-256":
            secret = schemes.scram_sha256_secret(u.password)
            if secret is not None:
                shapes.append((secret.iterations, len(secret.salt)))
    return tuple(sorted(shapes))


def _read_table(path: Path) -> _Table:
    """Read and parse ``path``.  Raises OSError."""
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    users = parse_passwd_file(data, str(path))
    return _Table(
        users, (st.st_mtime_ns, st.st_size, st.st_ino), _dummies(users), _scram_shapes(users)
    )


class PasswdFileAuthenticator:
    """An :class:`~pop3d.auth.base.Authenticator` over a Dovecot passwd-file."""

    def __init__(
        self,
        path: Path,
        *,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        workers: int | None = None,
        scram_salt_key: bytes | None = None,
        key_file: Path | None = None,
    ) -> None:
        """Load ``path`` now.

        Args:
            path: the passwd-file.
            check_interval: seconds between two checks for a changed file (0: every lookup).
            workers: threads verifying slow hashes (default: one per CPU this process may
                run on, :func:`pop3d.process.usable_cpus`).
            scram_salt_key: the secret key that SCRAM salts of PLAIN passwords and every
                decoy are derived from (:mod:`.decoys`).
            key_file: where that key is kept (read, or created once, by
                :func:`.decoys.load_or_create_key`, at the first CRAM-MD5 or SCRAM
                login) when ``scram_salt_key`` is not given: every worker and every
                restart then shares it.  Without either, the key is random per process
                (tests; a single process that never restarts).

        Raises:
            ConfigError: the file cannot be read at start-up.

        """
        self.path = path
        self._interval = check_interval
        self._workers = workers or process.usable_cpus()
        # The key is read (or created) when first needed, by a CRAM-MD5 or SCRAM login:
        # `pop3d deliver`, which builds this authenticator to look recipients up, never
        # touches it (it may run as the MTA's user, who cannot read it).
        self._key_file = key_file
        self._given_key = scram_salt_key
        self._keys: tuple[bytes, Decoys] | None = None
        try:
            self._table = _read_table(path)
        except OSError as exc:
            raise ConfigError(f"[auth] passwd_file {path}: {exc.strerror}") from None
        log.info("%s: %d users", path, len(self._table.users))
        self._next_check = time.monotonic() + check_interval
        self._last_error: str | None = None
        self._reload: asyncio.Future[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._limit: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    @classmethod
    def from_config(cls, auth: AuthConfig) -> PasswdFileAuthenticator:
        """The authenticator of ``[auth]``.

        ``passwd_file``, and ``key_file`` (by default ``pop3d-auth.key`` next to the
        passwd-file) for the key every worker shares.

        Raises:
            ConfigError: no ``passwd_file``, or it cannot be read.

        """
        if auth.passwd_file is None:
            raise ConfigError("[auth] passwd_file is required")
        key_file = auth.key_file or auth.passwd_file.parent / DEFAULT_KEY_FILE
        return cls(auth.passwd_file, key_file=key_file)

    # ----------------------------------------------------------------- Authenticator

    def begin(self, username: str, password: bytes) -> Verdict:
        """Check ``password`` as far as it can be without waiting; never starts over.

        Returns the user, the :class:`.Refused` reason, or an :class:`.Unfinished`
        holding the rest (a slow hash, the dummy work of a refusal that must run in the
        thread pool, or a changed file to re-read).  A refusal of any kind costs one verification
        of each cost class in the file (see the module head), whatever the reason.

        Raises:
            TemporaryBackendError: the verification could not run.

        """
        if self._reload is not None or (
            time.monotonic() >= self._next_check and self._changed()
        ):
            return Unfinished(functools.partial(self._after_refresh, username, password))
        return self._check(username, password)

    def _changed(self) -> bool:
        """The look at a file that is due one, made inline: True if it must be re-read.

        One ``stat``, as :meth:`_refresh` makes on the loop too; an unchanged (or
        unreadable) file is not looked at again for ``check_interval``.  A changed one
        is left due, and :meth:`_refresh` re-reads it in the thread pool.
        """
        try:
            st = self.path.stat()
        except OSError:
            return True  # _refresh logs it once and keeps the last good table
        if (st.st_mtime_ns, st.st_size, st.st_ino) != self._table.signature:
            return True
        self._next_check = time.monotonic() + self._interval
        return False

    def _check(self, username: str, password: bytes) -> Verdict:
        """:meth:`begin` against the table as it is (no look at the file)."""
        table = self._table
        # Every name in the table is valid (_parse_line): no need to check this one first.
        record = table.users.get(username)
        if record is None or not (record.password or record.nopassword):
            why = Refused.UNKNOWN_USER if record is None else Refused.BAD_PASSWORD
            return self._refuse(table.dummies, "", password, why)
        stored = record.password
        if record.nopassword:
            # Any password: no hash to check (nologin still refuses, with the dummies).
            verdict = _verdict(record, ok=True)
            if isinstance(verdict, Principal):
                return verdict
            return self._refuse(table.dummies, "", password, verdict)
        if schemes.is_slow(stored):
            # One job in the pool: the hash, then (on a refusal) the other classes' dummies.
            def job() -> Principal | Refused:
                verdict = _verdict(record, ok=schemes.verify(stored, password))
                if isinstance(verdict, Refused):
                    _burn(table.dummies, schemes.cost_class(stored), password)
                return verdict

            return Unfinished(functools.partial(self._in_pool, job))
        verdict = _verdict(record, ok=self._run_inline(schemes.verify, stored, password))
        if isinstance(verdict, Principal):
            return verdict  # a success pays no dummy: no cost class needed
        own = schemes.cost_class(stored)
        return self._refuse(table.dummies, own, password, verdict)

    async def verify(self, username: str, password: bytes) -> Principal | Refused:
        """:meth:`begin`, finished: the user, or why not (for the log, never the client).

        Raises:
            TemporaryBackendError: the verification could not run.

        """
        verdict = self.begin(username, password)
        return await verdict.result() if isinstance(verdict, Unfinished) else verdict

    async def verify_password(self, username: str, password: bytes) -> Principal | None:
        """Return the user when ``password`` is theirs, else ``None`` after the same work.

        Raises:
            TemporaryBackendError: the verification could not run.

        """
        verdict = await self.verify(username, password)
        return verdict if isinstance(verdict, Principal) else None

    def verify_password_now(self, username: str, password: bytes) -> Principal | None:
        """:meth:`verify_password` without waiting, when it needs no thread and no reload.

        Kept for callers of the ``None`` form; :meth:`begin` is the one-path form (this one
        gives up on an :class:`.Unfinished` and its caller starts again).

        Raises:
            WouldWait: a slow scheme, or the file changed (re-read by :meth:`verify_password`).
            TemporaryBackendError: the verification could not run.

        """
        verdict = self.begin(username, password)
        if isinstance(verdict, Unfinished):
            raise WouldWait
        return verdict if isinstance(verdict, Principal) else None

    async def lookup(self, username: str) -> Principal | None:
        """Return the user without checking a secret (LMTP RCPT, SASL EXTERNAL)."""
        record = await self._record(username)
        return None if record is None else record.principal

    async def secret_for(self, username: str, scheme: str) -> bytes | None:
        """Return the user's secret for a challenge-response mechanism.

        ``PLAIN``: the clear-text password (APOP); ``None`` for an unknown user or one
        without such a password.  ``CRAM-MD5``: the 32-octet HMAC-MD5 context.
        ``SCRAM-SHA-256``: :meth:`.schemes.ScramSecret.encode`'s form
        (``iter,salt,storedkey,serverkey``, base64), decode with
        :meth:`.schemes.ScramSecret.decode`; for PLAIN storage the salt is stable per user.

        For CRAM-MD5 and SCRAM-SHA-256 the answer is never ``None``: an unknown user, a
        ``nologin`` one or one whose storage cannot give the secret gets a decoy
        (:mod:`.decoys`) that matches no response, computed with the same work as a real
        one (one CRAM-MD5 context; one SCRAM derivation, in the thread pool, for every
        user), so neither the challenge nor its timing tells who exists.
        """
        record = await self._record(username)
        stored = "" if record is None or record.nologin else record.password
        match scheme.upper():
            case "PLAIN":
                return schemes.plain_secret(stored) if stored else None
            case "CRAM-MD5":
                return self._cram_secret(username, stored)
            case "SCRAM-SHA-256":
                return await self._scram_secret(username, stored)
            case _:
                return None

    # ----------------------------------------------------------------- extras

    @property
    def scram_salt_key(self) -> bytes:
        """The key of stable SCRAM salts and decoys (:mod:`.decoys`).

        Raises:
            TemporaryBackendError: the key file cannot be read or created (logged).

        """
        return self._key_and_decoys()[0]

    def close(self) -> None:
        """Stop the verification threads (waits for running verifications)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ----------------------------------------------------------------- internals

    async def _after_refresh(self, username: str, password: bytes) -> Principal | Refused:
        await self._refresh()
        verdict = self._check(username, password)
        return await verdict.result() if isinstance(verdict, Unfinished) else verdict

    def _refuse(
        self,
        dummies: tuple[tuple[str, str | None], ...],
        own: str,
        password: bytes,
        why: Refused,
    ) -> Refused | Unfinished:
        """Spend the dummy work of a refusal (inline if it is fast), then refuse."""
        rest = [(c, h) for c, h in dummies if c != own]
        if not any(h is None or schemes.is_slow(h) for _, h in rest):
            self._run_inline(_burn, dummies, own, password)
            return why

        async def finish() -> Refused:
            await self._in_pool(_burn, dummies, own, password)
            return why

        return Unfinished(finish)

    def _key_and_decoys(self) -> tuple[bytes, Decoys]:
        if self._keys is None:
            key = self._given_key
            if key is None and self._key_file is not None:
                try:
                    key = load_or_create_key(self._key_file)
                except ConfigError as exc:
                    log.error("%s; CRAM-MD5 and SCRAM logins fail until fixed", exc)  # noqa: TRY400
                    raise TemporaryBackendError("the authentication key is missing") from None
            key = key or secrets.token_bytes(32)
            self._keys = (key, Decoys(key))
        return self._keys

    def _cram_secret(self, username: str, stored: str) -> bytes:
        """The CRAM-MD5 context, or a decoy: the same steps for every user.

        One decode of the stored password as PLAIN and as CRAM-MD5, one decoy password,
        one context computed (from the PLAIN password, else from the decoy password).
        """
        plain = schemes.plain_secret(stored)
        kept = schemes.stored_cram_md5(stored)
        decoy = self._key_and_decoys()[1].password(username)
        context = schemes.cram_md5_context(decoy if plain is None else plain)
        return context if kept is None else kept

    async def _scram_secret(self, username: str, stored: str) -> bytes:
        """The SCRAM-SHA-256 secret, or a decoy: one derivation in the pool either way."""
        plain = schemes.plain_secret(stored) if stored else None
        real = None
        if plain is None and stored and schemes.scheme_of(stored) == "SCRAM-SHA-256":
            real = schemes.scram_sha256_secret(stored)
        key, decoys = self._key_and_decoys()
        shapes = self._table.scram_shapes

        def job() -> schemes.ScramSecret:
            if plain is not None:
                salt = schemes.scram_salt(key, username)
                return schemes.ScramSecret.derive(plain, salt)
            if real is not None:
                decoys.burn_scram(username, real.salt, real.iterations)
                return real
            return decoys.scram_secret(username, shapes)

        return (await self._in_pool(job)).encode()

    async def _record(self, username: str) -> UserRecord | None:
        await self._refresh()
        if not valid_username(username):
            return None
        return self._table.users.get(username)

    async def _refresh(self) -> None:
        """Re-read the file when it changed (at most once per interval)."""
        if self._reload is None:
            now = time.monotonic()
            if now < self._next_check:
                return
            self._next_check = now + self._interval
            try:
                st = self.path.stat()
            except OSError as exc:
                self._fail(exc)
                return
            if (st.st_mtime_ns, st.st_size, st.st_ino) == self._table.signature:
                return
            loop = asyncio.get_running_loop()
            reload = loop.run_in_executor(None, self._load)
            self._reload = reload
            reload.add_done_callback(self._reload_done)
        # shield: a cancelled login must not cancel the reload others wait for.
        try:
            await asyncio.shield(self._reload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise TemporaryBackendError("passwd-file reload failed") from exc

    def _reload_done(self, fut: asyncio.Future[None]) -> None:
        if self._reload is fut:
            self._reload = None

    def _load(self) -> None:
        """Runs in a thread: read and swap in the table (or keep the old one)."""
        try:
            table = _read_table(self.path)
        except OSError as exc:
            self._fail(exc)
            return
        self._table = table
        self._last_error = None
        log.info("%s: reloaded, %d users", self.path, len(table.users))

    def _fail(self, exc: OSError) -> None:
        message = f"{self.path}: {exc.strerror}; keeping the last good user table"
        if message != self._last_error:
            self._last_error = message
            log.error("%s", message)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._limit is None or self._limit[0] is not loop:
            self._limit = (loop, asyncio.Semaphore(2 * self._workers))
        return self._limit[1]

    async def _in_pool(self, func: Callable[..., _T], *args: object) -> _T:
        """Run ``func(*args)`` in the pool, at most ``2 * workers`` submitted at once."""
        try:
            async with self._semaphore():
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        self._workers, thread_name_prefix="pop3d-auth"
                    )
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._executor, func, *args)
        except _HASH_FAILURES as exc:
            raise TemporaryBackendError("password verification failed") from exc

    @staticmethod
    def _run_inline(func: Callable[..., _T], *args: object) -> _T:
        try:
            return func(*args)
        except _HASH_FAILURES as exc:
            # The hash library failed: not the client's fault, not a "no".
            raise TemporaryBackendError("password verification failed") from exc


#: What a hash library or the pool raises when it fails (answered [SYS/TEMP]).
_HASH_FAILURES = (MemoryError, RuntimeError, OSError)


def _verdict(record: UserRecord, *, ok: bool) -> Principal | Refused:
    """The outcome of checking a known user's password."""
    if not ok:
        return Refused.BAD_PASSWORD
    if record.nologin:
        return Refused.NOLOGIN
    return record.principal


def _burn(dummies: tuple[tuple[str, str | None], ...], own: str, password: bytes) -> None:
    """Verify one stored hash of every cost class but ``own``; the outcomes are discarded."""
    for cost, stored in dummies:
        if cost != own:
            schemes.dummy_verify(password, stored)


# --------------------------------------------------------------------------- administration


@dataclass(frozen=True, slots=True)
class UserInfo:
    """A user as ``pop3d user list`` shows it: no password, only its scheme."""

    username: str
    #: Scheme of the stored password (``ARGON2ID``, ``CRYPT``...), ``""`` when empty.
    scheme: str
    attributes: Mapping[str, str]


def list_users(path: Path) -> list[UserInfo]:
    """The users of the file at ``path``, in file order.

    Raises:
        OSError: the file cannot be read.

    """
    users = parse_passwd_file(path.read_bytes(), str(path))
    return [
        UserInfo(u.username, schemes.scheme_of(u.password) if u.password else "", u.attributes)
        for u in users.values()
    ]


def _open_locked(path: Path, create: bool) -> int | None:
    """Open and flock ``path``, retrying if it was replaced meanwhile; ``None``: absent."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    while True:
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = path.stat().st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _rewrite(path: Path, fd: int, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically, keeping mode (and owner when allowed)."""
    st = os.fstat(fd)
    tmp_fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(tmp_fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fchmod(tmp.fileno(), stat.S_IMODE(st.st_mode))
            with contextlib.suppress(PermissionError):
                os.fchown(tmp.fileno(), st.st_uid, st.st_gid)
            os.fsync(tmp.fileno())
        Path(tmp_name).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp_name).unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def update_user(
    path: Path, username: str, stored: str | None, *, extra: Mapping[str, str] | None = None,
) -> bool:
    """Set (or, with ``stored=None``, delete) a user's password in the file at ``path``.

    An existing user keeps the rest of its line (uid, home, extra fields); a new user is
    appended as ``username:stored`` (plus ``extra`` as extra fields).  Deleting removes
    every line of that name.  All other lines, comments included, are kept byte for byte.
    The file is created (mode 0600) when adding to a missing one.  Concurrent callers are
    serialised with ``flock``.

    Args:
        path: the passwd-file.
        username: the user (see :func:`valid_username`).
        stored: a stored password from :func:`.schemes.hash_password`, or ``None``.
        extra: extra fields (``key=value``) for a new user; ignored for an existing one.

    Returns:
        Whether the user existed before.

    Raises:
        ValueError: invalid user name, stored password or extra field.
        OSError: the file cannot be read or written.

    """
    if not valid_username(username):
        raise ValueError("invalid user name")
    if stored is not None and (":" in stored or not stored.isprintable()):
        raise ValueError("a stored password cannot hold ':' or control characters")
    fields = [f"{k}={v}" if v else k for k, v in (extra or {}).items()]
    if any(not f.isprintable() or " " in f or f.startswith("=") for f in fields):
        raise ValueError("invalid extra field")
    fd = _open_locked(path, create=stored is not None)
    if fd is None:
        return False
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            lines = f.read().splitlines(keepends=True)
        key = username.encode("utf-8") + b":"
        out: list[bytes] = []
        found = False
        for line in lines:
            if not line.startswith(key):
                out.append(line)
            elif stored is None:
                found = True
            elif found:
                out.append(line)  # a shadowed duplicate: left as it was
            else:
                found = True
                body = line.rstrip(b"\r\n")
                parts = body.split(b":", 2)
                parts[1] = stored.encode("utf-8")
                out.append(b":".join(parts) + line[len(body) :])
        if stored is not None and not found:
            if out and not out[-1].endswith(b"\n"):
                out[-1] += b"\n"
            tail = (":" * 6 + " ".join(fields)) if fields else ""
            out.append(f"{username}:{stored}{tail}\n".encode())
        if stored is not None or found:
            _rewrite(path, fd, b"".join(out))
        return found
    finally:
        os.close(fd)
