"""The authenticator contract on PostgreSQL users, plus the SQL backend's own rules."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import psycopg
import pytest

from pop3d.auth.base import Authenticator
from pop3d.auth.sql import SqlAuthenticator
from pop3d.config import DatabaseConfig
from pop3d.database import Database, DatabaseUnavailable
from pop3d.errors import TemporaryBackendError
from tests.auth.contract import AuthenticatorContract


def _add_users(url: str, users: Mapping[str, str], **extra: object) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for name, stored in users.items():
            conn.execute(
                "INSERT INTO users (username, password, quota) VALUES (%s, %s, %s)",
                (name, stored, extra.get("quota")),
            )


class TestSqlContract(AuthenticatorContract):
    """The contract, with the default query on the schema of `pop3d db init`."""

    @pytest.fixture(autouse=True)
    def _db(self, database: Database) -> None:
        self.database = database

    def make(self, tmp_path: Path, users: Mapping[str, str]) -> Authenticator:
        _add_users(self.database.config.url, users)
        return SqlAuthenticator(self.database)


class TestOperatorQueryContract(AuthenticatorContract):
    """The contract again, through an operator's own table and Dovecot-style query."""

    @pytest.fixture(autouse=True)
    def _db(self, database: Database) -> None:
        self.database = database

    def make(self, tmp_path: Path, users: Mapping[str, str]) -> Authenticator:
        with psycopg.connect(self.database.config.url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS accounts")
            conn.execute("CREATE TABLE accounts (local text, domain text, pw text, "
                         "maildir_home text)")
            for name, stored in users.items():
                local, _, domain = name.partition("@")
                conn.execute("INSERT INTO accounts VALUES (%s, %s, %s, %s)",
                             (local, domain, stored, f"/var/mail/{name}"))
        return SqlAuthenticator(
            self.database,
            password_query=(
                "SELECT CASE WHEN domain = '' THEN local ELSE local || '@' || domain END "
                "AS username, pw AS password, maildir_home AS userdb_home "
                "FROM accounts WHERE local = %(local)s AND domain = %(domain)s"
            ),
        )


def test_extra_fields_become_attributes(database: Database) -> None:
    """Non-NULL columns are the user's fields; NULLs are left out; nologin refuses."""
    _add_users(database.config.url, {"carol": "{PLAIN}pw"}, quota="10M")
    with psycopg.connect(database.config.url, autocommit=True) as conn:
        conn.execute("UPDATE users SET uid = 5000, home = '/home/carol' WHERE username = 'carol'")
    auth = SqlAuthenticator(database)
    principal = asyncio.run(auth.verify_password("carol", b"pw"))
    assert principal is not None
    assert dict(principal.attributes) == {"quota": "10M", "uid": "5000", "home": "/home/carol"}
    with psycopg.connect(database.config.url, autocommit=True) as conn:
        conn.execute("UPDATE users SET nologin = true WHERE username = 'carol'")
    assert asyncio.run(auth.verify_password("carol", b"pw")) is None
    assert asyncio.run(auth.lookup("carol")) is None


def test_parameters_are_bound_never_interpolated(database: Database) -> None:
    """A name full of SQL finds nobody and breaks nothing."""
    _add_users(database.config.url, {"dave": "{PLAIN}pw"})
    auth = SqlAuthenticator(database)
    for name in ("' OR '1'='1", "dave' --", "dave'; DROP TABLE users; --", "%(user)s"):
        assert asyncio.run(auth.verify_password(name, b"pw")) is None
    assert asyncio.run(auth.verify_password("dave", b"pw")) is not None


def test_broken_query_is_temporary(database: Database) -> None:
    """A query PostgreSQL refuses is a temporary failure (SYS/TEMP), not a "no"."""
    auth = SqlAuthenticator(database, password_query="SELECT nope FROM missing_table "
                                                     "WHERE x = %(user)s")
    with pytest.raises(TemporaryBackendError):
        asyncio.run(auth.verify_password("dave", b"pw"))


def test_database_down_is_temporary(tmp_path: Path) -> None:
    """No server at the address: DatabaseUnavailable, within the timeout."""
    url = f"postgresql://x@/pop3d?host={tmp_path}&port=1"
    auth = SqlAuthenticator(Database(DatabaseConfig(url=url, timeout=1.0), pooled=False))
    with pytest.raises(DatabaseUnavailable):
        asyncio.run(auth.verify_password("dave", b"pw"))


def test_slow_database_is_temporary_within_the_timeout(db_config: DatabaseConfig) -> None:
    """A query slower than [database] timeout is cut: TemporaryBackendError, not a hang."""
    _add_users(db_config.url, {"dave": "{PLAIN}pw"})
    config = DatabaseConfig(url=db_config.url, timeout=0.5)
    auth = SqlAuthenticator(
        Database(config, pooled=False),
        password_query="SELECT username, password FROM users, pg_sleep(5) "
                       "WHERE username = %(user)s",
    )

    async def go() -> None:
        async with asyncio.timeout(4):  # the test's own bound, far above the 0.5 s
            await auth.verify_password("dave", b"pw")

    with pytest.raises(TemporaryBackendError):
        asyncio.run(go())


def test_pooled_database_recovers_after_an_outage(
    pg_server: object, db_config: DatabaseConfig
) -> None:
    """The pool answers DatabaseUnavailable while the server is away, then works again."""
    from tests.pgserver import PgServer  # noqa: PLC0415

    assert isinstance(pg_server, PgServer)
    _add_users(db_config.url, {"erin": "{PLAIN}pw"})
    database = Database(DatabaseConfig(url=db_config.url, timeout=1.0))
    auth = SqlAuthenticator(database)

    async def go() -> None:
        assert await auth.verify_password("erin", b"pw") is not None
        pg_server.stop()
        try:
            with pytest.raises(TemporaryBackendError):
                await auth.verify_password("erin", b"pw")
        finally:
            pg_server.start()
        for _ in range(100):  # the pool reconnects in the background
            try:
                if await auth.verify_password("erin", b"pw") is not None:
                    break
            except TemporaryBackendError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the pool did not reconnect")
        await database.close()

    asyncio.run(go())
