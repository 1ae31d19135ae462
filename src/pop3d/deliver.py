"""``pop3d deliver``: a local delivery agent (like ``dovecot-lda``) for Postfix and Exim.

``pop3d deliver [--config FILE] [-f SENDER] USER [MESSAGE_FILE]`` reads one RFC 5322
message from MESSAGE_FILE (or standard input) and delivers it into USER's maildrop --
Maildir or mbox, as ``[storage]`` says -- through the same store ``pop3d serve`` reads.

Rules of this file:

* The exit status is a sysexits(3) code, which MTAs turn into deliver / retry / bounce:
  0 delivered; 67 (EX_NOUSER) the user is not in the passwd-file (the MTA bounces);
  USER may be ``local@domain`` (that user if it exists, else ``local``, as for LMTP);
  75 (EX_TEMPFAIL) anything that may go away -- disk full, lock timeout, an unreadable
  user record, a broken backend, a bug of ours (the MTA retries: mail is never bounced
  because of us); over quota 75 or 77 (EX_NOPERM, a bounce) per ``[storage] quota_exit``;
  64 (EX_USAGE) bad arguments; 66 (EX_NOINPUT) MESSAGE_FILE cannot be opened; 78
  (EX_CONFIG) the configuration cannot be loaded.
* With ``[database]``, the whole delivery is bounded: past ``deliver_timeout`` it is
  cancelled (75), and a watchdog thread ends the process (75) one ``timeout`` later if
  the cancel itself is stuck (a server that answers nothing).  A PostgreSQL delivery is
  one transaction: it is stored whole or not at all.
* The message is streamed in :data:`pop3d.protocol.limits.READ_CHUNK` pieces: its size does not
  change our memory use.  A leading mbox ``From `` envelope line (as ``procmail`` and
  some ``mailbox_command`` setups pass) is not part of the message: it is dropped, and
  its sender is the envelope sender unless ``-f`` gives one (dovecot-lda does the same).
* One line goes to standard error on failure (the MTA puts it in the bounce or the log);
  it names the reason, never the message content.
* Without ``--config`` the embedded default of ``pop3d serve`` is used only if its data
  folder exists (``--data``, or ``$POP3D_DATA``, or ``./pop3d-data``), and stderr says so;
  otherwise the command refuses (78), naming ``--config``: it never creates a folder.
* Run as root with ``[server] user`` set, it becomes that user (and group) before it reads
  or writes anything, so delivered files belong to the mail user, as the server's do.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

from pop3d import privileges
from pop3d.auth.base import find_user
from pop3d.errors import ConfigError, QuotaExceeded, TemporaryBackendError
from pop3d.protocol import limits

log = logging.getLogger("pop3d.deliver")

EX_OK = 0
EX_USAGE = 64
EX_NOINPUT = 66
EX_NOUSER = 67
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

#: Longest leading ``From `` envelope line we look for (Postfix caps addresses near 1000).
_MAX_ENVELOPE_LINE = 4096


def add_parser(sub: Any) -> None:
    """Register ``deliver`` on the ``pop3d`` sub-command parsers."""
    from pop3d import app  # noqa: PLC0415 (--config and --data are read as serve reads them)

    p = sub.add_parser(
        "deliver",
        help="deliver one message from a file or stdin (an LDA for Postfix/Exim)",
        description="Deliver one message into USER's maildrop; exit with a sysexits code.",
    )
    app.add_config_arguments(p)
    p.add_argument("-f", "--from", dest="sender", help="envelope sender (mbox From_ line)")
    p.add_argument("user", help="recipient: a user of the passwd-file")
    p.add_argument("message", nargs="?", type=Path, help="message file (default: stdin)")
    p.set_defaults(run=run)

    def usage_error(message: str) -> NoReturn:
        p.print_usage(sys.stderr)
        print(f"pop3d deliver: {message}", file=sys.stderr)  # noqa: T201
        sys.exit(EX_USAGE)

    # sysexits' EX_USAGE for the MTA, not argparse's 2.
    p.error = usage_error


def _fail(status: int, reason: str) -> int:
    print(f"pop3d deliver: {reason}", file=sys.stderr)  # noqa: T201 (the MTA reads stderr)
    return status


def run(args: argparse.Namespace) -> int:
    """Run ``pop3d deliver``; return its sysexits status."""
    from pop3d import app  # noqa: PLC0415 (config loading and store building are shared)

    try:
        cfg = app.load_existing_config(args, "deliver")
        identity = privileges.resolve(cfg.service)
        if identity is not None and os.geteuid() == 0:
            # Started as root (a pipe transport without user=): mail is the mail user's.
            privileges.drop(
                identity,
                privileges.PRELOAD_DATABASE if cfg.database is not None else (),
            )
        authenticator, store = _backends(cfg)
    except (ConfigError, OSError) as exc:
        return _fail(EX_CONFIG, f"configuration: {exc}")
    try:
        source = open_message(args.message)
    except OSError as exc:
        return _fail(EX_NOINPUT, f"cannot read the message: {exc.strerror}")
    from pop3d import pgbackends  # noqa: PLC0415 (PostgreSQL backends, when configured)

    # [database] deliver_timeout bounds the whole delivery against a database that is
    # slow, down or restarting: 75 (the MTA retries), never a hang.
    deadline = cfg.database.deliver_timeout if cfg.database is not None else None

    async def once() -> int:
        try:
            async with asyncio.timeout(deadline):
                return await deliver(
                    authenticator,
                    store,
                    args.user,
                    source,
                    sender=args.sender,
                    quota_exit=cfg.storage.quota_exit,
                )
        except TimeoutError:
            return _fail(EX_TEMPFAIL, f"temporary failure: database deadline "
                                      f"({deadline:g} s) passed")
        finally:
            if pgbackends.uses_database(cfg):
                await pgbackends.shutdown()

    # Past the deadline, cancelling the database work may take one more [database]
    # timeout; then the watchdog ends the process whatever it waits for.
    watchdog = (
        _Watchdog(cfg.database.deliver_timeout + cfg.database.timeout)
        if cfg.database is not None
        else None
    )
    try:
        return asyncio.run(once())
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if args.message is not None:
            os.close(source)


class _Watchdog:
    """Exit 75 at once if the delivery is still running ``after`` seconds from now.

    A thread, so that nothing the event loop waits for (a stopped server, a blocking
    read) can hold it off.  The uncommitted transaction dies with the connection: the
    mail is stored whole or not at all (at worst twice, if a commit was already on its
    way when the deadline passed and the MTA retries).
    """

    def __init__(self, after: float) -> None:
        self._timer = threading.Timer(after, self._expired)
        self._timer.daemon = True
        self._timer.start()

    @staticmethod
    def _expired() -> None:
        _fail(EX_TEMPFAIL, "temporary failure: database deadline passed, giving up")
        sys.stderr.flush()
        os._exit(EX_TEMPFAIL)

    def cancel(self) -> None:
        """The delivery ended in time."""
        self._timer.cancel()


def _backends(cfg: Any) -> tuple[Any, Any]:
    """The authenticator and the store, without a connection pool.

    One delivery is one or two requests: each opens its own connection, bounded by
    ``[database] timeout``, and closes it; no pool task outlives the delivery or is
    waited for at its end.
    """
    from pop3d import app, pgbackends  # noqa: PLC0415

    if cfg.auth.backend == "postgresql":
        authenticator = pgbackends.build_authenticator(cfg, pooled=False)
    else:
        authenticator = app.build_authenticator(cfg)
    if pgbackends.uses_database(cfg):
        store = pgbackends.build_store(cfg, pooled=False)
    else:
        store = app.build_store(cfg)
    return authenticator, store


def open_message(path: Path | None) -> int:
    """Return a readable file descriptor of the message: ``path``, or standard input."""
    if path is None:
        return sys.stdin.fileno()
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


async def deliver(
    authenticator: Any,
    store: Any,
    username: str,
    fd: int,
    *,
    sender: str | None = None,
    quota_exit: int = EX_TEMPFAIL,
) -> int:
    """Deliver the message readable at ``fd`` to ``username``; return a sysexits status.

    Args:
        authenticator: an ``Authenticator`` to look the user up in.
        store: a ``Deliverer`` (an :class:`~pop3d.storage.mbox.MboxStore` also gets the
            envelope sender).
        username: the recipient.
        fd: where the message is read from, in :data:`~pop3d.protocol.limits.READ_CHUNK` pieces.
        sender: the envelope sender, if known.
        quota_exit: the status for a delivery over quota (75 or 77).

    """
    try:
        principal = await find_user(authenticator, username)
    except TemporaryBackendError as exc:  # expected (a database down): one line
        return _fail(EX_TEMPFAIL, f"temporary failure: user lookup: {exc}")
    except Exception as exc:
        log.exception("user lookup failed")
        return _fail(EX_TEMPFAIL, f"user lookup failed: {type(exc).__name__}")
    if principal is None:
        return _fail(EX_NOUSER, "no such user")
    from pop3d.storage.mbox import MboxStore  # noqa: PLC0415

    try:
        first, sender = _envelope(fd, sender)

        async def chunks() -> AsyncIterator[bytes]:
            data = first
            while data:
                yield data
                data = _read(fd)

        if isinstance(store, MboxStore):
            await store.deliver(principal, chunks(), sender=sender)
        else:
            await store.deliver(principal, chunks())
    except QuotaExceeded:
        return _fail(quota_exit, "mailbox is over quota")
    except TemporaryBackendError as exc:
        return _fail(EX_TEMPFAIL, f"temporary failure: {exc}")
    except OSError as exc:
        return _fail(EX_TEMPFAIL, f"temporary failure: {exc.strerror}")
    except Exception as exc:  # a bug: retried by the MTA, never bounced
        log.exception("delivery failed")
        return _fail(EX_TEMPFAIL, f"internal error: {type(exc).__name__}")
    return EX_OK


def _envelope(fd: int, sender: str | None) -> tuple[bytes, str | None]:
    """Read the first piece; drop a leading ``From `` envelope line, taking its sender."""
    first = _read(fd)
    if not first.startswith(b"From "):
        return first, sender
    while b"\n" not in first and len(first) < _MAX_ENVELOPE_LINE:
        more = _read(fd)
        if not more:
            break
        first += more
    line, _, first = first.partition(b"\n")
    if sender is None:
        parts = line.split()
        sender = parts[1].decode("utf-8", "replace") if len(parts) > 1 else None
    return first or _read(fd), sender


def _read(fd: int) -> bytes:
    """The next piece of the message (the read blocks: this process does nothing else)."""
    return os.read(fd, limits.READ_CHUNK)
