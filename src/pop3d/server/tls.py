"""Server TLS contexts: TLS 1.2+, the default certificate, SNI, client CA, reload.

Built on the stdlib ``ssl`` module only.  Rules:

* One *front* context object (:attr:`TlsContexts.context`) is handed to every listener
  and to every STLS upgrade, for the life of the process.  Its SNI callback runs on every
  ClientHello (with ``None`` when the client sent no name) and switches the handshake to
  the context of the current certificate for that name.  That is what makes
  :meth:`TlsContexts.reload` (SIGHUP) reach listeners started before it: new handshakes
  get the new certificates, sessions already established keep theirs, and a reload that
  fails keeps the old contexts and logs why.
* Contexts are built from ``PROTOCOL_TLS_SERVER``, not ``create_default_context``: the
  latter trusts the system CA store for client certificates, and a client certificate
  from *any* public CA would then pass for SASL EXTERNAL.  Only ``client_ca`` is trusted.
* With a client CA, a certificate is requested but optional (``CERT_OPTIONAL``): clients
  without one still log in with passwords; one that is presented must verify, or the
  handshake fails.
* The TLS layer of a connection is the event loop's own ``SSLProtocol`` (asyncio's or
  uvloop's), built here (:func:`ssl_protocol_class`, :func:`start_tls`) rather than by
  ``loop.start_tls`` or ``create_server(ssl=...)``: asyncio's allocates and zeroes a
  256 KiB read buffer per connection, which made an idle TLS session cost 280 KiB;
  ours reads into :data:`~pop3d.protocol.limits.TLS_READ_BUFFER`.  Only the documented
  ``Protocol`` interface of that class is used (``connection_made``, ``get_buffer``,
  ``buffer_updated``, the application side's ``connection_made``), and its constructor,
  which asyncio and uvloop share.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pop3d import metrics
from pop3d.config import CertPair, TlsConfig
from pop3d.protocol import limits

log = logging.getLogger("pop3d.tls")


def _context(pair: CertPair, client_ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= (
        ssl.OP_NO_COMPRESSION  # CRIME
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a cheap DoS
    )
    ctx.load_cert_chain(pair.cert, pair.key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def certificate_identity(peercert: Mapping[str, Any] | None) -> str | None:
    """Return the user name of a verified client certificate, or ``None``.

    The subject's commonName, as Dovecot's default ``ssl_cert_username_field``; failing
    that, the first e-mail subjectAltName.  ``peercert`` is ``getpeercert()``'s dict,
    which the ``ssl`` module only fills for a certificate that verified against the
    client CA (it is empty when no CA is configured).
    """
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "email" and value:
            return str(value)
    return None


class TlsContexts:
    """The front SSLContext for new handshakes, switching to per-name contexts (SNI)."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self._default, self._by_name = self._build()
        #: The context listeners and STLS use; never replaced (see the module rules).
        self.context = self._default
        self.context.sni_callback = self._select

    def _build(self) -> tuple[ssl.SSLContext, dict[str, ssl.SSLContext]]:
        cfg = self.config
        default = _context(cfg.default, cfg.client_ca)
        by_name = {name: _context(pair, cfg.client_ca) for name, pair in cfg.sni.items()}
        return default, by_name

    def context_for(self, name: str | None) -> ssl.SSLContext:
        """Return the context whose certificate serves ``name`` (the default without one)."""
        if name:
            name = name.lower().rstrip(".")
            chosen = self._by_name.get(name)
            if chosen is None and "." in name:  # a wildcard entry "*.example.org"
                chosen = self._by_name.get("*." + name.split(".", 1)[1])
            if chosen is not None:
                return chosen
        return self._default

    def _select(
        self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        chosen = self.context_for(name)
        if sock.context is not chosen:
            sock.context = chosen
        return None

    def reload(self) -> bool:
        """Re-read every certificate; keep the old ones if any fails.  True on success."""
        try:
            default, by_name = self._build()
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS reload failed, keeping the old certificates: %s", exc)  # noqa: TRY400
            return False
        self._default, self._by_name = default, by_name
        log.info("TLS certificates reloaded")
        return True


# ---------------------------------------------------------------------- the TLS layer


class _LeanSSLProtocol(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS protocol with a read buffer sized for POP3, not 256 KiB."""

    max_size = limits.TLS_READ_BUFFER


def ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any | None:
    """The server-side TLS protocol class of ``loop``'s implementation, if it is known."""
    if isinstance(loop, asyncio.BaseEventLoop):
        return _LeanSSLProtocol
    if type(loop).__module__.startswith("uvloop"):
        import uvloop.loop  # noqa: PLC0415 (only where uvloop runs)

        # uvloop's SSLProtocol allocates its 256 KiB read buffer with malloc: the pages a
        # short read never touches are never resident (an idle session costs ~30 KiB).
        return getattr(uvloop.loop, "SSLProtocol", None)
    return None


def check_tls_support(loop: asyncio.AbstractEventLoop) -> None:
    """Raise RuntimeError when implicit TLS cannot be served on ``loop``."""
    if ssl_protocol_class(loop) is None:
        raise RuntimeError(f"implicit TLS needs asyncio's or uvloop's event loop, not {loop!r}")


class HandshakeEnd(asyncio.Protocol):
    """A TLS protocol's application side until its handshake completes.

    Its ``connection_made`` (the handshake's success) calls ``on_made`` with the TLS
    transport, which sets the real protocol on it at once; nothing else reaches this.
    """

    __slots__ = ("_on_made",)

    def __init__(self, on_made: Callable[[asyncio.BaseTransport], None]) -> None:
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The handshake completed."""
        self._on_made(transport)


async def start_tls(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    *,
    handshake_timeout: float,
) -> asyncio.Transport:
    """``loop.start_tls(..., server_side=True)`` with the TLS layer of :func:`ssl_protocol_class`.

    For STLS.  Application data that arrives with the client's last handshake message is
    delivered to ``protocol`` before this returns, as with ``loop.start_tls``.  The
    outcome is counted with :func:`pop3d.metrics.tls_handshake`.

    Raises:
        ConnectionError, OSError, ssl.SSLError, TimeoutError: the handshake failed.

    """
    factory = ssl_protocol_class(loop)
    if factory is None:  # another event loop: its own start_tls
        new = await loop.start_tls(
            transport,
            protocol,
            context,
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,
        )
        if new is None:
            metrics.tls_handshake(False)  # noqa: FBT003
            raise ConnectionResetError("closed during the TLS handshake")
        metrics.tls_handshake(True)  # noqa: FBT003
        return new
    made: list[asyncio.Transport] = []

    def on_made(app_transport: asyncio.BaseTransport) -> None:
        app_transport.set_protocol(protocol)
        made.append(app_transport)  # type: ignore[arg-type]

    waiter: asyncio.Future[None] = loop.create_future()
    tls = factory(
        loop,
        HandshakeEnd(on_made),
        context,
        waiter,
        server_side=True,
        call_connection_made=True,
        ssl_handshake_timeout=handshake_timeout,
    )
    # As loop.start_tls: nothing may be read before the TLS layer's connection_made.
    transport.pause_reading()
    transport.set_protocol(tls)
    conmade = loop.call_soon(tls.connection_made, transport)
    resume = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        metrics.tls_handshake(False)  # noqa: FBT003
        transport.close()
        conmade.cancel()
        resume.cancel()
        raise
    if not made:  # the peer went away during the handshake
        metrics.tls_handshake(False)  # noqa: FBT003
        raise ConnectionResetError("closed during the TLS handshake")
    metrics.tls_handshake(True)  # noqa: FBT003
    return made[0]
