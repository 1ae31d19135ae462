"""Builders of the PostgreSQL-backed parts from a config (serve.py's hooks call these).

One :class:`~pop3d.database.Database` (one pool) and one
:class:`~pop3d.cluster_lock.LeaseManager` per process, shared by the authenticator and
the store; created lazily, so a supervisor that builds the parts to check the config
and then forks workers hands no open connection to its children.

* ``[auth] backend = "postgresql"``: :class:`~pop3d.auth.sql.SqlAuthenticator`.
* ``[storage] backend = "postgresql"``: :class:`~pop3d.storage.postgresql.PostgresStore`
  (always under cluster leases).
* Maildir or mbox with ``[storage] lock = "postgresql"`` -- the default when
  ``[database]`` is set -- : the store wrapped in :class:`~pop3d.cluster_lock.LeasedStore`.
  ``lock = "local"`` keeps the local locks only (one node, or a database for users only).
"""

from __future__ import annotations

import os
from typing import Any

from pop3d.config import Config
from pop3d.errors import ConfigError

__all__ = ["build_authenticator", "build_store", "database_for", "shutdown", "uses_database"]

_databases: dict[tuple[int, str], Any] = {}
_leases: dict[tuple[int, str], Any] = {}


def uses_database(cfg: Config) -> bool:
    """Whether the store of ``cfg`` is built here (PostgreSQL store or cluster locks)."""
    return cfg.storage.backend == "postgresql" or (
        cfg.database is not None and cfg.storage.lock != "local"
    )


def database_for(cfg: Config, *, pooled: bool = True) -> Any:
    """The Database of this process for of ``[database]``.

    Raises:
        ConfigError: ``[database]`` is missing.

    """
    from pop3d.database import Database  # noqa: PLC0415

    if cfg.database is None:
        raise ConfigError("[database] url is required by a PostgreSQL backend")
    if not pooled:
        return Database(cfg.database, pooled=False)
    key = (os.getpid(), cfg.database.url)
    if key not in _databases:
        _databases[key] = Database(cfg.database)
    return _databases[key]


def _lease_manager(cfg: Config, database: Any) -> Any:
    from pop3d.cluster_lock import LeaseManager  # noqa: PLC0415

    assert cfg.database is not None
    key = (os.getpid(), cfg.database.url)
    if key not in _leases or _leases[key].database is not database:
        _leases[key] = LeaseManager(database, cfg.database.lock_ttl)
    return _leases[key]


def build_authenticator(cfg: Config, *, pooled: bool = True) -> Any:
    """The SQL authenticator of ``[auth]``."""
    from pop3d.auth.sql import from_config  # noqa: PLC0415

    return from_config(cfg, database_for(cfg, pooled=pooled))


def build_store(cfg: Config, *, pooled: bool = True) -> Any:
    """The PostgreSQL store, or the Maildir/mbox store under cluster leases."""
    from pop3d.cluster_lock import LeasedStore  # noqa: PLC0415

    database = database_for(cfg, pooled=pooled)
    leases = _lease_manager(cfg, database)
    if cfg.storage.backend == "postgresql":
        from pop3d.storage.postgresql import PostgresStore  # noqa: PLC0415

        return PostgresStore(database, leases, quota=cfg.storage.quota)
    if cfg.storage.mbox is not None:
        from pop3d.storage.mbox import MboxStore  # noqa: PLC0415

        return LeasedStore(MboxStore.from_config(cfg.storage), leases)
    from pop3d.storage.maildir import MaildirStore  # noqa: PLC0415

    return LeasedStore(MaildirStore.from_config(cfg.storage), leases)


async def shutdown() -> None:
    """Release this process's leases and close its pool (end of ``serve``)."""
    pid = os.getpid()
    for key, manager in list(_leases.items()):
        if key[0] == pid:
            await manager.close()
            del _leases[key]
    for key, database in list(_databases.items()):
        if key[0] == pid:
            await database.close()
            del _databases[key]
