"""``pop3d db init|migrate|status|schema``: the PostgreSQL schema, versioned.

The schema ships in the package as numbered migrations (``pop3d/migrations/NNNN_*.sql``).
``pop3d_schema`` records which are applied.  Each migration runs in its own transaction
under a transaction-level advisory lock, so two nodes migrating at once apply each
migration once, and a failed migration leaves the previous version whole.

* ``pop3d db init --config FILE``: create the schema in an empty database (all
  migrations); exit 1 when pop3d's tables already exist (use ``migrate``).
* ``pop3d db migrate --config FILE``: apply the migrations not applied yet.
* ``pop3d db status --config FILE``: print the applied and the shipped version.
* ``pop3d db schema``: print the SQL of every migration (deploy/postgresql/schema.sql is
  this output, checked by the tests), for operators who apply schemas themselves.

Exit status: 0 done; 1 ``init`` of a database that has the schema; 75 (os.EX_TEMPFAIL) the
database cannot be reached; 78 (os.EX_CONFIG) no ``[database]`` in the configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pop3d.errors import ConfigError, TemporaryBackendError

EX_FAIL = 1

#: Key of the advisory lock that serialises migrations (any constant; "pop3d" in ASCII).
_MIGRATION_LOCK = 0x706F703364


@dataclass(frozen=True, slots=True)
class Migration:
    """One shipped migration."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The shipped migrations, in order."""
    found = []
    for entry in resources.files("pop3d.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append(Migration(int(name[:4]), name.removesuffix(".sql"), entry.read_text()))
    found.sort(key=lambda m: m.version)
    return found


def schema_sql() -> str:
    """Every migration's SQL as one script (what ``pop3d db schema`` prints).

    It records the versions in ``pop3d_schema`` as ``pop3d db init`` does, so a database
    set up with ``psql -f`` is upgraded later by ``pop3d db migrate``.
    """
    parts = [
        "-- pop3d PostgreSQL schema (`pop3d db schema`; `pop3d db init` applies the same).\n",
        "-- psql -v ON_ERROR_STOP=1 -1 -f schema.sql DBNAME\n",
        _CREATE_VERSION_TABLE.strip() + ";\n",
    ]
    for m in migrations():
        parts.append(f"\n-- migration {m.name}\n{m.sql}")
        # The values are the package's own file names (NNNN_word), not input.
        record = "INSERT INTO pop3d_schema (version, name) VALUES ({}, '{}');\n"
        parts.append(record.format(m.version, m.name))
    return "".join(parts)


_CREATE_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS pop3d_schema (
    version integer PRIMARY KEY,
    name    text NOT NULL,
    applied timestamptz NOT NULL DEFAULT now()
)
"""


async def applied_version(conn: Any) -> int:
    """The highest applied migration (0: none; the table may not exist)."""
    cur = await conn.execute("SELECT to_regclass('pop3d_schema') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return 0
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM pop3d_schema")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(conn: Any) -> list[str]:
    """Apply the migrations ``conn``'s database lacks; return the names applied."""
    done: list[str] = []
    for m in migrations():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await conn.execute(_CREATE_VERSION_TABLE)
            cur = await conn.execute("SELECT 1 FROM pop3d_schema WHERE version = %s",
                                     (m.version,))
            if await cur.fetchone():
                continue
            # A script of several statements: the simple protocol, never prepared.
            await conn.execute(m.sql.encode(), prepare=False)
            await conn.execute("INSERT INTO pop3d_schema (version, name) VALUES (%s, %s)",
                               (m.version, m.name))
            done.append(m.name)
    return done


# --------------------------------------------------------------------------- CLI


def add_parser(sub: Any) -> None:
    """Register ``db`` (init, migrate, status, schema)."""
    from pop3d import app  # noqa: PLC0415

    db = sub.add_parser("db", help="create or upgrade the PostgreSQL schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, text in (
        ("init", "create the schema in an empty database"),
        ("migrate", "apply the migrations the database lacks"),
        ("status", "print the schema version of the database and of this pop3d"),
    ):
        p = db_sub.add_parser(name, help=text)
        app.add_config_arguments(p)
        p.set_defaults(run=run, db_action=name)
    p = db_sub.add_parser("schema", help="print the SQL of the schema")
    p.set_defaults(run=run_schema)


def _fail(status: int, text: str) -> int:
    print(f"pop3d db: {text}", file=sys.stderr)  # noqa: T201
    return status


def run_schema(_args: argparse.Namespace) -> int:
    """``pop3d db schema``."""
    sys.stdout.write(schema_sql())
    return 0


def database_of(cfg: Any) -> Any:
    """The unpooled :class:`~pop3d.database.Database` of ``cfg`` (one-shot commands).

    Raises:
        ConfigError: there is no ``[database]``.

    """
    from pop3d.database import Database  # noqa: PLC0415

    if cfg.database is None:
        raise ConfigError("[database] url is not set")
    return Database(cfg.database, pooled=False)


def run(args: argparse.Namespace) -> int:
    """``pop3d db init|migrate|status``."""
    import psycopg  # noqa: PLC0415

    from pop3d import app  # noqa: PLC0415

    try:
        db = database_of(app.load_existing_config(args, "db"))
    except ConfigError as exc:
        return _fail(os.EX_CONFIG, f"configuration: {exc}")
    shipped = migrations()[-1].version

    async def go() -> int:
        async with db.long_connection() as conn:
            have = await applied_version(conn)
            if args.db_action == "status":
                print(f"database schema version {have}, pop3d ships {shipped}")  # noqa: T201
                return 0
            if args.db_action == "init" and have:
                return _fail(EX_FAIL, f"the database already has schema version {have}; "
                             "use `pop3d db migrate`")
            try:
                applied = await migrate(conn)
            except psycopg.Error as exc:  # refused: the database is left as it was
                return _fail(EX_FAIL, f"migration failed: SQLSTATE {exc.sqlstate}: {exc}")
            for name in applied:
                print(f"applied {name}")  # noqa: T201
            print(f"schema version {shipped}")  # noqa: T201
            return 0

    try:
        return asyncio.run(go())
    except TemporaryBackendError as exc:
        return _fail(os.EX_TEMPFAIL, f"{exc}: {exc.__cause__ or ''}".rstrip(": "))


# --------------------------------------------------------------------------- users


async def set_user_password(db: Any, username: str, stored: str, *, adding: bool) -> bool:
    """Add a user (``adding``) or change their password; False when that cannot be done.

    Adding also creates the user's maildrop row (so a login before the first mail finds
    an empty maildrop, not a missing one, with the PostgreSQL store).
    """
    async with db.long_connection() as conn, conn.transaction():
        if adding:
            cur = await conn.execute(
                "INSERT INTO users (username, password) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING RETURNING 1",
                (username, stored),
            )
            if await cur.fetchone() is None:
                return False
            await conn.execute(
                "INSERT INTO mailboxes (name) VALUES (%s) ON CONFLICT DO NOTHING", (username,)
            )
            return True
        cur = await conn.execute(
            "UPDATE users SET password = %s WHERE username = %s RETURNING 1", (stored, username)
        )
        return await cur.fetchone() is not None


async def delete_user(db: Any, username: str) -> bool:
    """Delete a user (their mail is kept); whether they existed."""
    async with db.long_connection() as conn:
        cur = await conn.execute("DELETE FROM users WHERE username = %s RETURNING 1",
                                 (username,))
        return await cur.fetchone() is not None


async def list_users(db: Any) -> list[tuple[str, str, str | None]]:
    """Every user: (name, stored password, quota), by name."""
    async with db.long_connection() as conn:
        cur = await conn.execute("SELECT username, password, quota FROM users ORDER BY username")
        return [(str(n), str(p), q) for n, p, q in await cur.fetchall()]
