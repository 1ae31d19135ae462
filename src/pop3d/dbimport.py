"""``pop3d import``: copy Maildir or mbox maildrops into the PostgreSQL store.

``pop3d import --config FILE (--maildir TEMPLATE | --mbox TEMPLATE) [--all-users] [USER...]``

* Each source maildrop is opened the way ``pop3d serve`` opens it (its lock taken, so an
  import does not race a session on the old server), listed, and each message copied in
  its own transaction, with the UIDL the old server gave it: clients that "leave mail on
  the server" do not download everything again after the move.
* **Idempotent and resumable.**  A UIDL already in the user's PostgreSQL maildrop is
  skipped (the set is read once per user; ``UNIQUE (mailbox, uidl)`` guards races), so
  an interrupted import is simply run again.
* No source message is changed or deleted (opening a Maildir moves ``new/`` to ``cur/``,
  as a session of any POP3 server would).  Messages are stored in their wire form (CRLF line
  ends), which is what RETR sends from either store; sizes are therefore equal.
* ``--all-users`` imports every user of the ``users`` table.

Exit status: 0 every maildrop copied; 75 some could not be (locked, unreadable, the
database away): run it again; 78 a configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pop3d.errors import ConfigError, MaildropLocked, TemporaryBackendError
from pop3d.protocol.values import Principal

log = logging.getLogger("pop3d.import")


def add_parser(sub: Any) -> None:
    """Register ``import``."""
    from pop3d import app  # noqa: PLC0415

    p = sub.add_parser("import", help="copy Maildir/mbox maildrops into PostgreSQL")
    app.add_config_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--maildir", help="template of the source Maildirs (%%u, %%n, %%d)")
    source.add_argument("--mbox", help="template of the source mbox files (%%u, %%n, %%d)")
    p.add_argument("--all-users", action="store_true", help="every user of the users table")
    p.add_argument("users", nargs="*", help="the users to import")
    p.set_defaults(run=run)


def _say(text: str) -> None:
    print(text, file=sys.stderr)  # noqa: T201


async def import_user(source: Any, target: Any, username: str) -> tuple[int, int]:
    """Copy one user's maildrop; return (copied, skipped as already there).

    Raises:
        MaildropLocked: the source maildrop is in use.
        TemporaryBackendError: it cannot be read, or the database is away.

    """
    principal = Principal(username, {"quota": "0"})  # the old server let it in: no quota
    async with target.database.connection() as conn:
        cur = await conn.execute("SELECT uidl FROM messages WHERE mailbox = %s", (username,))
        present = {str(row[0]) for row in await cur.fetchall()}
    await target.create(username)
    maildrop = await source.open(principal)
    copied = skipped = 0
    try:
        for info in maildrop.listing():
            if info.uid in present:
                skipped += 1
                continue
            await target.deliver(principal, maildrop.read(info.uid), uidl=info.uid)
            copied += 1
    finally:
        await maildrop.close()
    return copied, skipped


def _source_store(args: argparse.Namespace) -> Any:
    if args.maildir:
        from pop3d.storage.maildir import MaildirStore  # noqa: PLC0415

        return MaildirStore(args.maildir, Path.cwd())
    from pop3d.storage.mbox import MboxStore  # noqa: PLC0415

    return MboxStore(args.mbox, Path.cwd())


def run(args: argparse.Namespace) -> int:
    """Run ``pop3d import``."""
    from pop3d import app, pgbackends  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING)
    try:
        cfg = app.load_existing_config(args, "import")
    except ConfigError as exc:
        _say(f"pop3d import: configuration: {exc}")
        return os.EX_CONFIG
    if cfg.storage.backend != "postgresql":
        _say('pop3d import: configuration: [storage] backend must be "postgresql"')
        return os.EX_CONFIG
    try:
        target = pgbackends.build_store(cfg, pooled=False)
        source = _source_store(args)
    except (ConfigError, ValueError) as exc:
        _say(f"pop3d import: configuration: {exc}")
        return os.EX_CONFIG

    async def go() -> int:
        users = list(args.users)
        if args.all_users:
            async with target.database.connection() as conn:
                cur = await conn.execute("SELECT username FROM users ORDER BY username")
                users += [str(r[0]) for r in await cur.fetchall()]
        status = 0
        for name in users:
            try:
                copied, skipped = await import_user(source, target, name)
            except MaildropLocked:
                _say(f"{name}: maildrop in use; run again later")
                status = os.EX_TEMPFAIL
            except TemporaryBackendError as exc:
                _say(f"{name}: not imported: {exc}")
                status = os.EX_TEMPFAIL
            else:
                _say(f"{name}: {copied} copied, {skipped} already there")
        return status

    return asyncio.run(go())
