"""``pop3d check-config [--config FILE] [--show]``: would ``serve`` start with this config.

:func:`check` is what ``serve`` runs before it binds anything, and what a reload runs before
it starts new workers; ``check-config`` runs it (and tries to bind every address, unless
``--no-bind``, which suits a config whose server is running) and exits 0 or 78
(EX_CONFIG).  Each problem is one line naming the file, the ``[section] key``, what was
expected and what was found::

    /etc/pop3d/pop3d.toml: [tls] cert: expected a readable PEM certificate, got
        /etc/pop3d/cert.pem: No such file or directory

``--show`` prints the effective settings, every key with its value, the defaults marked
``# default`` (as ``doveconf`` does, which prints only the changed ones with ``-n``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import ssl
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pop3d import config as config_mod
from pop3d import privileges
from pop3d.config import CertPair, Config, ListenAddress
from pop3d.errors import ConfigError

__all__ = ["add_parser", "check", "run_dir_of", "show"]

EX_OK = 0
EX_CONFIG = 78


def add_parser(sub: Any) -> None:
    """Register ``check-config``."""
    from pop3d import app  # noqa: PLC0415

    p = sub.add_parser(
        "check-config",
        help="check a configuration as serve would; exit 0, or 78 naming what is wrong",
    )
    app.add_config_arguments(p)
    p.add_argument("--show", action="store_true", help="print the effective settings")
    p.add_argument(
        "--no-bind",
        action="store_true",
        help="do not try to bind the addresses (the server may be running)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``pop3d check-config``."""
    from pop3d import app  # noqa: PLC0415

    try:
        cfg = app.load_existing_config(args, "check-config")
    except ConfigError as exc:
        print(f"pop3d check-config: {exc}", file=sys.stderr)  # noqa: T201
        return EX_CONFIG
    notes: list[str] = []
    problems = check(cfg, bind=not args.no_bind, warnings=notes)
    if args.show:
        sys.stdout.write(show(cfg))
    for note in notes:
        print(f"pop3d check-config: warning: {note}", file=sys.stderr)  # noqa: T201
    for problem in problems:
        print(f"pop3d check-config: {problem}", file=sys.stderr)  # noqa: T201
    if problems:
        return EX_CONFIG
    print(f"pop3d check-config: {cfg.path or 'the embedded default'} is good", file=sys.stderr)  # noqa: T201
    return EX_OK


def run_dir_of(cfg: Config) -> Path:
    """Where the admin sockets and the metrics' files go (``[server] run_dir``)."""
    if cfg.service.run_dir is not None:
        return cfg.service.run_dir
    return cfg.storage.base / "run"


# ---------------------------------------------------------------------- checking


def check(
    cfg: Config, *, bind: bool, tls: bool = True, warnings: list[str] | None = None
) -> list[str]:
    """Every problem that would stop ``serve`` (or a reload) with ``cfg``; empty if none.

    Args:
        cfg: a loaded configuration (syntax and types are checked at load).
        bind: also try to bind each address (``check-config``; ``serve`` binds anyway).
        tls: also load the certificates (a reload loads them itself).
        warnings: where to add what serve would start with but warn about (passwd-file
            lines it skips), each named like a problem.

    """
    problems: list[str] = []
    notes: list[str] = []
    identity = None
    try:
        identity = privileges.resolve(cfg.service)
    except ConfigError as exc:
        problems.append(str(exc))
    if identity is not None and os.geteuid() not in (0, identity.uid):
        problems.append(
            f"[server] user: expected pop3d to be started as root (or as {identity.user})"
            f" to run as {identity.user}, got uid {os.geteuid()}"
        )
    if tls and cfg.tls is not None:
        problems += _check_pair("[tls]", cfg.tls.default)
        for name, pair in cfg.tls.sni.items():
            problems += _check_pair(f"[tls.sni.{name}]", pair)
        if cfg.tls.client_ca is not None:
            try:
                ssl.create_default_context(cafile=str(cfg.tls.client_ca))
            except (OSError, ssl.SSLError) as exc:
                problems.append(
                    f"[tls] client_ca: expected a readable PEM CA bundle, got"
                    f" {cfg.tls.client_ca}: {_reason(exc)}"
                )
    if cfg.server.tls_listen and cfg.tls is None:
        problems.append("[server] tls_listen: expected a [tls] section with cert and key, got none")
    problems += _check_passwd_file(cfg, identity, notes)
    problems += _check_storage(cfg, identity)
    problems += _check_log(cfg)
    for address in cfg.lmtp.listen:
        if address.startswith("unix:"):
            folder = Path(address.removeprefix("unix:")).parent
            if not folder.is_dir():
                problems.append(
                    f"[lmtp] listen: expected an existing folder for {address}, got no {folder}"
                )
    if bind:
        problems += _check_bind(cfg)
    problems += _check_run_dir(cfg)
    where = f"{cfg.path}: " if cfg.path is not None else ""
    if warnings is not None:
        warnings += [where + n for n in notes]
    return [where + p for p in problems]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _check_pair(where: str, pair: CertPair) -> list[str]:
    problems = []
    texts: dict[str, bytes] = {}
    for key, path, expected, marker in (
        ("cert", pair.cert, "a readable PEM certificate", b"-----BEGIN CERTIFICATE-----"),
        ("key", pair.key, "a readable PEM private key", b"PRIVATE KEY-----"),
    ):
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(f"{where} {key}: expected {expected}, got {path}: {_reason(exc)}")
            continue
        if marker not in data:
            problems.append(
                f"{where} {key}: expected {expected}, got {path}: no {marker.decode()} in it"
            )
            continue
        texts[key] = data
    if problems:
        return problems
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(pair.cert, pair.key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            mismatch = (
                f"{where} key: expected the private key of {pair.cert}, got {pair.key}:"
                " it does not match the certificate"
            )
            return [mismatch]
        unusable = (
            f"{where} cert, key: expected a PEM certificate and its key, got {pair.cert},"
            f" {pair.key}: {_reason(exc)}"
        )
        return [unusable]
    except OSError as exc:
        return [f"{where} cert, key: cannot be read: {_reason(exc)}"]
    return []


#: The mode bits that allow reading, and writing plus entering, for owner, group, others.
_READ = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
_WRITE = (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)


def _allowed(
    path: Path, identity: privileges.Identity | None, bits: tuple[int, int, int]
) -> bool:
    """Whether ``identity`` (or this process) has ``bits`` on ``path``, by its mode bits."""
    if identity is None or identity.uid == os.geteuid():
        return os.access(path, os.R_OK if bits == _READ else os.W_OK | os.X_OK)
    st = path.stat()
    if st.st_uid == identity.uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid in identity.groups or st.st_gid == identity.gid:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


@contextlib.contextmanager
def _warnings_of(logger: logging.Logger) -> Iterator[list[str]]:
    """Collect what ``logger`` warns about (the passwd-file parser's skipped lines)."""
    found: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage())

    handler = _Collect(logging.WARNING)
    saved = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved


def _check_run_dir(cfg: Config) -> list[str]:
    folder = run_dir_of(cfg)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        message = (
            f"[server] run_dir: expected a folder pop3d can create or write (admin sockets,"
            f" metrics), got {folder} ({existing} is not writable)"
        )
        return [message]
    return []


def _check_passwd_file(
    cfg: Config, identity: privileges.Identity | None, notes: list[str]
) -> list[str]:
    from pop3d.auth import passwd_file  # noqa: PLC0415

    if getattr(cfg.auth, "backend", "passwd-file") != "passwd-file":
        return []  # users in a database: checked by its own backend
    path = cfg.auth.passwd_file
    if path is None:
        return ["[auth] passwd_file: expected the path of a passwd-file, got none"]
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [f"[auth] passwd_file: expected a readable passwd-file, got {path}: {_reason(exc)}"]
    with _warnings_of(passwd_file.log) as warnings:
        passwd_file.parse_passwd_file(data, str(path))
    notes += [f"[auth] passwd_file: {w} (serve skips it)" for w in warnings]
    problems = []
    if identity is not None and not _allowed(path, identity, _READ):
        problems.append(
            f"[auth] passwd_file: expected a file that user {identity.user} can read (the"
            f" workers read it after dropping root), got {path} with mode"
            f" {stat.filemode(path.stat().st_mode)}"
        )
    return problems


def _check_storage(cfg: Config, identity: privileges.Identity | None) -> list[str]:
    from pop3d.storage.template import check_template, static_prefix, uses_home  # noqa: PLC0415

    if cfg.storage.maildir is None and cfg.storage.mbox is None:
        return []  # mail in a database ([storage] backend)
    key = "maildir" if cfg.storage.maildir is not None else "mbox"
    template = cfg.storage.maildir or cfg.storage.mbox or ""
    try:
        check_template(template)
    except ConfigError as exc:
        return [f"[storage] {key}: {exc}"]
    if uses_home(template):
        return []  # each user's home, from the user database: no folder of ours to check
    static = Path(static_prefix(template))
    folder = static if static.is_absolute() else cfg.storage.base / static
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if identity is not None and folder.is_dir() and not _allowed(folder, identity, _WRITE):
        message = (
            f"[storage] {key}: expected a folder that user {identity.user} can write (mail,"
            f" locks), got {folder} owned by uid {folder.stat().st_uid}"
        )
        return [message]
    return []


def _check_log(cfg: Config) -> list[str]:
    if cfg.log.target == "file" and cfg.log.file is not None:
        folder = cfg.log.file.parent
        if not folder.is_dir():
            return [f"[log] file: expected a file in an existing folder, got {cfg.log.file}"]
    if cfg.log.target == "syslog" and not cfg.log.syslog_socket.exists():
        message = (
            f"[log] syslog_socket: expected a syslog socket, got {cfg.log.syslog_socket}:"
            " no such file"
        )
        return [message]
    return []


def _check_bind(cfg: Config) -> list[str]:
    problems = []
    addresses: list[tuple[str, ListenAddress]] = [
        *(("[server] listen", a) for a in cfg.server.listen),
        *(("[server] tls_listen", a) for a in cfg.server.tls_listen),
    ]
    addresses += [
        ("[lmtp] listen", config_mod.parse_address(text, "[lmtp] listen"))
        for text in cfg.lmtp.listen
        if not text.startswith("unix:")
    ]
    if cfg.metrics.listen is not None:
        addresses.append(("[metrics] listen", cfg.metrics.listen))
    for key, address in addresses:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address.host, address.port))
            except OSError as exc:
                problems.append(
                    f"{key}: expected an address this host can listen on, got {address}:"
                    f" {_reason(exc)}"
                )
    return problems


# ---------------------------------------------------------------------- --show


def _value(value: object) -> str | None:
    """``value`` as TOML text, or ``None`` when unset."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, ListenAddress | Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        value = str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        parts = [_value(v) or '""' for v in value]
        return "[" + ", ".join(parts) + "]"
    return _value(str(value))


def _section(
    name: str, obj: object, default: object, base: Path, skip: tuple[str, ...] = ()
) -> list[str]:
    lines = [f"[{name}]"]
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if name == "server" and f.name == "workers" and value == 0:
            value = "auto"
        was = getattr(default, f.name, object())
        # A relative default path is shown resolved against the config's folder.
        same = value == was or (isinstance(was, Path) and value == base / was)
        text = _value(value)
        mark = "  # default" if same else ""
        if text is None:
            lines.append(f"# {f.name} is not set{mark}")
        else:
            lines.append(f"{f.name} = {text}{mark}")
    return [*lines, ""]


def show(cfg: Config) -> str:
    """The effective settings as TOML, defaults marked ``# default``."""
    base = cfg.storage.base
    out = [f"# pop3d settings from {cfg.path or 'the embedded default'}", ""]
    server = _section("server", cfg.server, config_mod.ServerConfig(), base)
    service = _section(
        "server", cfg.service, config_mod.ServiceConfig(run_dir=Path("run")), base
    )[1:]
    out += server[:-1] + service
    if cfg.tls is not None:
        out += [
            "[tls]",
            f"cert = {_value(cfg.tls.default.cert)}",
            f"key = {_value(cfg.tls.default.key)}",
        ]
        out.append(
            f"client_ca = {_value(cfg.tls.client_ca)}"
            if cfg.tls.client_ca
            else "# client_ca is not set  # default"
        )
        out.append("")
        for name, pair in cfg.tls.sni.items():
            out += [
                f'[tls.sni."{name}"]',
                f"cert = {_value(pair.cert)}",
                f"key = {_value(pair.key)}",
                "",
            ]
    else:
        out += ["# [tls] is not set: no STLS, no POP3S  # default", ""]
    out += _section("auth", cfg.auth, config_mod.AuthConfig(), base)
    out += _section("storage", cfg.storage, config_mod.StorageConfig(), base, skip=("base",))
    out += _section("lmtp", cfg.lmtp, config_mod.LmtpConfig(), base)
    out += _section("metrics", cfg.metrics, config_mod.MetricsConfig(), base)
    out += _section("log", cfg.log, config_mod.LogConfig(), base)
    return "\n".join(out).rstrip("\n") + "\n"
