"""The configuration keys of the PostgreSQL backends: [database], [auth] backend, [storage]."""

from __future__ import annotations

from pathlib import Path

import pytest

from pop3d import pgbackends
from pop3d.config import from_mapping
from pop3d.errors import ConfigError, TemporaryBackendError

URL = "postgresql:///pop3d?host=/run/postgresql"


def test_full_postgresql_config() -> None:
    """The [database] keys parse; the store is built under leases, the authenticator in SQL."""
    cfg = from_mapping(
        {
            "database": {"url": URL, "timeout": 2, "lock_ttl": 10, "pool_max": 4},
            "auth": {"backend": "postgresql",
                     "password_query": "SELECT username, password FROM users "
                                       "WHERE username = %(user)s"},
            "storage": {"backend": "postgresql"},
        },
        Path(),
    )
    assert cfg.database is not None
    assert (cfg.database.url, cfg.database.timeout, cfg.database.lock_ttl) == (URL, 2.0, 10.0)
    assert pgbackends.uses_database(cfg)
    auth = pgbackends.build_authenticator(cfg, pooled=False)
    assert auth.password_query.startswith("SELECT username, password FROM users")
    assert auth.user_query == auth.password_query
    store = pgbackends.build_store(cfg, pooled=False)
    assert type(store).__name__ == "PostgresStore"


def test_maildir_with_database_is_cluster_locked_unless_local() -> None:
    """[database] set: Maildir gets cluster leases by default; lock = "local" opts out."""
    base = {"database": {"url": URL}, "storage": {"maildir": "mail/%u"}}
    assert pgbackends.uses_database(from_mapping(base, Path()))
    local = from_mapping(base | {"storage": {"maildir": "mail/%u", "lock": "local"}}, Path())
    assert not pgbackends.uses_database(local)
    assert not pgbackends.uses_database(from_mapping({"storage": {"maildir": "m/%u"}}, Path()))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"database": {}}, "[database] url is required"),
        ({"database": {"url": URL, "lock_ttl": 1}}, "lock_ttl"),
        ({"database": {"url": URL, "pool_min": 5, "pool_max": 2}}, "pool_min"),
        ({"database": {"url": URL, "typo": 1}}, "unknown key"),
        ({"auth": {"backend": "ldap"}}, "[auth] backend"),
        ({"storage": {"backend": "postgresql", "maildir": "m/%u"}}, "takes no maildir"),
        ({"storage": {"backend": "sqlite"}}, "[storage] backend"),
        ({"storage": {"maildir": "m/%u", "lock": "nfs"}}, "[storage] lock"),
    ],
)
def test_bad_keys_are_named(data: dict[str, object], message: str) -> None:
    """Each mistake is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_mapping(data, Path())


def test_postgresql_backend_without_database_is_a_config_error() -> None:
    """backend = "postgresql" needs [database], for users and for mail alike."""
    for data in ({"auth": {"backend": "postgresql"}}, {"storage": {"backend": "postgresql"}}):
        with pytest.raises(ConfigError, match=r"needs \[database\]"):
            from_mapping(data, Path())


def test_deploy_schema_applied_by_psql_is_migratable(pg_server: object, tmp_path: Path) -> None:
    """deploy/postgresql/schema.sql through psql gives what `pop3d db init` gives: the
    version recorded, `db init` refused, `db migrate` with nothing to do."""
    import subprocess  # noqa: PLC0415

    from pop3d.cli import main  # noqa: PLC0415
    from tests.pgserver import PgServer  # noqa: PLC0415

    assert isinstance(pg_server, PgServer)
    url = pg_server.create_database("from_psql")
    schema = Path(__file__).resolve().parents[2] / "deploy" / "postgresql" / "schema.sql"
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", "-1", "-f", str(schema), url],
                   check=True, capture_output=True)
    cfg = tmp_path / "pop3d.toml"
    cfg.write_text(f'[database]\nurl = "{url}"\n')
    assert main(["db", "init", "--config", str(cfg)]) == 1
    assert main(["db", "migrate", "--config", str(cfg)]) == 0
    assert main(["db", "status", "--config", str(cfg)]) == 0


def test_database_without_schema_is_a_temporary_error(
    pg_server: object, caplog: pytest.LogCaptureFixture
) -> None:
    """Logins against a database without the schema: SYS/TEMP and one hint in the log."""
    import asyncio  # noqa: PLC0415

    from pop3d.cluster_lock import LeaseManager  # noqa: PLC0415
    from pop3d.config import DatabaseConfig  # noqa: PLC0415
    from pop3d.database import Database  # noqa: PLC0415
    from pop3d.protocol.values import Principal  # noqa: PLC0415
    from pop3d.storage.postgresql import PostgresStore  # noqa: PLC0415
    from tests.pgserver import PgServer  # noqa: PLC0415

    assert isinstance(pg_server, PgServer)
    url = pg_server.create_database("no_schema")
    database = Database(DatabaseConfig(url=url), pooled=False)
    store = PostgresStore(database, LeaseManager(database, 5.0))
    with pytest.raises(TemporaryBackendError):
        asyncio.run(store.open(Principal("alice")))
    assert "pop3d db init" in caplog.text
