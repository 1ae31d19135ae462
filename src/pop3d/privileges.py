"""Dropping root: the user, groups and capabilities of every process that talks to clients.

``pop3d serve`` started as root binds its sockets, reads its certificates and keys and opens
its log as root, in the supervisor.  Each process it then forks to talk to clients (the
POP3/LMTP workers, the metrics endpoint) calls :func:`drop` before it serves anything:

1. ``setgroups`` to the user's supplementary groups (``initgroups``, as ``login`` does),
2. ``setgid`` to ``[server] group`` (default: the user's primary group),
3. ``setuid`` to ``[server] user``: real, effective and saved ids, so root cannot come back;
   the kernel clears the permitted and effective capability sets with it,
4. every capability dropped from the bounding set too (``PR_CAPBSET_DROP``),
5. ``PR_SET_NO_NEW_PRIVS``: no exec'd program (a setuid binary) can gain privileges.

It then checks the result (:func:`current`): ids as asked, no capability left.  A process
that cannot drop exits rather than serve as root.  The supervisor keeps root: it talks to
no client, and it needs root to re-read certificates on SIGHUP and to fork new workers.

``[server] user = "root"`` is refused unless ``allow_root = true``.  Without ``user``, pop3d
runs as whoever started it (root included, with a warning: the embedded default, CI).
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import importlib
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from pop3d.config import ServiceConfig
from pop3d.errors import ConfigError

__all__ = ["Identity", "current", "drop", "resolve"]

_PR_CAPBSET_DROP = 24  # <linux/prctl.h>
_PR_SET_NO_NEW_PRIVS = 38
#: The capability sets that grant something now (CapBnd only bounds what could be gained).
_HELD = ("CapInh", "CapPrm", "CapEff", "CapAmb")
#: CAP_LAST_CAP is in /proc/sys/kernel/cap_last_cap; 63 covers every kernel so far.
_MAX_CAP = 63


@dataclass(frozen=True, slots=True)
class Identity:
    """Whom to become: uid, gid and supplementary groups, with the names for messages."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.user} (uid {self.uid}, gid {self.gid})"


def resolve(service: ServiceConfig) -> Identity | None:
    """The identity ``[server] user``/``group`` name, or ``None`` when no user is set.

    Raises:
        ConfigError: the user or group does not exist, or is root without ``allow_root``.

    """
    if service.user is None:
        return None
    try:
        entry = pwd.getpwnam(service.user)
    except KeyError:
        raise ConfigError(
            f"[server] user: expected an existing user, got {service.user!r} (no such user)"
        ) from None
    gid = entry.pw_gid
    if service.group is not None:
        try:
            gid = grp.getgrnam(service.group).gr_gid
        except KeyError:
            raise ConfigError(
                f"[server] group: expected an existing group, got {service.group!r}"
                " (no such group)"
            ) from None
    if entry.pw_uid == 0 and not service.allow_root:
        raise ConfigError(
            f"[server] user: {service.user!r} is root; pop3d refuses to serve mail as root"
            " unless [server] allow_root = true"
        )
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid))))
    return Identity(service.user, entry.pw_uid, gid, groups)


#: Modules a worker may import lazily, loaded before the drop: the interpreter and the
#: virtual environment may sit where the workers' user cannot read (a Python under
#: /root, as on our CI machines), and an import after the drop would then fail.
_PRELOAD = (
    "encodings.ascii", "encodings.latin_1", "encodings.utf_8", "encodings.idna",
    "encodings.raw_unicode_escape", "encodings.unicode_escape",
    "asyncio", "asyncio.sslproto", "asyncio.unix_events", "ssl", "json", "uuid",
    "concurrent.futures.thread", "email.parser", "email.policy", "email.message",
    "email.headerregistry", "uvloop", "wsgiref.simple_server", "http.server",
    "pop3d.lmtp", "pop3d.admin", "pop3d.metrics", "pop3d.auth.passwd_file",
    "pop3d.auth.schemes", "pop3d.protocol.sasl", "pop3d.storage.maildir",
    "pop3d.storage.mbox", "pop3d.storage.quota", "pop3d.storage.beneath", "pop3d.login_delay",
    "pop3d.audit", "pop3d.auth.decoys", "pop3d.auth.verdict", "pop3d.server.accept",
    "pop3d.server.proxy_protocol", "pop3d.server.tls", "pop3d.pgbackends",
    "prometheus_client", "prometheus_client.exposition", "prometheus_client.multiprocess",
    "prometheus_client.openmetrics.exposition",
)


#: What a worker of a config with ``[database]`` imports lazily as well (psycopg is
#: loaded only by the processes that use it).
PRELOAD_DATABASE = (
    "psycopg", "psycopg_pool", "pop3d.database", "pop3d.auth.sql",
    "pop3d.storage.postgresql", "pop3d.cluster_lock",
)


def preload(extra: tuple[str, ...] = ()) -> None:
    """Import what a worker may need later, while every file is still readable."""
    for name in (*_PRELOAD, *extra):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with contextlib.suppress(Exception):  # libpass picks each hash's backend at first use
        from passlib.hash import des_crypt, md5_crypt, sha256_crypt, sha512_crypt  # noqa: PLC0415

        for handler in (des_crypt, md5_crypt, sha256_crypt, sha512_crypt):
            handler.get_backend()


def drop(identity: Identity, preload_also: tuple[str, ...] = ()) -> None:
    """Become ``identity`` for good, with no capability; verify it.

    Imports :data:`_PRELOAD` and ``preload_also`` first (see :func:`preload`).

    Raises:
        PermissionError: not root (and not already ``identity``), or the result is not
            what was asked.

    """
    preload(preload_also)
    if os.geteuid() == 0:
        _drop_bounding_set()  # while CAP_SETPCAP is still held
    if os.geteuid() != identity.uid:
        os.setgroups(list(identity.groups))
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
    _drop_bounding_set()
    _no_new_privs()
    now = current()
    if (
        now.uid != identity.uid
        or now.gid != identity.gid
        or (identity.uid != 0 and any(now.capabilities.get(k, 0) for k in _HELD))
        or not now.no_new_privs
    ):
        raise PermissionError(f"privileges not dropped as asked: {now}")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover (not a C runtime we can call)
        return None


def _drop_bounding_set() -> None:
    """Empty the capability bounding set, as far as this process may (needs CAP_SETPCAP).

    The sets that grant anything (permitted, effective, ambient) are emptied by ``setuid``
    itself; the bounding set only limits what an exec could gain, which ``no_new_privs``
    forbids as well.  A container without CAP_SETPCAP keeps its bounding set.
    """
    libc = _libc()
    if libc is None:
        return
    for cap in range(_MAX_CAP + 1):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            return  # EPERM: no CAP_SETPCAP any more; EINVAL: past the last capability


def _no_new_privs() -> None:
    libc = _libc()
    if libc is not None and libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise PermissionError(f"PR_SET_NO_NEW_PRIVS failed: errno {ctypes.get_errno()}")


@dataclass(frozen=True, slots=True)
class Current:
    """What ``/proc/self/status`` says about this process."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    #: CapInh, CapPrm, CapEff, CapBnd, CapAmb as integers.
    capabilities: dict[str, int]
    no_new_privs: bool


def current(pid: int | str = "self") -> Current:
    """Read the ids, groups, capabilities and no_new_privs of ``pid`` from /proc."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    caps: dict[str, int] = {
        key: int(fields[key], 16)
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
        if key in fields
    }
    # Real, effective, saved, filesystem: all must be the asked one.
    uids = {int(x) for x in fields["Uid"].split()}
    gids = {int(x) for x in fields["Gid"].split()}
    return Current(
        uid=uids.pop() if len(uids) == 1 else -1,
        gid=gids.pop() if len(gids) == 1 else -1,
        groups=tuple(sorted(int(x) for x in fields.get("Groups", "").split())),
        capabilities=caps,
        no_new_privs=fields.get("NoNewPrivs", "0") == "1",
    )
