"""PostgreSQL user database: users found by SQL the operator writes (Dovecot's passdb sql).

``[auth] backend = "postgresql"`` with ``[database] url``.  ``[auth] password_query`` is
SQL in psycopg's named-parameter style, as Dovecot's ``password_query`` with its
``%u``/``%n``/``%d`` spelled ``%(user)s``, ``%(local)s``, ``%(domain)s``: the values are
always sent as bound parameters, never put into the SQL text (a literal ``%`` in the
query is written ``%%``).  It returns at most one row:

* a ``username`` (or ``user``) column: the canonical name (default: the name given);
* a ``password`` column: ``{SCHEME}data`` or a bare crypt(3) string, any scheme
  :mod:`pop3d.auth.schemes` verifies (the same strings as in a passwd-file);
* any other non-NULL column is an extra field of the user, as in a passwd-file:
  ``home``, ``quota``/``quota_rule`` (read by delivery), ``uid``, ``gid``...;  a
  ``userdb_`` prefix is stripped (``userdb_quota_rule`` is ``quota_rule``); a true
  ``nologin`` refuses the login whatever the password.

``user_query`` (optional) finds a user without a password (LMTP RCPT, SASL EXTERNAL);
without it the password query is used and its password ignored.  Both default to the
``users`` table that ``pop3d db init`` creates and ``pop3d user`` manages.

Rules of this module:

* One round trip per verification: the row comes back, the password is checked here
  (slow schemes in a small thread pool, as the passwd-file backend does).
* Unknown user and wrong password are the same ``None`` after the same work: an unknown
  user's password is checked against the last real hash of the same database seen.
* A name that cannot be a user (:func:`~pop3d.auth.passwd_file.valid_username`) never
  reaches the database.
* The database down, slow or failing raises
  :class:`~pop3d.database.DatabaseUnavailable` (``-ERR [SYS/TEMP]``, no auth penalty);
  a query that PostgreSQL refuses (a typo, a missing table) raises
  :class:`~pop3d.errors.TemporaryBackendError` and logs its SQLSTATE once, never the
  parameters.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg

from pop3d import process
from pop3d.auth import schemes
from pop3d.auth.passwd_file import valid_username
from pop3d.database import Database, cursor_for
from pop3d.errors import TemporaryBackendError
from pop3d.protocol.values import Principal

__all__ = ["DEFAULT_LOGIN_QUERY", "DEFAULT_USER_QUERY", "SqlAuthenticator"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The password query on the schema ``pop3d db init`` creates.
DEFAULT_LOGIN_QUERY = (
    "SELECT username, password, home, quota, uid, gid, nologin "
    "FROM users WHERE username = %(user)s"
)
#: Its user query (no password column).
DEFAULT_USER_QUERY = (
    "SELECT username, home, quota, uid, gid, nologin FROM users WHERE username = %(user)s"
)

#: Columns that are not extra fields.
_NAME_COLUMNS = ("username", "user")
_FALSE = frozenset({"", "0", "f", "false", "no", "n", "off"})


def _params(username: str) -> dict[str, str]:
    local, _, domain = username.partition("@")
    return {"user": username, "local": local, "domain": domain}


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else None
    return str(value)


class SqlAuthenticator:
    """An :class:`~pop3d.auth.base.Authenticator` over SQL queries in PostgreSQL."""

    def __init__(
        self,
        database: Database,
        *,
        password_query: str | None = None,
        user_query: str | None = None,
        workers: int | None = None,
        scram_salt_key: bytes | None = None,
    ) -> None:
        self.database = database
        self.password_query = password_query or DEFAULT_LOGIN_QUERY
        if user_query is None:
            user_query = DEFAULT_USER_QUERY if password_query is None else self.password_query
        self.user_query = user_query
        self._workers = workers or process.usable_cpus()
        self._salt_key = scram_salt_key or secrets.token_bytes(32)
        self._executor: ThreadPoolExecutor | None = None
        self._limit: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        #: A real stored hash, for the dummy verification of unknown users.
        self._representative: str | None = None
        self._logged: set[str] = set()

    # ----------------------------------------------------------------- Authenticator

    async def verify_password(self, username: str, password: bytes) -> Principal | None:
        """Return the user when ``password`` is theirs, else ``None`` after the same work.

        Raises:
            TemporaryBackendError: the database is unavailable or the query fails.

        """
        row = await self._row(self.password_query, username) if valid_username(username) else None
        stored = row.get("password") if row is not None else None
        if row is None or not stored:
            rep = self._representative
            await self._run(rep is None or schemes.is_slow(rep), schemes.dummy_verify,
                            password, rep)
            return None
        if schemes.is_supported(stored):
            self._representative = stored
        ok = await self._run(schemes.is_slow(stored), schemes.verify, stored, password)
        if not ok:
            return None
        return self._principal(username, row)

    async def lookup(self, username: str) -> Principal | None:
        """Return the user without checking a secret (LMTP RCPT, SASL EXTERNAL)."""
        if not valid_username(username):
            return None
        row = await self._row(self.user_query, username)
        return None if row is None else self._principal(username, row)

    async def secret_for(self, username: str, scheme: str) -> bytes | None:
        """The user's secret for APOP, CRAM-MD5 or SCRAM (see the passwd-file backend)."""
        if not valid_username(username):
            return None
        row = await self._row(self.password_query, username)
        if row is None or self._principal(username, row) is None:
            return None
        stored = row.get("password")
        if not stored:
            return None
        match scheme.upper():
            case "PLAIN":
                return schemes.plain_secret(stored)
            case "CRAM-MD5":
                return schemes.cram_md5_secret(stored)
            case "SCRAM-SHA-256":
                salt = schemes.scram_salt(self._salt_key, row.get("username") or username)
                secret = await self._run(
                    schemes.plain_secret(stored) is not None,
                    lambda: schemes.scram_sha256_secret(stored, salt=salt),
                )
                return None if secret is None else secret.encode()
            case _:
                return None

    @property
    def scram_salt_key(self) -> bytes:
        """The key of stable SCRAM salts."""
        return self._salt_key

    def close(self) -> None:
        """Stop the verification threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ----------------------------------------------------------------- internals

    async def _row(self, query: str, username: str) -> dict[str, str] | None:
        """The one row of ``query`` for ``username`` as text fields; ``None``: no row."""
        async with self.database.connection() as conn:
            try:
                cur = await cursor_for(conn, query).execute(query, _params(username))
                record = await cur.fetchone()
                # The names from the result itself (cur.description makes an object
                # per column at every call).
                res = cur.pgresult
                encoding = conn.info.encoding
                names = [] if res is None else [
                    (res.fname(i) or b"").decode(encoding) for i in range(res.nfields)]
            except psycopg.errors.QueryCanceled:
                raise
            except psycopg.DatabaseError as exc:
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.UNKNOWN:
                    raise  # the connection broke: the database layer says so
                key = f"{exc.sqlstate}"
                if key not in self._logged:
                    self._logged.add(key)
                    log.error(  # noqa: TRY400 (no traceback: the SQLSTATE says it)
                        "[auth] query failed: SQLSTATE %s %s", exc.sqlstate,
                              type(exc).__name__)
                raise TemporaryBackendError("user query failed") from None
        if record is None:
            return None
        row: dict[str, str] = {}
        for name, value in zip(names, record, strict=True):
            text = _text(value)
            if text is not None:
                row[name.lower()] = text
        return row

    @staticmethod
    def _principal(username: str, row: Mapping[str, str]) -> Principal | None:
        canonical = next((row[c] for c in _NAME_COLUMNS if c in row), username)
        attributes: dict[str, str] = {}
        userdb: dict[str, str] = {}
        for key, value in row.items():
            if key in _NAME_COLUMNS or key == "password":
                continue
            if key.startswith("userdb_") and len(key) > len("userdb_"):
                userdb[key.removeprefix("userdb_")] = value
            else:
                attributes[key] = value
        attributes.update(userdb)
        if "nologin" in attributes:
            if attributes["nologin"].strip().lower() not in _FALSE:
                return None
            del attributes["nologin"]
        return Principal(canonical, attributes)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._limit is None or self._limit[0] is not loop:
            self._limit = (loop, asyncio.Semaphore(2 * self._workers))
        return self._limit[1]

    async def _run(self, slow: bool, func: Callable[..., _T], *args: object) -> _T:
        try:
            if not slow:
                return func(*args)
            async with self._semaphore():
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        self._workers, thread_name_prefix="pop3d-auth"
                    )
                return await asyncio.get_running_loop().run_in_executor(
                    self._executor, func, *args
                )
        except (MemoryError, RuntimeError, OSError) as exc:
            raise TemporaryBackendError("password verification failed") from exc


def from_config(cfg: Any, database: Database) -> SqlAuthenticator:
    """The authenticator of ``[auth]`` on ``database``."""
    return SqlAuthenticator(
        database, password_query=cfg.auth.password_query, user_query=cfg.auth.user_query
    )
