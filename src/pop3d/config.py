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

from pop3d.errors import ConfigError
from pop3d.protocol import limits
from pop3d.storage.template import check_template

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
    #: Seconds a connection may stay unauthenticated, whatever it sends (default: the
    #: smaller of 60 s and 3 x ``idle_timeout``).
    login_timeout: float = limits.DEFAULT_LOGIN_TIMEOUT
    #: Worker processes sharing the listening sockets; 0 means one per core ("auto").
    workers: int = 0
    max_connections: int = 20000
    max_connections_per_ip: int = 1000
    #: Text of the greeting after ``+OK``.
    greeting: str = "POP3 server ready"
    #: Host name used in the APOP timestamp.
    hostname: str = "localhost"
    #: Load balancers whose connections must start with a PROXY v1/v2 header (and the
    #: only peers whose header is believed): server/accept.py, docs/proxy-protocol.md.
    proxy_protocol_from: tuple[IPNetwork, ...] = ()
    #: Seconds from accept to the start of the session: PROXY header and implicit TLS.
    handshake_timeout: float = limits.HANDSHAKE_TIMEOUT
    #: Implicit-TLS handshakes in progress at once, per worker.
    max_tls_handshakes: int = limits.MAX_TLS_HANDSHAKES


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
    #: The secret key every worker derives SCRAM salts and decoys from (created once, mode
    #: 0600); ``None``: ``pop3d-auth.key`` next to ``passwd_file``.
    key_file: Path | None = None
    #: IPv6 addresses sharing one failure penalty: this many leading bits.
    ipv6_penalty_prefix: int = limits.DEFAULT_IPV6_PENALTY_PREFIX
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
    #: Seconds ``pop3d deliver`` may take in all (however many statements, however slow
    #: the server) before it gives up with EX_TEMPFAIL (75): the MTA retries later.
    deliver_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class LmtpConfig:
    """``[lmtp]``."""

    listen: tuple[str, ...] = ()
    max_message_size: int = 50 * 1024 * 1024
    hostname: str = "localhost"
    #: Connections at once, in total and per client address, counted at accept.
    max_connections: int = limits.LMTP_MAX_CONNECTIONS
    max_connections_per_ip: int = limits.LMTP_MAX_CONNECTIONS_PER_IP


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The service keys of ``[server]``: who the processes run as, how they stop.

    Read from the ``[server]`` table but kept apart from :class:`ServerConfig` (the
    protocol's settings): see :func:`_service` and docs/operations.md.
    """

    #: Run every process that talks to clients as this user (``None``: as started).
    user: str | None = None
    #: ... and this group (default: the user's primary group).
    group: str | None = None
    #: ``user = "root"`` is refused unless this is set.
    allow_root: bool = False
    #: SIGTERM: seconds an UPDATE in progress is given before the rest is cut.
    shutdown_grace: float = limits.SHUTDOWN_GRACE
    #: Folder of the admin sockets (``pop3d who``/``kick``) and the metrics' files
    #: (default: ``run`` beside the config file; ``/run/pop3d`` in production).
    run_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint (off unless ``listen`` is set)."""

    listen: ListenAddress | None = None


#: Where ``[log] target`` may send lines.
LogTarget = Literal["stderr", "syslog", "file"]


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: where lines go, in which shape, from which level."""

    target: LogTarget = "stderr"
    #: ``text`` (one human line) or ``json`` (one JSON object a line).
    format: Literal["text", "json"] = "text"
    level: str = "INFO"
    #: The file of ``target = "file"``.
    file: Path | None = None
    #: The syslog socket of ``target = "syslog"`` (journald listens there too).
    syslog_socket: Path = Path("/dev/log")
    #: The syslog facility.
    facility: str = "mail"


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
    service: ServiceConfig = ServiceConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()


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
            raise ConfigError(
                f"[{self.name}] {key}: expected {_expected(kind)}, got {_toml_type(value)} "
                f"{value!r}"
            )
        return value

    def done(self) -> None:
        unknown = set(self.data) - self.used
        if unknown:
            raise ConfigError(f"[{self.name}]: unknown key(s) {', '.join(sorted(unknown))}")


#: TOML's names for the Python types a key may hold (error messages speak TOML).
_TOML_TYPES: Mapping[type, str] = {
    bool: "a boolean (true/false)",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def _expected(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {int, float}:
        return "a number"
    return " or ".join(_TOML_TYPES.get(k, k.__name__) for k in kinds)


def _toml_type(value: object) -> str:
    for kind in (bool, int, float, str, list, dict):
        if isinstance(value, kind):
            return _TOML_TYPES[kind].split(" (")[0]
    return type(value).__name__


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
    default_login = min(limits.DEFAULT_LOGIN_TIMEOUT, limits.LOGIN_TIMEOUT_IDLE_FACTOR * idle)
    login_timeout = float(sec.get("login_timeout", (int, float), default_login))
    if login_timeout <= 0:
        raise ConfigError("[server] login_timeout must be positive")
    workers_raw = sec.get("workers", (int, str), "auto")
    if workers_raw == "auto":
        workers = 0
    elif isinstance(workers_raw, int) and workers_raw >= 1:
        workers = workers_raw
    else:
        raise ConfigError('[server] workers must be a positive number or "auto"')
    try:
        proxies = tuple(
            ipaddress.ip_network(n, strict=False)
            for n in sec.get("proxy_protocol_from", list, [])
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"[server] proxy_protocol_from: {exc}") from None
    handshake = float(sec.get("handshake_timeout", (int, float), d.handshake_timeout))
    if handshake <= 0:
        raise ConfigError("[server] handshake_timeout must be positive")
    handshakes = sec.get("max_tls_handshakes", int, d.max_tls_handshakes)
    if handshakes < 1:
        raise ConfigError("[server] max_tls_handshakes must be at least 1")
    cfg = ServerConfig(
        listen=listen,
        tls_listen=tls_listen,
        idle_timeout=idle,
        login_timeout=login_timeout,
        workers=workers,
        max_connections=sec.get("max_connections", int, d.max_connections),
        max_connections_per_ip=sec.get("max_connections_per_ip", int, d.max_connections_per_ip),
        greeting=sec.get("greeting", str, d.greeting),
        hostname=sec.get("hostname", str, d.hostname),
        proxy_protocol_from=proxies,
        handshake_timeout=handshake,
        max_tls_handshakes=handshakes,
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
        key_file=_path(base, kf) if (kf := sec.get("key_file", str, None)) else None,
        ipv6_penalty_prefix=sec.get("ipv6_penalty_prefix", int, d.ipv6_penalty_prefix),
        backend=sec.get("backend", str, d.backend),
        password_query=sec.get("password_query", str, None),
        user_query=sec.get("user_query", str, None),
    )
    sec.done()
    if not 0 <= cfg.ipv6_penalty_prefix <= 128:
        raise ConfigError("[auth] ipv6_penalty_prefix: must be 0-128")
    if cfg.failure_delay < 0 or cfg.max_failure_delay < 0:
        raise ConfigError("[auth] failure_delay and max_failure_delay must not be negative")
    if cfg.backend not in ("passwd-file", "postgresql"):
        raise ConfigError('[auth] backend must be "passwd-file" or "postgresql"')
    if cfg.login_delay < 0:
        raise ConfigError("[auth] login_delay: must be 0 (none) or a number of seconds")
    return cfg


def _storage(data: Mapping[str, Any], base: Path, path: Path | None = None) -> StorageConfig:
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
    # A template that could share or leak mail is refused here, naming file and key.
    for key, template in (("maildir", maildir), ("mbox", mbox)):
        if template is not None:
            check_template(template, f"{path or 'config'}: [storage] {key}")
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
        deliver_timeout=float(sec.get("deliver_timeout", (int, float), d.deliver_timeout)),
    )
    sec.done()
    if not cfg.url:
        raise ConfigError("[database] url is required")
    if not 0 <= cfg.pool_min <= cfg.pool_max or cfg.pool_max < 1:
        raise ConfigError("[database] needs 0 <= pool_min <= pool_max and pool_max >= 1")
    if cfg.timeout <= 0 or cfg.lock_ttl < 3 * cfg.timeout:
        raise ConfigError("[database] timeout must be positive and lock_ttl at least 3 x timeout")
    if cfg.deliver_timeout < cfg.timeout:
        raise ConfigError("[database] deliver_timeout must be at least timeout")
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
        max_connections=sec.get("max_connections", int, d.max_connections),
        max_connections_per_ip=sec.get("max_connections_per_ip", int, d.max_connections_per_ip),
    )
    sec.done()
    if cfg.max_connections < 1 or cfg.max_connections_per_ip < 1:
        raise ConfigError("[lmtp] max_connections and max_connections_per_ip must be >= 1")
    return cfg


#: The keys of ``[server]`` that :func:`_service` reads (the rest are :func:`_server`'s).
_SERVICE_KEYS = frozenset({"user", "group", "allow_root", "shutdown_grace", "run_dir"})

#: syslog facilities by name (``[log] facility``).
_FACILITIES = frozenset(
    {"mail", "daemon", "user", "auth", "authpriv"} | {f"local{i}" for i in range(8)}
)


def _service(data: Mapping[str, Any], base: Path) -> ServiceConfig:
    sec = _Section(data, "server")
    d = ServiceConfig()
    user = sec.get("user", str, None)
    group = sec.get("group", str, None)
    grace = float(sec.get("shutdown_grace", (int, float), d.shutdown_grace))
    run_dir = sec.get("run_dir", str, None)
    allow_root = sec.get("allow_root", bool, d.allow_root)
    sec.done()
    cfg = ServiceConfig(
        user=user or None,
        group=group or None,
        allow_root=allow_root,
        shutdown_grace=grace,
        run_dir=_path(base, run_dir or "run"),
    )
    if user is not None and not user.strip():
        raise ConfigError('[server] user: expected a user name, got ""')
    if group is not None and user is None:
        raise ConfigError("[server] group: set only with [server] user")
    if grace < 0:
        raise ConfigError(f"[server] shutdown_grace: expected seconds >= 0, got {grace}")
    return cfg


def _metrics(data: Mapping[str, Any]) -> MetricsConfig:
    sec = _Section(data, "metrics")
    listen = sec.get("listen", str, None)
    sec.done()
    return MetricsConfig(
        listen=None if not listen else parse_address(listen, "[metrics] listen"),
    )


def _log(data: Mapping[str, Any], base: Path) -> LogConfig:
    sec = _Section(data, "log")
    d = LogConfig()
    target = sec.get("target", str, d.target)
    fmt = sec.get("format", str, d.format)
    level = sec.get("level", str, d.level).upper()
    file = sec.get("file", str, None)
    syslog_socket = sec.get("syslog_socket", str, str(d.syslog_socket))
    facility = sec.get("facility", str, d.facility).lower()
    sec.done()
    if target not in ("stderr", "syslog", "file"):
        raise ConfigError(f'[log] target: expected "stderr", "syslog" or "file", got {target!r}')
    if fmt not in ("text", "json"):
        raise ConfigError(f'[log] format: expected "text" or "json", got {fmt!r}')
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            f'[log] level: expected "debug", "info", "warning" or "error", got {level.lower()!r}'
        )
    if target == "file" and not file:
        raise ConfigError('[log] file: expected a file path with target = "file", got none')
    if facility not in _FACILITIES:
        raise ConfigError(
            f"[log] facility: expected one of {', '.join(sorted(_FACILITIES))}, got {facility!r}"
        )
    return LogConfig(
        target=target,
        format=fmt,
        level=level,
        file=_path(base, file) if file else None,
        syslog_socket=_path(base, syslog_socket),
        facility=facility,
    )


def from_mapping(data: Mapping[str, Any], base: Path, path: Path | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML, resolving paths against ``base``."""
    unknown = set(data) - {"server", "tls", "auth", "storage", "lmtp", "metrics", "log",
                           "database"}
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))}")
    server = data.get("server", {})
    if not isinstance(server, Mapping):
        raise ConfigError("[server] must be a table")
    service = {k: v for k, v in server.items() if k in _SERVICE_KEYS}
    server = {k: v for k, v in server.items() if k not in _SERVICE_KEYS}
    cfg = Config(
        service=_service(service, base),
        metrics=_metrics(data.get("metrics", {})),
        log=_log(data.get("log", {}), base),
        server=_server(server),
        tls=_tls(data["tls"], base) if "tls" in data else None,
        auth=_auth(data.get("auth", {}), base),
        storage=_storage(data.get("storage", {"maildir": "mail/%u/Maildir"}), base, path),
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
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return from_mapping(data, path.resolve().parent, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
