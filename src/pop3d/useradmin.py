"""``pop3d user ...`` and ``pop3d mailbox stat``: the operator's side of users and mail.

* ``pop3d user add NAME`` / ``pop3d user passwd NAME`` read the password from a no-echo
  prompt (twice, on a terminal) or, with ``--password-stdin``, from the first line of
  standard input -- never from an argument, where ``ps`` and shell history would show it.
  It is hashed with ``[auth] default_scheme`` (ARGON2ID unless configured).
* ``pop3d user del NAME`` removes the user's line; their mail is left where it is.
* ``pop3d user list`` prints each user with the scheme of their stored password (never
  the hash) and their quota field, if any.
* Every change rewrites the passwd-file atomically (temporary file, fsync, rename; other
  lines byte for byte) through :func:`pop3d.auth.passwd_file.update_user`, so a running
  server never reads half a file; it picks the change up by itself.
* ``pop3d mailbox stat USER`` prints the message count, total size (wire octets, as
  STAT reports), the oldest message's date, and quota use against the user's limit.
  It reads without the maildrop's session lock: it works while the user is logged in.

Exit status: 0 done; 1 the user already exists (add) or the passwords differ; 67
(os.EX_NOUSER) no such user; 75 (os.EX_TEMPFAIL) the maildrop cannot be read; 78 (os.EX_CONFIG)
the configuration is unusable (no passwd-file, unknown scheme); 74 (os.EX_IOERR) the
passwd-file cannot be written.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from pop3d.errors import ConfigError, PermanentBackendError, TemporaryBackendError

EX_FAIL = 1


def add_parser(sub: Any) -> None:
    """Register ``user`` (add, passwd, del, list) and ``mailbox`` (stat)."""
    user = sub.add_parser("user", help="add, change, delete or list passwd-file users")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    for name, text in (
        ("add", "add a user (password from a prompt or --password-stdin)"),
        ("passwd", "change a user's password"),
    ):
        p = user_sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("name", help="the user name")
        p.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input",
        )
        p.set_defaults(run=run_add if name == "add" else run_passwd)
    p = user_sub.add_parser("del", help="delete a user (their mail is kept)")
    _common(p)
    p.add_argument("name", help="the user name")
    p.set_defaults(run=run_del)
    p = user_sub.add_parser("list", help="list the users and their password schemes")
    _common(p)
    p.set_defaults(run=run_list)

    mailbox = sub.add_parser("mailbox", help="inspect maildrops")
    mailbox_sub = mailbox.add_subparsers(dest="mailbox_command", required=True, metavar="ACTION")
    p = mailbox_sub.add_parser("stat", help="count, size, oldest message and quota of a user")
    _common(p)
    p.add_argument("name", help="the user name")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_stat)


def _common(p: argparse.ArgumentParser) -> None:
    from pop3d import app  # noqa: PLC0415

    app.add_config_arguments(p)


def _say(text: str, stream: TextIO | None = None) -> None:
    print(text, file=stream or sys.stdout)


def _fail(status: int, text: str) -> int:
    _say(f"pop3d: {text}", sys.stderr)
    return status


def _config(args: argparse.Namespace) -> Any:
    from pop3d import app  # noqa: PLC0415

    return app.load_existing_config(args, str(getattr(args, "command", "user")))


def _passwd_file(cfg: Any) -> Path:
    if cfg.auth.passwd_file is None:
        raise ConfigError("[auth] passwd_file is not set")
    path: Path = cfg.auth.passwd_file
    return path


def read_password(from_stdin: bool) -> bytes | None:
    """The new password: stdin's first line, or a no-echo prompt asked twice.

    Returns ``None`` when the two prompted entries differ.

    Raises:
        ValueError: the password is empty.

    """
    if from_stdin:
        line = sys.stdin.buffer.readline()
        password = line.removesuffix(b"\n").removesuffix(b"\r")
    else:
        first = getpass.getpass("New password: ")
        if getpass.getpass("Retype new password: ") != first:
            return None
        password = first.encode("utf-8")
    if not password:
        raise ValueError("empty password")
    return password


def _new_password_hash(args: argparse.Namespace, scheme: str) -> str | int:
    """Ask for the new password (:func:`read_password`) and hash it with ``scheme``.

    Returns the stored form, or the exit status once the failure has been said.
    """
    from pop3d.auth import schemes  # noqa: PLC0415

    try:
        with warnings.catch_warnings():
            # getpass without a terminal warns, then reads stdin: that is not a prompt.
            warnings.simplefilter("error", getpass.GetPassWarning)
            password = read_password(args.password_stdin)
    except getpass.GetPassWarning:
        return _fail(
            EX_FAIL,
            "no terminal to ask the password on: give it on standard input with"
            " --password-stdin",
        )
    except ValueError:
        return _fail(EX_FAIL, "the password may not be empty")
    except (EOFError, KeyboardInterrupt):
        return _fail(EX_FAIL, "no password given")
    if password is None:
        return _fail(EX_FAIL, "the passwords do not match")
    try:
        return schemes.hash_password(scheme, password)
    except ValueError:
        return _fail(os.EX_CONFIG, f"[auth] default_scheme {scheme} cannot hash")


def _set_password(args: argparse.Namespace, *, adding: bool) -> int:
    if (sql := _sql_user_command(args, "add" if adding else "passwd")) is not None:
        return sql
    from pop3d.auth.passwd_file import list_users, update_user, valid_username  # noqa: PLC0415

    try:
        cfg = _config(args)
        path = _passwd_file(cfg)
    except ConfigError as exc:
        return _fail(os.EX_CONFIG, f"configuration: {exc}")
    if not valid_username(args.name):
        return _fail(EX_FAIL, "invalid user name")
    try:
        known = {u.username for u in list_users(path)} if path.exists() else set()
    except OSError as exc:
        return _fail(os.EX_IOERR, f"cannot read {path}: {exc.strerror}")
    if adding and args.name in known:
        return _fail(EX_FAIL, f"user {args.name} already exists")
    if not adding and args.name not in known:
        return _fail(os.EX_NOUSER, f"no such user {args.name}")
    stored = _new_password_hash(args, cfg.auth.default_scheme)
    if isinstance(stored, int):
        return stored
    try:
        update_user(path, args.name, stored)
    except OSError as exc:
        return _fail(os.EX_IOERR, f"cannot write {path}: {exc.strerror}")
    _say(f"{'added' if adding else 'changed the password of'} {args.name}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    """``pop3d user add NAME``."""
    return _set_password(args, adding=True)


def run_passwd(args: argparse.Namespace) -> int:
    """``pop3d user passwd NAME``."""
    return _set_password(args, adding=False)


def run_del(args: argparse.Namespace) -> int:
    """``pop3d user del NAME``."""
    if (sql := _sql_user_command(args, "del")) is not None:
        return sql
    from pop3d.auth.passwd_file import update_user  # noqa: PLC0415

    try:
        path = _passwd_file(_config(args))
    except ConfigError as exc:
        return _fail(os.EX_CONFIG, f"configuration: {exc}")
    try:
        found = path.exists() and update_user(path, args.name, None)
    except ValueError:
        found = False
    except OSError as exc:
        return _fail(os.EX_IOERR, f"cannot write {path}: {exc.strerror}")
    if not found:
        return _fail(os.EX_NOUSER, f"no such user {args.name}")
    _say(f"deleted {args.name} (their mail is kept)")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """``pop3d user list``: one user a line, with password scheme and quota field."""
    if (sql := _sql_user_command(args, "list")) is not None:
        return sql
    from pop3d.auth.passwd_file import list_users  # noqa: PLC0415
    from pop3d.storage.quota import QUOTA_FIELDS  # noqa: PLC0415

    try:
        path = _passwd_file(_config(args))
        users = list_users(path)
    except ConfigError as exc:
        return _fail(os.EX_CONFIG, f"configuration: {exc}")
    except OSError as exc:
        return _fail(os.EX_IOERR, f"cannot read {path}: {exc.strerror}")
    for u in users:
        quota = next((f"{k}={u.attributes[k]}" for k in QUOTA_FIELDS if k in u.attributes), "")
        _say(f"{u.username}\t{u.scheme or '-'}\t{quota}".rstrip())
    return 0


def run_stat(args: argparse.Namespace) -> int:
    """``pop3d mailbox stat USER``."""
    from pop3d import app, pgbackends  # noqa: PLC0415
    from pop3d.storage.quota import quota_for  # noqa: PLC0415

    try:
        cfg = _config(args)
        authenticator = app.build_authenticator(cfg)
        store = app.build_store(cfg)
    except (ConfigError, OSError) as exc:
        return _fail(os.EX_CONFIG, f"configuration: {exc}")

    async def look() -> int:
        principal = await authenticator.lookup(args.name)
        if principal is None:
            return _fail(os.EX_NOUSER, f"no such user {args.name}")
        try:
            limit = quota_for(principal.attributes, cfg.storage.quota)
        except TemporaryBackendError:
            return _fail(os.EX_TEMPFAIL, "the user's quota field cannot be read")
        path_for = getattr(store, "path_for", None)  # the PostgreSQL store has no paths
        try:
            home = principal.attributes.get("home")
            path = path_for(principal.username, home) if path_for else None
        except PermanentBackendError as exc:
            return _fail(os.EX_TEMPFAIL, f"the user's maildrop has no path: {exc}")
        except TemporaryBackendError:
            return _fail(os.EX_TEMPFAIL, "the user name cannot name a maildrop")
        try:
            stats = await store.stat(principal)
        except TemporaryBackendError as exc:
            if getattr(exc, "missing_maildrop", False) or (
                path is not None and not await asyncio.to_thread(os.path.lexists, path)
            ):
                count, size, oldest, note = 0, 0, None, "no maildrop yet"
            else:
                return _fail(os.EX_TEMPFAIL, f"cannot read the maildrop: {exc}")
        else:
            count, size, oldest, note = stats.count, stats.size, stats.oldest, ""
        _report(args, count=count, size=size, oldest=oldest, limit=limit, note=note)
        return 0

    async def look_and_close() -> int:
        try:
            return await look()
        finally:
            # A PostgreSQL pool ends with this loop, not at its teardown (where a pool
            # still connecting would be waited for forever), as in ``pop3d deliver``.
            await pgbackends.shutdown()

    try:
        return asyncio.run(look_and_close())
    finally:
        close = getattr(authenticator, "close", None)
        if close is not None:
            close()


def _report(
    args: argparse.Namespace,
    *,
    count: int,
    size: int,
    oldest: float | None,
    limit: int | None,
    note: str,
) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(oldest)) if oldest else None
    if args.json:
        _say(
            json.dumps(
                {
                    "user": args.name,
                    "messages": count,
                    "size": size,
                    "oldest": oldest,
                    "quota_used": size,
                    "quota_limit": limit,
                }
            )
        )
        return
    _say(f"user:     {args.name}" + (f"  ({note})" if note else ""))
    _say(f"messages: {count}")
    _say(f"size:     {size} octets ({_human(size)})")
    _say(f"oldest:   {when or '-'}")
    if limit is None:
        _say(f"quota:    {_human(size)} used, unlimited")
    else:
        _say(f"quota:    {_human(size)} of {_human(limit)} ({100 * size / limit:.1f}%)")


def _human(octets: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if octets < 1024 or unit == "GiB":
            return f"{octets:.0f} {unit}" if unit == "B" else f"{octets:.1f} {unit}"
        octets /= 1024
    return f"{octets:.1f} TiB"  # pragma: no cover


def _sql_user_command(args: argparse.Namespace, action: str) -> int | None:
    """``pop3d user add|passwd|del|list`` against PostgreSQL; ``None``: not configured so.

    Tried first; with ``[auth] backend = "postgresql"`` the
    ``users`` table of ``pop3d db init`` is managed instead of the passwd-file (exit
    codes as there).
    """
    from pop3d import app, dbadmin  # noqa: PLC0415
    from pop3d.auth import schemes  # noqa: PLC0415
    from pop3d.auth.passwd_file import valid_username  # noqa: PLC0415

    if args.config is None:
        return None  # the embedded default keeps its users in a passwd-file
    try:
        cfg = app.load_config(args)
    except ConfigError:
        return None  # useradmin reports it
    if cfg.auth.backend != "postgresql":
        return None
    try:
        db = dbadmin.database_of(cfg)
    except ConfigError as exc:
        return _fail(os.EX_CONFIG, f"configuration: {exc}")
    fail = _fail
    try:
        if action == "list":
            for name, stored, quota in asyncio.run(dbadmin.list_users(db)):
                scheme = schemes.scheme_of(stored) if stored else "-"
                print(f"{name}\t{scheme}\t{f'quota={quota}' if quota else ''}".rstrip())  # noqa: T201
            return 0
        if not valid_username(args.name):
            return fail(EX_FAIL, "invalid user name")
        if action == "del":
            if not asyncio.run(dbadmin.delete_user(db, args.name)):
                return fail(os.EX_NOUSER, f"no such user {args.name}")
            print(f"deleted {args.name} (their mail is kept)")  # noqa: T201
            return 0
        new_hash = _new_password_hash(args, cfg.auth.default_scheme)
        if isinstance(new_hash, int):
            return new_hash
        adding = action == "add"
        if not asyncio.run(dbadmin.set_user_password(db, args.name, new_hash, adding=adding)):
            if adding:
                return fail(EX_FAIL, f"user {args.name} already exists")
            return fail(os.EX_NOUSER, f"no such user {args.name}")
        print(f"{'added' if adding else 'changed the password of'} {args.name}")  # noqa: T201
    except TemporaryBackendError as exc:
        return fail(os.EX_TEMPFAIL, str(exc))
    return 0
