"""What every connection of one server process shares: the :class:`ServerContext`.

Backends, TLS contexts, the per-connection settings, the counts behind the connection
limits (:meth:`ServerContext.reserve`, :meth:`ServerContext.admit`), the idle sweep, the
end-of-turn flush and the graceful stop (:meth:`ServerContext.shutdown`).  Connections
are counted from accept: sessions (:mod:`pop3d.server.connection`) and connections still
in their PROXY header or implicit-TLS handshake (:mod:`pop3d.server.accept`).  This module
knows them only by the little it calls (:class:`Session`, :class:`PreSession`), so the
imports run one way: listener -> accept -> connection -> context.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from pop3d import __version__, metrics, process, simdtext
from pop3d.config import Config
from pop3d.protocol import Cap, Pop3Settings, limits, sasl
from pop3d.server.tls import TlsContexts
from pop3d.session import Backends

log = logging.getLogger("pop3d.server")


class Session(Protocol):
    """What the context calls of a POP3 session (:class:`~.connection.Pop3Protocol`)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...  # noqa: D102
    @property
    def deadline(self) -> float: ...  # noqa: D102
    @property
    def peer(self) -> str: ...  # noqa: D102
    @property
    def address(self) -> str: ...  # noqa: D102
    @property
    def client(self) -> Client | None: ...  # noqa: D102
    @property
    def transport(self) -> asyncio.Transport | None: ...  # noqa: D102
    def flush(self) -> None: ...  # noqa: D102
    def check_deadlines(self, now: float) -> None: ...  # noqa: D102
    def shutdown(self) -> None: ...  # noqa: D102


class PreSession(Protocol):
    """What the context calls of a connection before its session (:mod:`.accept`)."""

    def abort(self) -> None: ...  # noqa: D102
    def waiting_for_slot(self) -> bool: ...  # noqa: D102
    def start_tls(self) -> None: ...  # noqa: D102


@dataclass(frozen=True, slots=True)
class Client:
    """Who a session is with, as the accept path established it."""

    #: The client's IP address as text: the PROXY header's source, else the peer's.
    address: str
    #: ``address:port`` for log lines.
    peer: str


class HandshakeSlots:
    """The bound on implicit-TLS handshakes in progress in this worker, and its queue."""

    __slots__ = ("in_use", "limit", "waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.waiting: deque[PreSession] = deque()

    def acquire(self) -> bool:
        """Take a slot if one is free."""
        if self.in_use < self.limit:
            self.in_use += 1
            return True
        return False

    def release(self) -> None:
        """Give a slot back; the longest-waiting live connection takes it."""
        self.in_use -= 1
        while self.waiting and self.in_use < self.limit:
            nxt = self.waiting.popleft()
            if nxt.waiting_for_slot():
                self.in_use += 1
                nxt.start_tls()


#: The IMPLEMENTATION capability (RFC 2449 §6.9).
_IMPLEMENTATION = f"pop3d {__version__}"


class _RandomTokens:
    """Unpredictable tokens (APOP timestamps, SASL nonces), from the OS's CSPRNG.

    One ``getrandom`` call serves hundreds of connections instead of one each; the
    tokens are as unpredictable as ``secrets``' (they are slices of its output).
    """

    _REFILL = 4096

    def __init__(self) -> None:
        self._pool = b""

    def token(self, nbytes: int) -> str:
        """Return ``nbytes`` random octets as URL-safe text (no comma, no space)."""
        if len(self._pool) < nbytes:
            self._pool = secrets.token_bytes(self._REFILL)
        chunk, self._pool = self._pool[:nbytes], self._pool[nbytes:]
        return base64.urlsafe_b64encode(chunk).rstrip(b"=").decode("ascii")


class ServerContext:
    """State shared by all connections of one server process."""

    #: Installed only by :mod:`pop3d.testing`'s test server (None in production): called
    #: with each session and its transport (at connection, and again after STLS), it
    #: returns the transport the session writes to, one that records a transcript and
    #: applies wire faults.  Production pays one attribute test per connection.  (The
    #: session is a ``connection.Pop3Protocol``: typed Any, as this module may not import it.)
    wire: Callable[[Any, asyncio.Transport], asyncio.Transport] | None = None

    def __init__(self, config: Config, backends: Backends, tls: TlsContexts | None) -> None:
        self.config = config
        self.backends = backends
        # An instance attribute: read once a connection, faster than the class's.
        self.wire = None
        self.tls = tls
        self.idle_timeout = config.server.idle_timeout
        #: Deadlines of the connections (see ``Pop3Protocol.check_deadlines``).
        self.login_timeout = config.server.login_timeout
        self.line_timeout = min(limits.COMMAND_LINE_TIMEOUT, self.idle_timeout)
        #: A new connection's first deadline, from accept (idle or not logged in).
        self.first_wait = min(self.idle_timeout, self.login_timeout)
        self.connections: set[Session] = set()
        #: Connections accepted and not yet closed: sessions and pre-sessions.
        self.open = 0
        #: Connections between accept and their session (header, TLS handshake).
        self.pre_sessions: set[PreSession] = set()
        #: Open connections per client address (a balancer's own address not counted).
        self.per_address: dict[str, int] = {}
        self.handshake_timeout = config.server.handshake_timeout
        self.handshakes = HandshakeSlots(config.server.max_tls_handshakes)
        self._proxies = config.server.proxy_protocol_from
        self._tasks: set[asyncio.Task[None]] = set()
        self._secure = config.auth.secure_networks
        #: Made after the fork: each worker has its own pid and its own randomness.
        self._pid = process.pid()
        self._random = _RandomTokens()
        self._secure_cache: dict[str, bool] = {}
        #: CRAM-MD5 and SCRAM need a nonce unique to each connection.
        self._nonce_needed = any(
            (m := sasl.REGISTRY.get(name)) is not None and m.needs_nonce
            for name in config.auth.mechanisms
        )
        self._shared_settings: dict[tuple[bool, bool], Pop3Settings] = {}
        #: Whether every connection's settings hold something of its own (see settings_for).
        self._unique_settings = config.auth.apop or self._nonce_needed
        #: Connections with replies to write at the end of this turn of the loop.
        self._to_flush: list[Session] = []
        #: The idle sweep's next run (started with the first connection).
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_every = min(
            limits.IDLE_SWEEP_INTERVAL, self.idle_timeout / 4, self.login_timeout / 4
        )

    def flush_soon(self, conn: Session) -> None:
        """Have ``conn`` write its replies once the loop has handled this turn's events.

        Replies of every session served in one turn then leave back to back, so a client
        process is woken once for all of them rather than once a reply (Redis writes its
        replies the same way, before it waits for events again).
        """
        to_flush = self._to_flush
        if not to_flush:
            conn.loop.call_soon(self._flush_all)
        to_flush.append(conn)

    def _flush_all(self) -> None:
        conns, self._to_flush = self._to_flush, []
        for conn in conns:
            try:
                conn.flush()
            except Exception:
                # One connection's failure must not leave the others' replies unwritten.
                log.exception("internal error writing to %s", conn.peer)
                if conn.transport is not None:
                    conn.transport.abort()

    def _sweep_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the connections idle for ``idle_timeout``; come back in a moment.

        One timer for all connections instead of one each: an idle connection holds no
        timer (about 600 octets with uvloop), and a login neither arms nor cancels one.
        Looking at 10,000 connections takes about a millisecond, once a second.
        """
        now = loop.time()
        # Only the attribute is read for each connection; a hang-up leaves the set.
        for conn in [c for c in self.connections if c.deadline <= now]:
            conn.check_deadlines(now)
        self._sweep = loop.call_later(self._sweep_every, self._sweep_idle, loop)

    def reserve(self, address: str | None) -> Cap | None:
        """Count a connection in at accept; return the cap that refuses it, or None.

        ``address`` None counts against the total only (a balancer's connection, whose
        client is known once its PROXY header is read: :meth:`reserve_address`).
        """
        cfg = self.config.server
        if self.open >= cfg.max_connections:
            return "total"
        if address is not None:
            held = self.per_address.get(address, 0)
            if held >= cfg.max_connections_per_ip:
                return "per_ip"
            self.per_address[address] = held + 1
        self.open += 1
        return None

    def reserve_address(self, address: str) -> Cap | None:
        """Count a connection already in the total against ``address``; or refuse it."""
        held = self.per_address.get(address, 0)
        if held >= self.config.server.max_connections_per_ip:
            return "per_ip"
        self.per_address[address] = held + 1
        return None

    def unreserve(self, address: str | None) -> None:
        """Count a connection out (``address`` as it was counted in)."""
        self.open -= 1
        if address is not None:
            left = self.per_address.get(address, 1) - 1
            if left:
                self.per_address[address] = left
            else:
                self.per_address.pop(address, None)

    def admit(self, conn: Session) -> Cap | None:
        """Count a new session in; return the cap it is over (and do not count it).

        A session started by the accept path (``conn.client`` set) was counted there.
        """
        if self._sweep is None:
            self._sweep = conn.loop.call_later(self._sweep_every, self._sweep_idle, conn.loop)
        if conn.client is None:
            cap = self.reserve(conn.address)
            if cap is not None:
                metrics.connection_refused(cap)
                return cap
        self.connections.add(conn)
        return None

    def release(self, conn: Session) -> None:
        """Count a session out once its socket is gone (not when its session ended)."""
        if conn in self.connections:
            self.connections.discard(conn)
            self.unreserve(conn.address)

    def is_proxy(self, address: str) -> bool:
        """Whether ``address`` is a balancer of ``proxy_protocol_from``."""
        if not self._proxies:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._proxies)

    def is_secure(self, address: str) -> bool:
        """Whether ``address`` is in ``secure_networks`` (cached per address)."""
        known = self._secure_cache.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                known = any(ip in net for net in self._secure)
            if len(self._secure_cache) > 10_000:
                self._secure_cache.clear()
            self._secure_cache[address] = known
        return known

    def settings_for(
        self, address: str, implicit_tls: bool, client_identity: str | None = None
    ) -> Pop3Settings:
        """Return the core's settings for a new connection from ``address``.

        ``client_identity`` is the user of a verified client certificate (implicit TLS).
        Settings with nothing unique in them (no APOP timestamp, no SASL nonce, no client
        certificate: the default configuration) are made once and shared.
        """
        auth = self.config.auth
        plaintext = auth.plaintext_without_tls or self.is_secure(address)
        if client_identity is None and not self._unique_settings:
            key = (plaintext, implicit_tls)
            shared = self._shared_settings.get(key)
            if shared is None:
                shared = self._shared_settings[key] = self._settings(plaintext, implicit_tls)
            return shared
        timestamp = None
        if auth.apop:
            # RFC 1939 §7: unique per greeting: pid, clock and randomness.
            timestamp = (
                f"<{self._pid}.{time.time_ns()}.{self._random.token(4)}"
                f"@{self.config.server.hostname}>"
            ).encode()
        return self._settings(
            plaintext,
            implicit_tls,
            apop_timestamp=timestamp,
            # CRAM-MD5 challenges and SCRAM nonces: unique per connection and unguessable.
            sasl_nonce=f"{self._pid}.{time.time_ns()}.{self._random.token(12)}",
            client_identity=client_identity,
        )

    def _settings(
        self,
        plaintext: bool,
        implicit_tls: bool,
        *,
        apop_timestamp: bytes | None = None,
        sasl_nonce: str = "",
        client_identity: str | None = None,
    ) -> Pop3Settings:
        return Pop3Settings(
            greeting=self.config.server.greeting,
            apop_timestamp=apop_timestamp,
            implementation=_IMPLEMENTATION,
            tls_available=self.tls is not None and not implicit_tls,
            tls_active=implicit_tls,
            plaintext_allowed=plaintext,
            sasl_mechanisms=self.config.auth.mechanisms,
            sasl_nonce=sasl_nonce,
            hostname=self.config.server.hostname,
            client_identity=client_identity,
            login_delay=self.config.auth.login_delay,
            stuff_dense=simdtext.STUFF_DENSE,
        )

    def tls_context(self) -> Any:
        """Return the current server SSLContext (None without [tls])."""
        return None if self.tls is None else self.tls.context

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self, grace: float = limits.SHUTDOWN_GRACE) -> None:
        """Close every open session without UPDATE; wait ``grace`` s for UPDATEs, locks."""
        for pre in list(self.pre_sessions):
            pre.abort()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + grace
        while (self.connections or self._tasks) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # a poll bounded by the grace period
        # Replies queued in this very turn (a QUIT's sign-off) go out before the loop ends.
        self._flush_all()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        # Their connection_lost runs before the loop ends: no transport is left unclosed.
        await asyncio.sleep(0)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
