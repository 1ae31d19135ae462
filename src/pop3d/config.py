"""The TOML configuration, read once into frozen dataclasses and validated at load.

Relative paths are resolved against the folder of the config file.  Unknown keys are an
error (a typo must not silently fall back to a default on a mail server).
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pop3d import limits
from pop3d.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A TCP address to listen on (``host:port``, ``[v6]:port``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``."""

    listen: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 1110),)
    tls_listen: tuple[ListenAddress, ...] = ()
    idle_timeout: float = limits.DEFAULT_IDLE_TIMEOUT
    #: Worker processes sharing the listening sockets; 0 means one per core ("auto").
    workers: int = 0
    max_connections: int = 20000
    max_connections_per_ip: int = 1000
    #: Text of the greeting after ``+OK``.
    greeting: str = "POP3 server ready"
    #: Host name used in the APOP timestamp.
    hostname: str = "localhost"


@dataclass(frozen=True, slots=True)
class CertPair:
    """A certificate chain and its key."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``[tls]``: the default certificate, per-name certificates (SNI), client CA."""

    default: CertPair
    sni: Mapping[str, CertPair] = field(default_factory=dict)
    #: CA bundle that client certificates must chain to (enables SASL EXTERNAL).
    client_ca: Path | None = None


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """``[auth]``."""

    passwd_file: Path | None = None
    plaintext_without_tls: bool = False
    secure_networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    apop: bool = False
    failure_delay: float = limits.DEFAULT_AUTH_FAILURE_DELAY
    max_failure_delay: float = limits.MAX_AUTH_FAILURE_DELAY
    #: Scheme ``pop3d user add`` hashes new passwords with.
    default_scheme: str = "ARGON2ID"
    #: SASL mechanisms offered.  CRAM-MD5 and SCRAM-SHA-256 are not in the default: they
    #: need PLAIN (or matching) secrets, and clients such as curl pick them when offered and
    #: do not fall back, so users with hashed passwords (``pop3d user add``) could not log in.
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "EXTERNAL")
    #: RFC 2449 LOGIN-DELAY: minimum seconds between two logins of a user (0: none, and
    #: the capability is not advertised).
    login_delay: int = 0
    #: Folder of the per-user last-login stamps, shared by every process of the server.
    login_stamps: Path = Path("login-stamps")
    #: Where users come from: ``"passwd-file"`` or ``"postgresql"`` (:mod:`pop3d.auth.sql`).
    backend: str = "passwd-file"
    #: SQL returning ``username, password`` (plus optional fields) for ``%(user)s``;
    #: ``None``: the query on the schema ``pop3d db init`` creates.
    password_query: str | None = None
    #: SQL returning the user without a password (LMTP, EXTERNAL); ``None``: derived.
    user_query: str | None = None


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: exactly one of ``maildir`` and ``mbox`` templates."""

    maildir: str | None = None
    mbox: str | None = None
    #: Folder that relative templates are resolved against (the config file's folder).
    base: Path = Path()
    #: Default per-user quota in octets; ``None`` means unlimited.
    quota: int | None = None
    #: sysexits code ``pop3d deliver`` returns over quota: 75 (retry) or 77 (bounce).
    quota_exit: int = 75
    #: Where session locks live (:mod:`pop3d.storage.locking`): a lock table folder,
    #: ``"per-mailbox"`` for one lock file per maildrop, or ``None`` for the default
    #: (``.pop3d-locks`` in the template's static folder).
    lock_table: Path | Literal["per-mailbox"] | None = None
    #: ``"maildir"``, ``"mbox"`` (chosen by their template keys) or ``"postgresql"``.
    backend: str = "maildir"
    #: The maildrop lock: ``"local"`` (flock) or ``"postgresql"`` (cluster-wide lease,
    #: :mod:`pop3d.cluster_lock`); ``None``: ``"postgresql"`` when ``[database]`` is set.
    lock: str | None = None


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """``[database]``: the PostgreSQL that users, mail and cluster locks live in."""

    #: psycopg 3 conninfo or URL.
    url: str
    #: Connections each process keeps open (at least) and may open (at most).
    pool_min: int = 1
    pool_max: int = 10
    #: Seconds a query (or waiting for a pooled connection) may take before the reply
    #: is ``-ERR [SYS/TEMP]``.
    timeout: float = 5.0
    #: Seconds a maildrop lease outlives the last heartbeat of the node holding it.
    lock_ttl: float = 30.0


@dataclass(frozen=True, slots=True)
class LmtpConfig:
    """``[lmtp]``."""

    listen: tuple[str, ...] = ()
    max_message_size: int = 50 * 1024 * 1024
    hostname: str = "localhost"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    server: ServerConfig = ServerConfig()
    tls: TlsConfig | None = None
    auth: AuthConfig = AuthConfig()
    storage: StorageConfig = StorageConfig(maildir="mail/%u/Maildir")
    lmtp: LmtpConfig = LmtpConfig()
    database: DatabaseConfig | None = None
    #: The file this was read from (``None`` for the embedded default).
    path: Path | None = None


def parse_size(value: object, where: str) -> int:
    """Parse ``100M``/``1G``/``512K``/``12345`` into octets."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("B")
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
        digits = text[:-1] if scale != 1 else text
        if digits.isascii() and digits.isdigit():
            return int(digits) * scale
    raise ConfigError(f"{where}: expected a size like 100M, got {value!r}")


def parse_address(text: object, where: str) -> ListenAddress:
    """Parse ``127.0.0.1:110`` or ``[::1]:110``."""
    if not isinstance(text, str):
        raise ConfigError(f'{where}: expected "host:port", got {text!r}')
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f'{where}: expected "host:port", got {text!r}')
    return ListenAddress(host, int(port))


class _Section:
    """Reads one TOML table, remembering which keys were used so typos are reported."""

    def __init__(self, data: Mapping[str, Any], name: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"[{name}] must be a table")
        self.data = data
        self.name = name
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            raise ConfigError(f"[{self.name}] {key}: wrong type {type(value).__name__}")
        return value

    def done(self) -> None:
        unknown = set(self.data) - self.used
        if unknown:
            raise ConfigError(f"[{self.name}]: unknown key(s) {', '.join(sorted(unknown))}")


def _path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _server(data: Mapping[str, Any]) -> ServerConfig:
    sec = _Section(data, "server")
    d = ServerConfig()
    listen = tuple(parse_address(a, "[server] listen") for a in sec.get("listen", list, []))
    tls_listen = tuple(
        parse_address(a, "[server] tls_listen") for a in sec.get("tls_listen", list, [])
    )
    if "listen" not in data:
        listen = d.listen
    idle = float(sec.get("idle_timeout", (int, float), d.idle_timeout))
    if idle <= 0:
        raise ConfigError("[server] idle_timeout must be positive")
    workers_raw = sec.get("workers", (int, str), "auto")
    if workers_raw == "auto":
        workers = 0
    elif isinstance(workers_raw, int) and workers_raw >= 1:
        workers = workers_raw
    else:
        raise ConfigError('[server] workers must be a positive number or "auto"')
    cfg = ServerConfig(
        listen=listen,
        tls_listen=tls_listen,
        idle_timeout=idle,
        workers=workers,
        max_connections=sec.get("max_connections", int, d.max_connections),
        max_connections_per_ip=sec.get("max_connections_per_ip", int, d.max_connections_per_ip),
        greeting=sec.get("greeting", str, d.greeting),
        hostname=sec.get("hostname", str, d.hostname),
    )
    sec.done()
    if not cfg.listen and not cfg.tls_listen:
        raise ConfigError("[server]: no listen or tls_listen address")
    return cfg


def _tls(data: Mapping[str, Any], base: Path) -> TlsConfig:
    sec = _Section(data, "tls")
    cert = sec.get("cert", str, None)
    key = sec.get("key", str, None)
    if cert is None or key is None:
        raise ConfigError("[tls] needs both cert and key")
    sni: dict[str, CertPair] = {}
    for name, entry in sec.get("sni", dict, {}).items():
        sub = _Section(entry, f"tls.sni.{name}")
        c, k = sub.get("cert", str, None), sub.get("key", str, None)
        if c is None or k is None:
            raise ConfigError(f"[tls.sni.{name}] needs both cert and key")
        sub.done()
        sni[name.lower()] = CertPair(_path(base, c), _path(base, k))
    ca = sec.get("client_ca", str, None)
    sec.done()
    return TlsConfig(
        default=CertPair(_path(base, cert), _path(base, key)),
        sni=sni,
        client_ca=_path(base, ca) if ca else None,
    )


def _auth(data: Mapping[str, Any], base: Path) -> AuthConfig:
    sec = _Section(data, "auth")
    d = AuthConfig()
    pf = sec.get("passwd_file", str, None)
    try:
        nets = tuple(
            ipaddress.ip_network(n, strict=False)
            for n in sec.get("secure_networks", list, [str(n) for n in d.secure_networks])
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"[auth] secure_networks: {exc}") from None
    mechs = tuple(str(m).upper() for m in sec.get("mechanisms", list, list(d.mechanisms)))
    cfg = AuthConfig(
        passwd_file=_path(base, pf) if pf else None,
        plaintext_without_tls=sec.get("plaintext_without_tls", bool, d.plaintext_without_tls),
        secure_networks=nets,
        apop=sec.get("apop", bool, d.apop),
        failure_delay=float(sec.get("failure_delay", (int, float), d.failure_delay)),
        max_failure_delay=float(sec.get("max_failure_delay", (int, float), d.max_failure_delay)),
        default_scheme=sec.get("default_scheme", str, d.default_scheme).upper(),
        mechanisms=mechs,
        login_delay=sec.get("login_delay", int, d.login_delay),
        login_stamps=_path(base, sec.get("login_stamps", str, str(d.login_stamps))),
        backend=sec.get("backend", str, d.backend),
        password_query=sec.get("password_query", str, None),
        user_query=sec.get("user_query", str, None),
    )
    sec.done()
    if cfg.backend not in ("passwd-file", "postgresql"):
        raise ConfigError('[auth] backend must be "passwd-file" or "postgresql"')
    if cfg.login_delay < 0:
        raise ConfigError("[auth] login_delay: must be 0 (none) or a number of seconds")
    return cfg


def _storage(data: Mapping[str, Any], base: Path) -> StorageConfig:
    sec = _Section(data, "storage")
    maildir = sec.get("maildir", str, None)
    mbox = sec.get("mbox", str, None)
    quota = sec.get("quota", (int, str), None)
    quota_exit = sec.get("quota_exit", int, 75)
    lock_table = sec.get("lock_table", str, None)
    backend = sec.get("backend", str, "mbox" if mbox is not None else "maildir")
    lock = sec.get("lock", str, None)
    sec.done()
    if lock not in (None, "local", "postgresql"):
        raise ConfigError('[storage] lock must be "local" or "postgresql"')
    if backend == "postgresql":
        if maildir is not None or mbox is not None:
            raise ConfigError('[storage] backend = "postgresql" takes no maildir or mbox')
    elif backend not in ("maildir", "mbox"):
        raise ConfigError('[storage] backend must be "maildir", "mbox" or "postgresql"')
    elif (maildir is None) == (mbox is None):
        raise ConfigError("[storage] needs exactly one of maildir and mbox")
    if quota_exit not in (75, 77):
        raise ConfigError("[storage] quota_exit must be 75 (retry) or 77 (bounce)")
    if lock_table is not None and not lock_table.strip():
        raise ConfigError('[storage] lock_table must be a folder path or "per-mailbox"')
    return StorageConfig(
        maildir=maildir,
        mbox=mbox,
        base=base,
        quota=None if quota is None else parse_size(quota, "[storage] quota"),
        quota_exit=quota_exit,
        lock_table=(
            None if lock_table is None
            else "per-mailbox" if lock_table == "per-mailbox"
            else _path(base, lock_table)
        ),
        backend=backend,
        lock=lock,
    )


def _database(data: Mapping[str, Any]) -> DatabaseConfig:
    sec = _Section(data, "database")
    url = sec.get("url", str, None)
    d = DatabaseConfig(url="")
    cfg = DatabaseConfig(
        url=url or "",
        pool_min=sec.get("pool_min", int, d.pool_min),
        pool_max=sec.get("pool_max", int, d.pool_max),
        timeout=float(sec.get("timeout", (int, float), d.timeout)),
        lock_ttl=float(sec.get("lock_ttl", (int, float), d.lock_ttl)),
    )
    sec.done()
    if not cfg.url:
        raise ConfigError("[database] url is required")
    if not 0 <= cfg.pool_min <= cfg.pool_max or cfg.pool_max < 1:
        raise ConfigError("[database] needs 0 <= pool_min <= pool_max and pool_max >= 1")
    if cfg.timeout <= 0 or cfg.lock_ttl < 3 * cfg.timeout:
        raise ConfigError("[database] timeout must be positive and lock_ttl at least 3 x timeout")
    return cfg


def _lmtp(data: Mapping[str, Any]) -> LmtpConfig:
    sec = _Section(data, "lmtp")
    d = LmtpConfig()
    listen = tuple(str(a) for a in sec.get("listen", list, []))
    for a in listen:
        if not a.startswith("unix:"):
            parse_address(a, "[lmtp] listen")
    cfg = LmtpConfig(
        listen=listen,
        max_message_size=parse_size(
            sec.get("max_message_size", (int, str), d.max_message_size),
            "[lmtp] max_message_size",
        ),
        hostname=sec.get("hostname", str, d.hostname),
    )
    sec.done()
    return cfg


def from_mapping(data: Mapping[str, Any], base: Path, path: Path | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML, resolving paths against ``base``."""
    unknown = set(data) - {"server", "tls", "auth", "storage", "lmtp", "database"}
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))}")
    cfg = Config(
        server=_server(data.get("server", {})),
        tls=_tls(data["tls"], base) if "tls" in data else None,
        auth=_auth(data.get("auth", {}), base),
        storage=_storage(data.get("storage", {"maildir": "mail/%u/Maildir"}), base),
        lmtp=_lmtp(data.get("lmtp", {})),
        database=_database(data["database"]) if "database" in data else None,
        path=path,
    )
    if cfg.database is None and "postgresql" in (cfg.auth.backend, cfg.storage.backend):
        raise ConfigError('a "postgresql" backend needs [database] url')
    return cfg


def load(path: Path) -> Config:
    """Read and validate the config file at ``path``.

    Raises:
        ConfigError: the file is missing, not TOML, or not a valid pop3d config.

    """
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return from_mapping(data, path.resolve().parent, path)
