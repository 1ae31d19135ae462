"""The application built from a config: one place, used by every command.

``--config``/``--data`` (:func:`add_config_arguments`) name the configuration;
:func:`load_config` (``serve``: creates the embedded default's data) and
:func:`load_existing_config` (every other command) read it; :func:`build_authenticator`,
:func:`build_store` and :func:`build_backends` turn it into the objects a session, the
LMTP listener, ``deliver`` and the admin commands use.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pop3d import config as config_mod
from pop3d import demo
from pop3d.config import Config
from pop3d.errors import ConfigError
from pop3d.login_delay import LoginDelay
from pop3d.session import Backends, FailureDelays

log = logging.getLogger("pop3d.server")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--config`` and ``--data``, which :func:`load_config` reads."""
    p.add_argument("--config", type=Path, help="TOML config (default: the embedded demo)")
    p.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("POP3D_DATA", "pop3d-data")),
        help="data folder of the embedded default (default: ./pop3d-data)",
    )


def load_config(args: argparse.Namespace) -> Config:
    """Return the config named by ``--config``, or the embedded default (creating its data)."""
    if args.config is not None:
        return config_mod.load(args.config)
    data = args.data.resolve()
    if demo.ensure_demo_data(data):
        log.info("created demo data in %s", data)
    return demo.default_config(data)


def load_existing_config(args: argparse.Namespace, command: str) -> Config:
    """The config of ``--config``, or the embedded default's only if its data exists.

    For every command but ``serve``: they never create a demo folder by guessing.  Using
    the embedded default is said on stderr.

    Raises:
        ConfigError: no ``--config`` and no embedded default's data (``--data``) here.

    """
    if args.config is not None:
        return config_mod.load(args.config)
    data = args.data.resolve()
    if not (data / "users").is_file():
        raise ConfigError(
            f"no --config FILE given, and no embedded default's data in {data}: name the"
            " server's configuration with --config FILE"
        )
    print(  # noqa: T201 (a note for the person at the terminal)
        f"pop3d {command}: no --config: using the embedded default's data in {data}",
        file=sys.stderr,
    )
    return demo.default_config(data)


def build_store(cfg: Config) -> Any:
    """Return the mail store of ``[storage]`` (Maildir or mbox)."""
    from pop3d import pgbackends  # noqa: PLC0415 (PostgreSQL store or cluster-wide locks)

    if pgbackends.uses_database(cfg):
        return pgbackends.build_store(cfg)
    if cfg.storage.mbox is not None:
        from pop3d.storage.mbox import MboxStore  # noqa: PLC0415

        return MboxStore.from_config(cfg.storage)
    from pop3d.storage.maildir import MaildirStore  # noqa: PLC0415

    return MaildirStore.from_config(cfg.storage)


def build_authenticator(cfg: Config) -> Any:
    """Return the authenticator of ``[auth]``."""
    from pop3d.auth.passwd_file import PasswdFileAuthenticator  # noqa: PLC0415

    if cfg.auth.backend == "postgresql":
        from pop3d import pgbackends  # noqa: PLC0415

        return pgbackends.build_authenticator(cfg)

    if cfg.auth.passwd_file is None:
        raise ConfigError("[auth] passwd_file is required")
    if not cfg.auth.passwd_file.is_file():
        raise ConfigError(f"[auth] passwd_file {cfg.auth.passwd_file} does not exist")
    return PasswdFileAuthenticator.from_config(cfg.auth)


def build_backends(cfg: Config, authenticator: Any, store: Any) -> Backends:
    """What the sessions of one process share: the two backends and ``[auth]``'s delays."""
    return Backends(
        authenticator=authenticator,
        store=store,
        delays=FailureDelays(
            cfg.auth.failure_delay,
            cfg.auth.max_failure_delay,
            ipv6_prefix=cfg.auth.ipv6_penalty_prefix,
        ),
        login_delay=(
            LoginDelay(cfg.auth.login_delay, cfg.auth.login_stamps)
            if cfg.auth.login_delay
            else None
        ),
    )
