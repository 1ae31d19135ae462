"""One client connection: read, feed the core, perform its events, write.

Rules:

* Commands the core answers by itself (STAT, LIST, UIDL, DELE, NOOP, CAPA, errors) are
  answered synchronously inside ``data_received``: no task, no await.  A task exists only
  while a request that needs a backend (auth, open, RETR/TOP, STLS, UPDATE) is performed,
  so an idle connection costs a protocol object, a transport and a core, nothing more
  (no timer either: the server's one idle sweep looks at every connection).
* Replies are written at the end of the loop's turn (``ServerContext.flush_soon``), all
  sessions' together, and a sign-off with the close after it; the order of a session's
  octets never changes (they wait in its core until written).  A reply that must be on the
  wire before something else happens (the ``+OK`` of STLS, a farewell) is written at once.
* RETR/TOP stream chunk by chunk and wait for the socket to drain past the high-water
  mark: a slow client holds a bounded amount of memory, whatever the message size.
* The idle timeout closes the connection WITHOUT UPDATE.  So do EOF, errors, shutdown, and
  every other ending except QUIT in TRANSACTION.  The maildrop is always closed (lock
  released) at the end, and ``close()`` never deletes.
* After STLS, plaintext that followed the STLS line is discarded by the core.  Once
  ``start_tls`` owns the socket, later plaintext cannot reach us (it is fed to the TLS
  layer and fails the handshake).  Application data that arrives *with* the client's
  last handshake message (GnuTLS clients such as mpop send CAPA in the same flight) is
  delivered here before ``start_tls`` returns: it is encrypted, so it is kept and
  answered after ``tls_established``.
* Every refusal is logged with the peer address (connection limits, plaintext policy,
  failed logins); no secret is ever logged, only user names and mechanism names.
* A verified client certificate (implicit TLS or after STLS) is reported to the core as
  its user name, which enables SASL EXTERNAL for that connection only.
* No exception text ever reaches the wire; unexpected errors are logged here and the
  connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from pop3d import audit, limits, logsetup
from pop3d.errors import LocalProtocolError, MessageVanished, WouldWait
from pop3d.protocol import (
    ApopAuthenticate,
    AuthRefused,
    Closed,
    NeedData,
    OpenMaildrop,
    PasswordAuthenticate,
    Pop3Connection,
    SaslOutcome,
    SaslSecret,
    SendMessage,
    StartTls,
    Update,
)
from pop3d.protocol.events import Event
from pop3d.protocol.replies import RespCode, err
from pop3d.protocol.states import State
from pop3d.server.tls import certificate_identity

if TYPE_CHECKING:
    from pop3d.auth.base import Principal
    from pop3d.server.listener import ServerContext
    from pop3d.storage.base import Maildrop

log = logging.getLogger("pop3d.session")

#: The audit line's reasons (:mod:`pop3d.audit`); any other text counts as a bad password.
_AUDIT_REASONS = frozenset(
    {"bad-password", "unknown-mech", "cleartext-refused", "too-many-attempts", "malformed",
     "cancelled", "tempfail"}
)


class Pop3Protocol(asyncio.Protocol):
    """asyncio protocol driving one :class:`Pop3Connection`."""

    # Slots: 10,000 idle sessions hold 10,000 of these; no per-instance dict.
    __slots__ = (
        "_closing",
        "_drained",
        "_flush_queued",
        "_last_words",
        "_mechanism",
        "_read_inline",
        "_reading_paused",
        "_result",
        "_started",
        "_task",
        "_write_paused",
        "address",
        "core",
        "implicit_tls",
        "last_active",
        "loop",
        "maildrop",
        "peer",
        "server",
        "transport",
        "username",
    )

    def __init__(
        self,
        server: ServerContext,
        *,
        implicit_tls: bool,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.server = server
        self.implicit_tls = implicit_tls
        # The listener passes its loop: get_running_loop() costs a getpid() system call
        # (CPython's fork check), once per connection on the login path.
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.core: Pop3Connection | None = None
        self.peer = "?"
        self.address = "?"
        self.maildrop: Maildrop | None = None
        #: The maildrop's optional fast path for small messages (see _send_inline).
        self._read_inline: Callable[[str], bytes | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._write_paused = False
        #: Whether the server will call :meth:`flush` at the end of this turn.
        self._flush_queued = False
        #: The sign-off to write before the transport is closed, at that :meth:`flush`.
        self._last_words: bytes | None = None
        self._reading_paused = False
        self._closing = False
        #: ``loop.time()`` of the last command or write progress (the idle sweep reads it).
        self.last_active = 0.0
        self._started = time.monotonic()
        self._result = ""
        self.username = ""
        self._mechanism = "-"

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, base_transport: asyncio.BaseTransport) -> None:
        """Admit the client (its idle time counts from now) and send the greeting."""
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = transport = cast("asyncio.Transport", base_transport)
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "local"
        self.peer = f"{self.address}:{peer[1]}" if peer else "local"
        refusal = self.server.admit(self)
        if refusal is not None:
            log.warning("refused %s: %s", self.peer, refusal)
            transport.write(err(refusal, RespCode.SYS_TEMP))
            self._result = "refused"
            self._closing = True
            transport.close()
            return
        transport.set_write_buffer_limits(high=limits.WRITE_HIGH_WATER)
        identity = self._client_identity(transport) if self.implicit_tls else None
        self.core = Pop3Connection(
            self.server.settings_for(self.address, self.implicit_tls, identity)
        )
        self.last_active = self.loop.time()
        self._run()

    def data_received(self, data: bytes) -> None:
        """Feed the core; answer at once unless a request is running."""
        if self._closing or self.core is None:
            return
        self.last_active = self.loop.time()
        self.core.receive_data(data)
        if self._task is None:
            self._run()
        elif self.core.buffered > limits.MAX_PENDING_INPUT and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool:
        """The peer half-closed: finish the lines already received, then close."""
        if self.core is not None and not self._closing:
            self.core.receive_data(b"")
            if self._task is None:
                self._run()
        # Keep the write side open for the replies still owed.  A TLS transport cannot
        # half-close (asyncio closes it anyway, and warns if we ask otherwise).
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        """Release everything; an UPDATE in progress is let finish."""
        if not self._result:
            self._result = "disconnected"
        self._finish()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self._task is not None and not self._task.done() and not self._in_update():
            self._task.cancel()

    def pause_writing(self) -> None:
        """The socket buffer is past its high-water mark."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """The socket buffer drained."""
        self._write_paused = False
        self.last_active = self.loop.time()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # ------------------------------------------------------------------ the core loop

    def _run(self) -> None:
        """Answer what the core can answer; start a task only for a backend request."""
        event = self._advance()
        if event is not None:
            self._task = self.loop.create_task(self._perform(event))

    def _advance(self) -> Event | None:
        """Handle events until the core needs data, closes, or needs a backend.

        Returns the backend request to perform, or None.  Never blocks.
        """
        core = self.core
        assert core is not None
        assert self.transport is not None
        while True:
            try:
                event = core.next_event()
            except LocalProtocolError:
                log.exception("internal error with %s", self.peer)
                self._abort("internal error")
                return None
            if isinstance(event, NeedData):
                self._flush_soon()
                if self._reading_paused:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return None
            if isinstance(event, AuthRefused):  # information only: log it and go on
                log.warning("refused %s from %s", event.reason, self.peer)
                continue
            if isinstance(event, Closed):
                self._result = self._result or event.reason
                self._closing = True
                self._last_words = core.data_to_send()
                self._flush_soon()
                self._finish()
                return None
            if isinstance(event, SendMessage) and self._send_inline(core, event.uid):
                continue
            if self._answer_now(core, event):
                continue
            self.flush()
            return event

    def _answer_now(self, core: Pop3Connection, event: Event) -> bool:
        """Answer a login, or the UPDATE of a QUIT, without a task: True if answered here.

        The backends' fast paths (``*_now``) answer the common case, a fast password
        scheme and an unchanged maildrop; anything else (a refusal, a slow hash, a scan,
        an error) is left to :meth:`_perform_one`, which answers and logs it.
        """
        backends = self.server.backends
        try:
            if type(event) is PasswordAuthenticate:
                principal = backends.authenticate_now(event, self.address)
                self._auth_result(core, principal, event.username, event.mechanism, "")
            elif type(event) is OpenMaildrop:
                self._opened(core, backends.open_now(event.principal))
            elif type(event) is Update and self.maildrop is not None:
                done = backends.update_now(self.maildrop, event.deleted)
                self.maildrop = None
                if done:
                    core.update_done()
                else:
                    core.update_failed()
            else:
                return False
        except WouldWait:
            return False
        return True

    def _send_inline(self, core: Pop3Connection, uid: str) -> bool:
        """RETR/TOP of a small message without a task: True if it was answered here.

        Storage that can read a small message at once offers ``read_inline`` (an
        optional part of the Maildrop interface); others are streamed by a task.
        """
        read_inline = self._read_inline
        if read_inline is None:
            return False
        try:
            data = read_inline(uid)
        except LocalProtocolError:
            raise
        except Exception as exc:
            self._read_failed(core, uid, exc)
            return True
        if data is None:
            return False
        core.message_data(data)
        core.message_end()
        return True

    async def _perform(self, event: Event | None) -> None:
        """Perform backend requests one after another in one task, then answer inline again.

        A login is authenticate + open maildrop: one task, not two.
        """
        core = self.core
        assert core is not None
        try:
            while event is not None:
                await self._perform_one(core, event)
                self.last_active = self.loop.time()
                if self._closing:
                    return
                event = self._advance()
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("internal error with %s", self.peer)
            self._abort("internal error")
            return
        finally:
            self._task = None

    async def _perform_one(self, core: Pop3Connection, event: Event) -> None:
        match event:
            case PasswordAuthenticate() | ApopAuthenticate():
                result = await self.server.backends.authenticate(event, self.address)
                mechanism = getattr(event, "mechanism", "APOP")
                self._auth_result(core, result, event.username, mechanism, "")
            case SaslSecret(username, scheme):
                secret = await self.server.backends.sasl_secret(username, scheme)
                if isinstance(secret, RespCode):
                    core.auth_failed(secret)
                else:
                    core.sasl_secret(secret)
            case SaslOutcome(username, mechanism, _, reason):
                result = await self.server.backends.sasl_outcome(event, self.address)
                self._auth_result(core, result, username, mechanism, reason)
            case OpenMaildrop(principal):
                opened = await self.server.backends.open(principal)
                if isinstance(opened, RespCode):
                    core.maildrop_failed(opened)
                else:
                    self._opened(core, opened)
            case SendMessage(uid):
                await self._send_message(core, uid)
            case StartTls():
                await self._start_tls(core)
            case Update(deleted):
                maildrop, self.maildrop = self.maildrop, None
                assert maildrop is not None
                done = await self.server.backends.update(maildrop, deleted)
                # Release the lock before the sign-off goes out: a client that logs in
                # again the moment it reads "+OK" must not find its maildrop still locked.
                await _close_maildrop(maildrop, None)
                if done:
                    core.update_done()
                else:
                    core.update_failed()
            case _:
                raise LocalProtocolError(f"unexpected event {event!r}")

    def _auth_result(
        self,
        core: Pop3Connection,
        result: Principal | RespCode,
        username: str,
        mechanism: str,
        reason: str,
    ) -> None:
        if isinstance(result, RespCode):
            # The one audit line of every refusal (pop3d.audit; fail2ban reads it).
            ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
            audit.auth_failed(
                username,
                self.address,
                mechanism,
                "tempfail" if result is RespCode.SYS_TEMP
                else reason if reason in _AUDIT_REASONS else "bad-password",
                ssl_object.version() if ssl_object is not None else None,
            )
            core.auth_failed(result)
        else:
            # The session line at the end says who logged in and how: one line a session.
            self.username = result.username
            self._mechanism = mechanism
            core.auth_succeeded(result)

    def _opened(self, core: Pop3Connection, maildrop: Maildrop) -> None:
        self.maildrop = maildrop
        self._read_inline = getattr(maildrop, "read_inline", None)
        core.maildrop_opened(maildrop.listing())

    def _client_identity(self, transport: asyncio.BaseTransport) -> str | None:
        """The user of the peer's verified certificate, where a client CA is configured."""
        tls = self.server.tls
        if tls is None or tls.config.client_ca is None:
            return None
        return certificate_identity(transport.get_extra_info("peercert"))

    async def _send_message(self, core: Pop3Connection, uid: str) -> None:
        assert self.maildrop is not None
        assert self.transport is not None
        chunks = self.maildrop.read(uid)
        try:
            async for chunk in chunks:
                more = core.message_data(chunk)
                # Small messages leave with their status line and terminator in one
                # write (the flush after message_end); big ones go out chunk by chunk.
                if core.pending_output >= limits.WRITE_COALESCE:
                    self.transport.writelines(core.pieces_to_send())
                if self._write_paused:
                    await self._drain()
                if self._closing:
                    return
                if not more:
                    break
        except LocalProtocolError:
            raise
        except Exception as exc:
            self._read_failed(core, uid, exc)
            return
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:  # close the file now, not when the generator is collected
                await aclose()
        core.message_end()

    def _read_failed(self, core: Pop3Connection, uid: str, exc: Exception) -> None:
        """Report a message that could not be read: vanished, or broken (logged)."""
        if isinstance(exc, MessageVanished):
            core.message_failed(vanished=True)
            return
        log.warning("cannot read message %s for %s", uid, self.username, exc_info=exc)
        core.message_failed(vanished=False)

    async def _drain(self) -> None:
        self._drained = self.loop.create_future()
        try:
            await self._drained
        finally:
            self._drained = None

    async def _start_tls(self, core: Pop3Connection) -> None:
        transport = self.transport
        assert transport is not None
        context = self.server.tls_context()
        if context is None:  # the core only emits StartTls when TLS is available
            raise LocalProtocolError("STLS without a TLS context")
        try:
            new = await self.loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=limits.TLS_HANDSHAKE_TIMEOUT,
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError):
            log.info("TLS handshake failed with %s", self.peer)
            self._result = "tls failed"
            self._closing = True
            transport.abort()
            self._finish()
            return
        if new is None:
            self._abort("tls failed")
            return
        self.transport = new
        core.tls_established(self._client_identity(new))

    # ------------------------------------------------------------------ endings

    def flush(self) -> None:
        """Write the replies the core holds; after a sign-off, close the transport."""
        self._flush_queued = False
        core, transport = self.core, self.transport
        if transport is None:
            return
        if self._last_words is not None:
            transport.write(self._last_words)
            self._last_words = None
            transport.close()
            return
        if core is not None:
            data = core.data_to_send()
            if data:
                transport.write(data)

    def _flush_soon(self) -> None:
        if not self._flush_queued:
            self._flush_queued = True
            self.server.flush_soon(self)

    def _in_update(self) -> bool:
        return self.core is not None and self.core.state is State.UPDATE

    def _abort(self, reason: str) -> None:
        """Close at once, without UPDATE."""
        self._result = self._result or reason
        self._closing = True
        if self.transport is not None:
            self.transport.close()
        self._finish()

    def shutdown(self) -> None:
        """Server is stopping: close without UPDATE (a running UPDATE is let finish)."""
        if self._closing or self._in_update():
            return
        self._hang_up("shutdown", err("server shutting down", RespCode.SYS_TEMP))

    def kick(self) -> None:
        """An administrator ends this session (``pop3d kick``): close without UPDATE."""
        if self._closing or self._in_update():
            return
        self._hang_up("kicked", err("session ended by the administrator", RespCode.SYS_TEMP))

    def idle_timed_out(self) -> None:
        """The server's idle sweep found no activity for ``idle_timeout``: hang up.

        Not while closing, and never in the middle of an UPDATE (the next sweep looks again).
        """
        if self._closing or self._in_update():
            return
        log.info("idle timeout for %s", self.peer)
        self._hang_up("idle timeout", err("autologout: idle for too long"))

    def _hang_up(self, reason: str, farewell: bytes) -> None:
        """Say ``farewell``, close without UPDATE, and stop any running request."""
        if self.transport is not None:
            self.flush()
            self.transport.write(farewell)
        self._abort(reason)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _finish(self) -> None:
        """Once per connection: release the maildrop, log the session."""
        if self.core is None:
            return
        core, self.core = self.core, None
        self._closing = True
        self.server.release(self)
        maildrop, self.maildrop = self.maildrop, None
        if maildrop is not None:
            self.server.spawn(_close_maildrop(maildrop, self._task))
        if log.isEnabledFor(logging.INFO):
            deleted = core.deleted_count if self._result == "quit" else 0
            ssl_object = (
                self.transport.get_extra_info("ssl_object") if self.transport is not None else None
            )
            tls = (ssl_object.version() if ssl_object is not None else None) or "no"
            logsetup.info(
                log,
                f"session peer={self.peer} user={self.username or '-'} via={self._mechanism}"
                f" tls={tls} result={self._result} retr={core.messages_sent}"
                f" octets={core.octets_sent}"
                f" deleted={deleted} secs={time.monotonic() - self._started:.3f}",
            )


async def _close_maildrop(maildrop: Maildrop, task: asyncio.Task[None] | None) -> None:
    """Release the lock once any running request (an UPDATE, say) is over."""
    if task is not None and not task.done():
        with contextlib.suppress(BaseException):
            await asyncio.wait([task])
    try:
        await maildrop.close()
    except Exception:
        log.exception("closing a maildrop failed")
