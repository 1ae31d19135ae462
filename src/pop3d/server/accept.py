"""The accept path: admission, the PROXY header, the implicit-TLS handshake, then POP3.

Every listener accepts plain TCP.  Where a connection needs nothing before its session
(a cleartext listener, no ``proxy_protocol_from``), the listener's protocol is
:class:`~pop3d.server.connection.Pop3Protocol` itself and this module is not involved:
that path costs nothing more than it did.  Otherwise the listener's protocol is
:class:`AcceptProtocol`, which owns the connection until its session starts:

1. **Admission at accept**, in ``connection_made``, before any TLS or header work: the
   total and per-address caps (``max_connections``, ``max_connections_per_ip``) count
   connections still in their handshake as well as sessions.  A refused connection is
   closed at once (on a cleartext listener after ``-ERR [SYS/TEMP]``), counted with
   :func:`pop3d.metrics.connection_refused`.  A connection from a balancer in
   ``proxy_protocol_from`` counts against the total only: the per-address cap applies to
   the client its header names, once the header is read.
2. **The PROXY header** (:mod:`pop3d.server.proxy_protocol`), required from
   ``proxy_protocol_from`` and refused from everyone else: a balancer's connection
   without a valid header is closed, and so is a connection from elsewhere whose first
   octets are a header (on a cleartext listener such a client has been greeted already;
   its first octets are looked at before the session sees them).  The header comes
   before the TLS ClientHello on implicit-TLS listeners, as HAProxy sends it.
3. **The implicit-TLS handshake**, once the client's first octets (its ClientHello) are
   here: a connection that sends nothing holds no TLS state at all.  At most
   ``max_tls_handshakes`` run at once per worker; the others wait, reading paused, for a
   slot.  The loop's own ``SSLProtocol`` is built here rather than by ``loop.start_tls``
   so that octets already read (the ClientHello after a PROXY header) can be handed to
   it, and so that, on asyncio, its read buffer is :data:`~pop3d.protocol.limits.TLS_READ_BUFFER`
   instead of 256 KiB per connection (:func:`pop3d.server.tls.ssl_protocol_class`).  Outcomes go to
   :func:`pop3d.metrics.tls_handshake`.
4. One deadline, ``handshake_timeout`` from accept, covers the header and the handshake
   (waiting for a slot included): past it the connection is closed.
5. **The session**: ``transport.set_protocol(Pop3Protocol(..., client=Client(...)))`` and
   its ``connection_made``.  The session gets the client's address (from the header or
   the socket) rather than reading the peer address, so logs, per-address limits,
   penalties and ``secure_networks`` see the client, not the balancer; a client that
   reached the balancer over TLS (the v2 SSL TLV) gets a session that counts as secure.

No task is created on any of these paths; the only timer is the deadline.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, cast

from pop3d import logsetup, metrics
from pop3d.protocol import Cap, limits, refusal
from pop3d.server.connection import Pop3Protocol
from pop3d.server.context import Client
from pop3d.server.proxy_protocol import (
    MAX_HEADER,
    ProxyHeaderError,
    parse,
    starts_like_header,
)
from pop3d.server.tls import HandshakeEnd, ssl_protocol_class

if TYPE_CHECKING:
    from pop3d.server.context import ServerContext

log = logsetup.get_logger("pop3d.session")

__all__ = ["AcceptProtocol"]

#: The first octet of a TLS record carrying a handshake message (RFC 8446 §5.1).
_TLS_HANDSHAKE_RECORD = 0x16


# States of an AcceptProtocol.
_SNIFF = "sniff"  # a session runs already; its first octets are looked at first
_HEADER = "header"  # waiting for the PROXY header
_HELLO = "hello"  # waiting for the client's first TLS octets
_QUEUED = "queued"  # waiting for a handshake slot
_HANDSHAKE = "handshake"  # TLS handshake in progress
_DONE = "done"  # the session has the connection
_CLOSED = "closed"  # refused, failed or timed out


class AcceptProtocol(asyncio.Protocol):
    """A connection from accept until its POP3 session starts (see the module rules)."""

    __slots__ = (
        "_buffer",
        "_counted",
        "_deadline",
        "_secure",
        "_session",
        "_state",
        "address",
        "ctx",
        "implicit_tls",
        "loop",
        "peer",
        "transport",
    )

    def __init__(
        self,
        ctx: ServerContext,
        *,
        implicit_tls: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.ctx = ctx
        self.implicit_tls = implicit_tls
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        self.peer = "?"
        self._state = _HEADER
        self._buffer = b""
        #: The address whose per-address count this connection holds ("" for none);
        #: None until the total count holds it.
        self._counted: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        #: The balancer ended the client's TLS (PROXY v2 SSL TLV).
        self._secure = False
        #: In the sniff state, the session already started.
        self._session: Pop3Protocol | None = None

    # ------------------------------------------------------------------ accept

    def connection_made(self, base_transport: asyncio.BaseTransport) -> None:
        """Admit by the caps, then wait for the header or the ClientHello."""
        self.transport = transport = cast("asyncio.Transport", base_transport)
        peername = transport.get_extra_info("peername")
        self.address = str(peername[0]) if peername else "local"
        self.peer = f"{self.address}:{peername[1]}" if peername else "local"
        ctx = self.ctx
        from_proxy = ctx.is_proxy(self.address)
        if not from_proxy and not self.implicit_tls:
            # A cleartext client not behind a balancer: greeted at once, as without
            # proxy_protocol_from; only its first octets pass through here.
            self._state = _SNIFF
            self._session = session = Pop3Protocol(ctx, implicit_tls=False, loop=self.loop)
            session.connection_made(transport)
            return
        cap = ctx.reserve(None if from_proxy else self.address)
        if cap is not None:
            self._refuse(cap)
            return
        self._counted = "" if from_proxy else self.address
        ctx.pre_sessions.add(self)
        self._state = _HEADER if from_proxy else _HELLO
        self._deadline = self.loop.call_later(ctx.handshake_timeout, self._expired)

    def data_received(self, data: bytes) -> None:
        """Octets before the session: the header, the first TLS octets, or a first line."""
        state = self._state
        if state == _HELLO:
            self._hello(data)
        elif state == _HEADER:
            self._header(self._buffer + data)
        elif state == _SNIFF:
            self._sniff(self._buffer + data)
        elif state == _QUEUED:
            # Reading is paused while queued; what arrived in the same read is kept.
            self._buffer += data
            if len(self._buffer) > limits.MAX_PENDING_INPUT:
                self._close("tls failed")

    def eof_received(self) -> bool | None:
        """The peer half-closed before its session began: close (or tell the session)."""
        if self._state == _SNIFF and self._session is not None:
            return self._session.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Gone before its session began: count it out."""
        if self._state == _SNIFF and self._session is not None:
            self._session.connection_lost(exc)
            return
        self._drop()

    def pause_writing(self) -> None:
        """Flow control belongs to the session, if there is one yet."""
        if self._session is not None:
            self._session.pause_writing()

    def resume_writing(self) -> None:
        """Flow control belongs to the session, if there is one yet."""
        if self._session is not None:
            self._session.resume_writing()

    # ------------------------------------------------------------------ steps

    def _sniff(self, data: bytes) -> None:
        """A non-balancer's first octets: a PROXY header is refused, anything else passed on."""
        session, transport = self._session, self.transport
        assert session is not None
        assert transport is not None
        verdict = starts_like_header(data)
        if verdict is None:  # "PRO", say: wait for the next octets (at most 11 held)
            self._buffer = data
            return
        self._buffer = b""
        if verdict:
            metrics.connection_refused("proxy")
            log.warning("refused %s: PROXY header from an address not in proxy_protocol_from",
                        self.peer)
            transport.abort()  # the session hears of it through connection_lost
            return
        self._state = _DONE
        self._session = None
        transport.set_protocol(session)
        session.data_received(data)

    def _header(self, data: bytes) -> None:
        try:
            header = parse(data)
        except ProxyHeaderError as exc:
            metrics.connection_refused("proxy")
            log.warning("refused %s: %s", self.peer, exc)
            self._close("proxy")
            return
        if header is None:
            assert len(data) <= MAX_HEADER  # parse() refuses longer ones
            self._buffer = data
            return
        self._buffer = b""
        rest = data[header.length :]
        if header.source is not None:
            self.address = header.source[0]
            self.peer = f"{header.source[0]}:{header.source[1]}"
        cap = self.ctx.reserve_address(self.address)
        if cap is not None:
            self._refuse(cap)
            return
        self._counted = self.address
        self._secure = header.tls
        if self.implicit_tls:
            self._state = _HELLO
            if rest:
                self._hello(rest)
        else:
            self._start_session(self._transport(), rest, implicit_tls=header.tls)

    def _hello(self, data: bytes) -> None:
        """The client's first octets on an implicit-TLS listener: start the handshake."""
        if data[0] != _TLS_HANDSHAKE_RECORD:
            if starts_like_header(data) is not False:
                metrics.connection_refused("proxy")
                log.warning("refused %s: PROXY header from an address not in "
                            "proxy_protocol_from", self.peer)
            else:
                metrics.tls_handshake(False)  # noqa: FBT003
                log.info("TLS handshake failed with %s: not a TLS client", self.peer)
            self._close("tls failed")
            return
        self._buffer = data
        if self.ctx.handshakes.acquire():
            self.start_tls()
        else:
            self._state = _QUEUED
            self._transport().pause_reading()
            self.ctx.handshakes.waiting.append(self)

    def waiting_for_slot(self) -> bool:
        """Whether this connection still waits for a handshake slot."""
        return self._state == _QUEUED

    def start_tls(self) -> None:
        """Start the handshake (a slot is held) on the octets received so far."""
        transport = self._transport()
        if self._state == _QUEUED:
            transport.resume_reading()
        self._state = _HANDSHAKE
        loop = self.loop
        factory = ssl_protocol_class(loop)
        assert factory is not None  # tls.check_tls_support() ran at listener start
        waiter: asyncio.Future[None] = loop.create_future()
        waiter.add_done_callback(self._handshake_over)
        remaining = max(0.1, self._deadline.when() - loop.time()) if self._deadline else None
        tls = factory(
            loop,
            HandshakeEnd(self._tls_established),
            self.ctx.tls_context(),
            waiter,
            server_side=True,
            call_connection_made=True,
            ssl_handshake_timeout=remaining,
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        data, self._buffer = self._buffer, b""
        while data and self._state == _HANDSHAKE:
            buf = tls.get_buffer(len(data))
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            tls.buffer_updated(n)
            data = data[n:]

    def _tls_established(self, app_transport: asyncio.BaseTransport) -> None:
        """The handshake completed (called by the TLS protocol): start the session."""
        if self._state != _HANDSHAKE:  # timed out meanwhile: the transport is closing
            return
        self._state = _DONE
        self.ctx.handshakes.release()
        metrics.tls_handshake(True)  # noqa: FBT003
        self._start_session(cast("asyncio.Transport", app_transport), b"", implicit_tls=True)

    def _handshake_over(self, waiter: asyncio.Future[None]) -> None:
        """The TLS protocol's waiter is done: after success, or after a failure."""
        exc = None if waiter.cancelled() else waiter.exception()
        if self._state != _HANDSHAKE:
            return
        self._state = _CLOSED
        self.ctx.handshakes.release()
        metrics.tls_handshake(False)  # noqa: FBT003
        if isinstance(exc, ssl.SSLError):
            log.info("TLS handshake failed with %s: %s", self.peer, exc.reason or exc)
        else:
            log.info("TLS handshake failed with %s", self.peer)
        self._drop()
        if self.transport is not None:
            self.transport.abort()

    def _start_session(self, transport: asyncio.Transport, data: bytes, *,
                       implicit_tls: bool) -> None:
        """Hand the connection to its POP3 session (admitted already)."""
        self._state = _DONE
        self._cancel_deadline()
        self.ctx.pre_sessions.discard(self)
        self._counted = None  # the session holds the counts now, and releases them
        session = Pop3Protocol(
            self.ctx,
            implicit_tls=implicit_tls or self._secure,
            loop=self.loop,
            client=Client(self.address, self.peer),
        )
        transport.set_protocol(session)
        session.connection_made(transport)
        if data:
            session.data_received(data)

    # ------------------------------------------------------------------ endings

    def _expired(self) -> None:
        """``handshake_timeout`` passed before the session could start."""
        self._deadline = None
        state = self._state
        if state in (_DONE, _CLOSED, _SNIFF):
            return
        log.info("handshake timeout for %s", self.peer)
        if state == _HANDSHAKE:
            self._state = _CLOSED
            self.ctx.handshakes.release()
            metrics.tls_handshake(False)  # noqa: FBT003
        self._close("timeout")

    def _refuse(self, cap: Cap) -> None:
        """Refused by a connection cap: the core's refusal on a cleartext listener; close."""
        metrics.connection_refused(cap)
        log.warning("refused %s: over the %s connection cap", self.peer, cap)
        transport = self._transport()
        if not self.implicit_tls:
            transport.write(refusal(cap))
        self._drop()
        self._state = _CLOSED
        transport.close()

    def _close(self, _why: str) -> None:
        self._drop()
        self._state = _CLOSED
        if self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        """The server stops: close now."""
        self._close("shutdown")

    def _drop(self) -> None:
        """Count the connection out (once) and forget its timer."""
        if self._state == _QUEUED:
            self._state = _CLOSED  # HandshakeSlots.release skips it
        self._cancel_deadline()
        self.ctx.pre_sessions.discard(self)
        counted, self._counted = self._counted, None
        if counted is not None:
            self.ctx.unreserve(counted or None)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _transport(self) -> asyncio.Transport:
        assert self.transport is not None
        return self.transport
