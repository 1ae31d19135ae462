"""One client connection: read, feed the core, perform its events, write.

Rules:

* Commands the core answers by itself (STAT, LIST, UIDL, DELE, NOOP, CAPA, errors) are
  answered synchronously inside ``data_received``: no task, no await.  So is every backend
  request the backend can finish at once (``session.py``: one method per request, which
  answers or hands its unfinished rest over as a :class:`~pop3d.session.Later`).  A task
  exists only while such a rest is awaited, or a big message streamed, or TLS started, so
  an idle connection costs a protocol object, a transport and a core, nothing more (no
  timer either: the server's one sweep looks at every connection's deadline).
* Bounded memory, whatever the client sends: output counts against a budget.  Replies
  are written at the end of the loop's turn (``ServerContext.flush_soon``), all sessions'
  together, or as soon as :data:`limits.WRITE_COALESCE` octets are queued; once the
  transport is past its high-water mark (the peer does not read), no further command is
  answered, inline or not, before or after login, and reading stops until it drains.
  RETR/TOP stream chunk by chunk under the same rule.  A client that pipelines without
  reading holds the kernel's buffers plus at most about :data:`limits.OUTPUT_BUDGET`.
* Deadlines, not only an idle timer (each a constant in ``limits.py``): activity is a
  complete command, not a byte; an incomplete line must complete within the line
  timeout; a connection not logged in is closed after ``login_timeout`` whatever it
  sends; output that does not drain for ``idle_timeout`` closes the connection.  Each
  deadline is an input to the core (``core.timeout``), which says what may still be sent;
  this file writes no POP3 text of its own.
* Every ending but QUIT in TRANSACTION closes WITHOUT UPDATE: EOF, deadlines, errors,
  shutdown.  The maildrop is always closed (lock released) at the end, and ``close()``
  never deletes.
* After STLS, plaintext that followed the STLS line is discarded by the core.  Once
  ``start_tls`` owns the socket, later plaintext cannot reach us (it is fed to the TLS
  layer and fails the handshake).  Application data that arrives *with* the client's
  last handshake message (GnuTLS clients such as mpop send CAPA in the same flight) is
  delivered here before ``start_tls`` returns: it is encrypted, so it is kept and
  answered after ``tls_established``.
* Every refusal is logged with the peer address; no secret is ever logged, only user
  names and mechanism names.
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
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, cast

from pop3d import audit, logsetup, metrics
from pop3d.errors import LocalProtocolError
from pop3d.protocol import (
    ApopAuthenticate,
    AuthRefused,
    Closed,
    Flush,
    NeedData,
    OpenMaildrop,
    PasswordAuthenticate,
    Pop3Connection,
    SaslOutcome,
    SaslSecret,
    SendMessage,
    StartTls,
    Update,
    limits,
    refusal,
)
from pop3d.protocol.events import Event
from pop3d.protocol.pop3 import Deadline
from pop3d.protocol.replies import RespCode
from pop3d.protocol.states import State
from pop3d.protocol.values import Principal
from pop3d.server.tls import certificate_identity, start_tls
from pop3d.session import AuthRequest, Later, read_failed
from pop3d.storage.base import InlineRead, Paced

if TYPE_CHECKING:
    from pop3d.server.context import Client, ServerContext
    from pop3d.storage.base import Fenced, Maildrop

log = logsetup.get_logger("pop3d.session")

# The limits the loop of every command reads (module constants: one lookup, not two).
_WRITE_COALESCE = limits.WRITE_COALESCE
_WRITES_PER_TURN = limits.WRITES_PER_TURN
_COMMANDS_PER_TURN = limits.COMMANDS_PER_TURN
_WRITE_HIGH_WATER = limits.WRITE_HIGH_WATER


class _Offers(dict[type, bool]):
    """Whether objects of a type offer a capability (a runtime-checkable Protocol).

    ``offers[type(obj)]``, for a Protocol of methods.  Worked out once per type:
    ``isinstance`` on a Protocol checks every member each time; once known, a look-up is
    a dict hit, with no Python call.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: type) -> None:
        super().__init__()
        self._protocol = protocol

    def __missing__(self, kind: type) -> bool:
        known = self[kind] = issubclass(kind, self._protocol)
        return known


#: A method of :class:`Pop3Protocol` that starts a request (``Pop3Protocol.REQUESTS``).
_Start = Callable[["Pop3Protocol", Pop3Connection, Any], "Later[Any] | None"]

_offers_inline_read = _Offers(InlineRead)
_is_paced = _Offers(Paced)

#: The session log's result -> the metrics' vocabulary (``metrics.session_ended``).
_ENDED = {
    "quit": "quit",
    "update failed": "error",
    "disconnected": "disconnect",
    "eof": "disconnect",
    "shutdown": "shutdown",
    "internal error": "error",
    "read error": "error",
    "tls failed": "error",
    "too many errors": "error",
    "auth failures": "error",
    "kicked": "kicked",
    "lock lost": "error",
}


def _unexpected(event: object) -> NoReturn:
    """An event the connection does not know (a bug): the connection closes."""
    raise LocalProtocolError(f"unexpected event {event!r}")


class Pop3Protocol(asyncio.Protocol):
    """asyncio protocol driving one :class:`Pop3Connection`."""

    # Slots: 10,000 idle sessions hold 10,000 of these; no per-instance dict.
    __slots__ = (
        "_blocked",
        "_born",
        "_closing",
        "_drained",
        "_fence",
        "_flush_queued",
        "_handshaking",
        "_last_words",
        "_later",
        "_line_since",
        "_mechanism",
        "_paused_since",
        "_paused_size",
        "_read_inline",
        "_reading_paused",
        "_result",
        "_started",
        "_task",
        "_write_paused",
        "address",
        "client",
        "core",
        "deadline",
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
        client: Client | None = None,
    ) -> None:
        self.server = server
        #: Set by the accept path (PROXY header, implicit TLS), which admitted the
        #: connection and knows the client's address; None: read the peer address.
        self.client = client
        self.implicit_tls = implicit_tls
        # The listener passes its loop: get_running_loop() costs a getpid() system call
        # (CPython's fork check), once per connection on the login path.
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.core: Pop3Connection | None = None
        self.peer = "?"
        self.address = "?"
        self.maildrop: Maildrop | None = None
        #: The maildrop's fast path for small messages, if it has one (see _start_send).
        self._read_inline: InlineRead | None = None
        #: The maildrop's lock if it can be lost (a cluster lease), asked before each batch.
        self._fence: Fenced | None = None
        self._task: asyncio.Task[None] | None = None
        #: The unfinished backend request the task awaits (cancelled if we hang up).
        self._later: Later[Any] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._write_paused = False
        #: Answering stopped because the peer does not read (resumes when it drains).
        self._blocked = False
        #: Whether the server will call :meth:`flush` at the end of this turn.
        self._flush_queued = False
        #: The sign-off to write before the transport is closed, at that :meth:`flush`.
        self._last_words: bytes | None = None
        self._reading_paused = False
        self._closing = False
        self._handshaking = False
        #: ``loop.time()`` of the last complete command or finished request.
        self.last_active = 0.0
        #: When the sweep must next look at this connection (never later than needed).
        self.deadline = 0.0
        self._born = 0.0
        #: ``loop.time()`` since when an incomplete line waits (0: none).
        self._line_since = 0.0
        #: Since when output has not drained, and how much was pending then.
        self._paused_since = 0.0
        self._paused_size = 0
        self._started = time.monotonic()
        self._result = ""
        self.username = ""
        self._mechanism = "-"

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, base_transport: asyncio.BaseTransport) -> None:
        """Admit the client (its deadlines count from now) and send the greeting."""
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        # (an annotation, not typing.cast: no call)
        transport: asyncio.Transport = base_transport  # type: ignore[assignment]
        server = self.server
        if server.wire is not None:  # a test server's transcript and wire faults
            transport = server.wire(self, transport)
        self.transport = transport
        client = self.client
        if client is None:
            peer = transport.get_extra_info("peername")
            if peer:
                self.address = address = str(peer[0])
                self.peer = f"{address}:{peer[1]}"
            else:
                self.address = self.peer = "local"
        else:
            self.address, self.peer = client.address, client.peer
        cap = server.admit(self)
        if cap is not None:
            log.warning("refused %s: over the %s connection cap", self.peer, cap)
            transport.write(refusal(cap))
            self._result = "refused"
            self._closing = True
            self._close_transport(transport, limits.CLOSE_GRACE)
            return
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        identity = self._client_identity(transport) if self.implicit_tls else None
        self.core = Pop3Connection(server.settings_for(self.address, self.implicit_tls, identity))
        self._born = self.last_active = now = self.loop.time()
        self.deadline = now + server.first_wait
        self._run()

    def data_received(self, data: bytes) -> None:
        """Feed the core; answer at once unless a request runs or the peer does not read."""
        core = self.core
        if self._closing or core is None:
            return
        core.receive_data(data)
        if self._task is None and not self._blocked:
            self._run()
        elif core.buffered > limits.MAX_PENDING_INPUT and self.transport is not None:
            self._pause_reading()

    def eof_received(self) -> bool:
        """The peer half-closed: finish the lines already received, then close."""
        if self.core is not None and not self._closing:
            self.core.receive_data(b"")
            if self._task is None and not self._blocked:
                self._run()
        # Keep the write side open for the replies still owed.  A TLS transport cannot
        # half-close (asyncio closes it anyway, and warns if we ask otherwise).
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        """Release everything; an UPDATE in progress is let finish.

        The connection is counted (caps, shutdown) until here, not only until its session
        ended: a socket closing behind unread replies is still held.
        """
        if not self._result:
            self._result = "disconnected"
        core = self.core
        in_update = False
        if core is not None:  # (else _finish ran already: at QUIT, say)
            in_update = core.state is State.UPDATE
            self._finish()
        self.server.release(self)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if not in_update and (self._task is not None or self._later is not None):
            self._cancel_task()

    def pause_writing(self) -> None:
        """The socket buffer is past its high-water mark: the peer is not keeping up."""
        self._write_paused = True
        self._paused_since = now = self.loop.time()
        self._paused_size = 1 << 62
        self.deadline = min(self.deadline, now + self.server.idle_timeout)

    def resume_writing(self) -> None:
        """The socket buffer drained: go on with what was held back."""
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self._blocked and self._task is None and not self._closing and self.core:
            self._blocked = False
            self._run()

    # ------------------------------------------------------------------ the core loop

    def _run(self) -> None:
        """Answer what can be answered now; start a task only for unfinished work."""
        later = self._advance()
        if later is not None:
            self._task = self.loop.create_task(self._perform(later))

    def _advance(self) -> tuple[Event, Later[Any]] | None:
        """Handle events until the core needs data, closes, blocks or must wait.

        Returns the event whose unfinished request must be awaited, or None.  Never blocks.
        """
        core = self.core
        assert core is not None
        assert self.transport is not None
        fence = self._fence
        if fence is not None and not fence.still_held():
            self._fence = None
            log.warning("maildrop lock of %s lost; session of %s ends without UPDATE",
                        self.username, self.peer)
            core.maildrop_lost()
        writes = 0
        # Only next_event() counts commands, and only here: what it counted by the last turn's
        # end is the count now.
        seen = core.commands_received
        turn_ends = seen + _COMMANDS_PER_TURN
        try:
            while True:
                if self._write_paused:
                    # The peer is not reading: answer nothing more, read nothing more.
                    self._blocked = True
                    self._pause_reading()
                    return None
                event = core.next_event()
                # Dispatch on the exact type (the events are final dataclasses): a request
                # (most events: RETR after RETR) in one dict look-up, the rest by identity.
                kind = type(event)
                start = _REQUESTS.get(kind)
                if start is not None:
                    later = start(self, core, event)
                    if later is not None:  # its rest is awaited in the task
                        self.flush()
                        return event, later
                elif kind is NeedData:
                    self._flush_soon()
                    if self._reading_paused:
                        self._reading_paused = False
                        self.transport.resume_reading()
                    return None
                elif kind is Flush:
                    # The core stopped answering: its output is due (a coalesced write),
                    # or it answered a batch of lines.
                    if core.pending_output >= _WRITE_COALESCE:
                        self.flush()
                        writes += 1
                elif kind is Closed:
                    self._result = self._result or event.reason  # type: ignore[union-attr]
                    self._closing = True
                    self._last_words = core.data_to_send()
                    self._flush_soon()
                    self._finish()
                    return None
                elif kind is AuthRefused:  # information only: log it, go on
                    self._auth_refused(event)  # type: ignore[arg-type]
                else:
                    _unexpected(event)
                if writes >= _WRITES_PER_TURN or core.commands_received >= turn_ends:
                    # Fairness: a client whose replies the kernel keeps taking lets the
                    # others (and the accept) have the loop before it is answered further.
                    self._blocked = True
                    self.loop.call_soon(self._next_turn)
                    return None
        except LocalProtocolError:
            log.exception("internal error with %s", self.peer)
            self._abort("internal error")
            return None
        finally:
            # Deadlines: complete commands are activity; an incomplete line starts its
            # own clock.  (A connection that ended here has none left.)  Inline: once a turn.
            if self.core is not None:
                if core.commands_received != seen:
                    self.last_active = self.loop.time()
                    self._line_since = 0.0
                if not self._line_since and core.buffered:
                    self._line_since = now = self.loop.time()
                    self.deadline = min(self.deadline, now + self.server.line_timeout)

    def _next_turn(self) -> None:
        """Go on answering a client that was made to wait its turn (unless it is paused)."""
        if self._blocked and not self._write_paused and not self._closing and self.core:
            self._blocked = False
            if self._task is None:
                self._run()

    # Starting a request (``REQUESTS``, by the event's type): answer it now, or return its
    # unfinished rest.  One path per request (``session.py``): the backends finish at once
    # when they can, and what they cannot finish continues in the task, never started over.

    def _start_auth(
        self, core: Pop3Connection, event: PasswordAuthenticate | ApopAuthenticate | SaslOutcome
    ) -> Later[Any] | None:
        tls = self._tls() if core.tls_active else None
        answer = self.server.backends.authenticate(AuthRequest(event, self.address, tls))
        if isinstance(answer, Later):
            return answer
        self._auth_result(core, event, answer)
        return None

    def _start_open(self, core: Pop3Connection, event: OpenMaildrop) -> Later[Any] | None:
        opened = self.server.backends.open(event.principal)
        if isinstance(opened, Later):
            return opened
        self._open_result(core, opened)
        return None

    def _start_update(self, core: Pop3Connection, event: Update) -> Later[Any] | None:
        maildrop = self.maildrop
        assert maildrop is not None
        # The lock is released before the sign-off goes out: a client that logs
        # in again the moment it reads "+OK" must not find its maildrop locked.
        self.maildrop = None
        self._fence = None
        done = self.server.backends.update(maildrop, event.deleted)
        if isinstance(done, Later):
            return done
        self._update_result(core, done)
        return None

    def _start_send(self, core: Pop3Connection, event: SendMessage) -> Later[Any] | None:
        """RETR/TOP: a small message is sent at once, without a task, where the maildrop can."""
        read_inline = self._read_inline
        if read_inline is not None:
            uid = event.uid
            try:
                data = read_inline.read_inline(uid)
            except LocalProtocolError:
                raise
            except Exception as exc:
                self._read_failed(core, uid, exc)
                return None
            if data is not None:
                before = core.octets_sent
                core.message_data(data)
                core.message_end()
                if metrics.on:
                    metrics.retrieved(core.octets_sent - before)
                return None
        return self._start_io(core, event)

    def _start_io(
        self, core: Pop3Connection, event: SaslSecret | SendMessage | StartTls
    ) -> Later[Any]:
        return Later(self._perform_io(core, event))

    #: The method that starts each request, by the event's type (see :meth:`_advance`).
    REQUESTS: ClassVar[dict[type, _Start]] = {
        PasswordAuthenticate: _start_auth,
        ApopAuthenticate: _start_auth,
        SaslOutcome: _start_auth,
        OpenMaildrop: _start_open,
        Update: _start_update,
        SendMessage: _start_send,
        SaslSecret: _start_io,
        StartTls: _start_io,
    }

    async def _perform(self, pending: tuple[Event, Later[Any]]) -> None:
        """Await unfinished requests one after another in one task, then answer inline again.

        A login is authenticate + open maildrop: one task, not two.
        """
        core = self.core
        assert core is not None
        next_: tuple[Event, Later[Any]] | None = pending
        try:
            while next_ is not None:
                event, later = next_
                self._later = later
                answer = await later.task
                self._later = None
                if self._closing:
                    if isinstance(event, OpenMaildrop) and not isinstance(answer, RespCode):
                        # Opened for a connection that is gone: released at once.
                        self.server.spawn(_close_maildrop(answer, None))
                    return
                self._report(core, event, answer)
                self.last_active = self.loop.time()
                next_ = self._advance()
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("internal error with %s", self.peer)
            self._abort("internal error")
            return
        finally:
            self._later = None
            self._task = None

    def _report(self, core: Pop3Connection, event: Event, answer: Any) -> None:
        """Hand a finished request's answer to the core."""
        match event:
            case PasswordAuthenticate() | ApopAuthenticate() | SaslOutcome():
                self._auth_result(core, event, answer)
            case OpenMaildrop():
                self._open_result(core, answer)
            case Update():
                self._update_result(core, answer)
            case _:  # SaslSecret, SendMessage, StartTls reported to the core themselves
                pass

    async def _perform_io(self, core: Pop3Connection, event: Event) -> None:
        match event:
            case SaslSecret(username, scheme):
                secret = await self.server.backends.sasl_secret(username, scheme)
                if isinstance(secret, RespCode):
                    audit.auth_failed(username, self.address, scheme, "tempfail", self._tls())
                    core.auth_failed(secret)
                else:
                    core.sasl_secret(secret)
            case SendMessage(uid):
                await self._send_message(core, uid)
            case StartTls():
                await self._start_tls(core)
            case _:
                raise LocalProtocolError(f"unexpected event {event!r}")

    def _auth_result(
        self,
        core: Pop3Connection,
        event: PasswordAuthenticate | ApopAuthenticate | SaslOutcome,
        result: Principal | RespCode,
    ) -> None:
        # isinstance() of Principal, not of RespCode: RespCode is an Enum, whose metaclass
        # makes isinstance() look up and call __instancecheck__.
        if isinstance(result, Principal):
            # The session line at the end says who logged in and how: one line a session.
            self.username = result.username
            self._mechanism = event.mechanism if not isinstance(event, ApopAuthenticate) else "APOP"
            core.auth_succeeded(result)
        else:
            # The audit line was written when the verdict was reached (session.py).
            core.auth_failed(result)

    def _auth_refused(self, event: AuthRefused) -> None:
        """The core refused an authentication by itself: the audit line says why."""
        log.info("refused %s from %s", event.reason, self.peer)
        audit.auth_failed(event.username, self.address, event.mechanism, event.code, self._tls())

    def _open_result(self, core: Pop3Connection, opened: Maildrop | RespCode) -> None:
        if type(opened) is RespCode:  # (not isinstance(): see _auth_result)
            core.maildrop_failed(opened)
            return
        # (not a RespCode: the test above, which mypy does not follow)
        maildrop: Maildrop = opened  # type: ignore[assignment]
        self.maildrop = maildrop
        inline = _offers_inline_read[type(maildrop)]
        self._read_inline = maildrop if inline else None  # type: ignore[assignment]
        self._fence = self.server.backends.fence(maildrop)
        core.maildrop_opened(maildrop.listing())

    @staticmethod
    def _update_result(core: Pop3Connection, done: bool) -> None:
        if done:
            core.update_done()
        else:
            core.update_failed()

    def _tls(self) -> str | None:
        """The connection's TLS version, or None (for the audit line)."""
        core, transport = self.core, self.transport
        if core is None or not core.tls_active or transport is None:
            return None
        obj = transport.get_extra_info("ssl_object")
        version = obj.version() if obj is not None else None
        return str(version) if version else "TLS"

    def _client_identity(self, transport: asyncio.BaseTransport) -> str | None:
        """The user of the peer's verified certificate, where a client CA is configured."""
        tls = self.server.tls
        if tls is None or tls.config.client_ca is None:
            return None
        return certificate_identity(transport.get_extra_info("peercert"))

    async def _send_message(self, core: Pop3Connection, uid: str) -> None:
        assert self.maildrop is not None
        transport = self.transport
        assert transport is not None
        before = core.octets_sent
        chunks = self.maildrop.read(uid)
        # While a message streams, the next chunk is made only once the kernel has taken
        # all of the last one (whatever it leaves pauses us until it has gone; a high-water
        # mark of 1, as asyncio's TLS layer pauses at 0 even when empty), so a peer that
        # stops reading holds at most one chunk beyond the kernel's buffers, whatever its
        # size.  A peer that stalled (limits.SHRINK_AFTER_STALL) then gets small chunks
        # (limits.READ_CHUNK_AFTER_STALL), doubling while the kernel takes each whole.
        paced = cast("Paced", chunks) if _is_paced[type(chunks)] else None
        size = limits.READ_CHUNK
        transport.set_write_buffer_limits(high=1, low=0)
        try:
            async for chunk in chunks:
                more = core.message_data(chunk)
                # Small messages leave with their status line and terminator in one
                # write (the flush after message_end); big ones go out chunk by chunk.
                if core.pending_output >= limits.WRITE_COALESCE:
                    transport.writelines(core.pieces_to_send())
                if self._write_paused:
                    del chunk  # not held while the peer stalls (the transport has a copy)
                    if await self._drain(paced):
                        size = limits.READ_CHUNK_AFTER_STALL  # show again that it reads
                elif size < limits.READ_CHUNK:
                    size *= 2
                if self._closing:
                    return
                if not more:
                    break
                if paced is not None:
                    paced.pace(size)
        except LocalProtocolError:
            raise
        except Exception as exc:
            self._read_failed(core, uid, exc)
            return
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=limits.WRITE_HIGH_WATER)
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:  # close the file now, not when the generator is collected
                await aclose()
        core.message_end()
        metrics.retrieved(core.octets_sent - before)

    def _read_failed(self, core: Pop3Connection, uid: str, exc: Exception) -> None:
        """Report a message that could not be read: vanished, or broken (logged)."""
        core.message_failed(vanished=read_failed(uid, self.username, exc))

    async def _drain(self, stream: Paced | None) -> bool:
        """Wait until the peer reads; True if it stalled (``stream`` then dropped its buffer).

        A fast reader's stream waits here after most chunks (for the kernel to take the
        rest of the last): one future and one timer a wait, no task.
        """
        self._drained = drained = self.loop.create_future()
        stalled: list[bool] = []
        timer = None
        if stream is not None:

            def stall() -> None:
                stalled.append(True)
                stream.shrink()

            timer = self.loop.call_later(limits.SHRINK_AFTER_STALL, stall)
        try:
            await drained
        finally:
            self._drained = None
            if timer is not None:
                timer.cancel()
        return bool(stalled)

    async def _start_tls(self, core: Pop3Connection) -> None:
        transport = self.transport
        assert transport is not None
        context = self.server.tls_context()
        if context is None:  # the core only emits StartTls when TLS is available
            raise LocalProtocolError("STLS without a TLS context")
        self._handshaking = True
        try:
            # tls.start_tls: loop.start_tls with a lean TLS layer (docs/tls.md)
            new = await start_tls(
                self.loop,
                transport,
                self,
                context,
                handshake_timeout=self.server.handshake_timeout,
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError):
            # (counted by tls.start_tls, as every outcome)
            log.info("TLS handshake failed with %s", self.peer)
            self._result = "tls failed"
            self._closing = True
            transport.abort()
            self._finish()
            return
        finally:
            self._handshaking = False
        if new is None:
            self._abort("tls failed")
            return
        if self.server.wire is not None:  # a test server's transcript and wire faults
            new = self.server.wire(self, new)
        self.transport = new
        core.tls_established(self._client_identity(new))

    # ------------------------------------------------------------------ deadlines

    def check_deadlines(self, now: float) -> None:
        """The server's sweep: close the connection if a deadline passed, else note the next.

        Not while closing, never in the middle of an UPDATE or a TLS handshake (which has
        its own deadline); the sweep looks again later.
        """
        core, transport = self.core, self.transport
        if self._closing or core is None or transport is None:
            return
        server = self.server
        idle = server.idle_timeout
        if core.state is State.UPDATE or self._handshaking:
            self.deadline = now + limits.IDLE_SWEEP_INTERVAL
            return
        due = now + idle
        if self._write_paused:
            size = transport.get_write_buffer_size()
            if size < self._paused_size:  # some of it drained: progress
                self._paused_since, self._paused_size = now, size
            if now - self._paused_since >= idle:
                self._time_out(core, "send")
                return
            due = min(due, self._paused_since + idle)
        if core.state is State.AUTHORIZATION:
            if now - self._born >= server.login_timeout:
                self._time_out(core, "login")
                return
            due = min(due, self._born + server.login_timeout)
        if self._line_since:
            if now - self._line_since >= server.line_timeout:
                self._time_out(core, "line")
                return
            due = min(due, self._line_since + server.line_timeout)
        if self._task is None and not self._write_paused:
            if now - self.last_active >= idle:
                self._time_out(core, "idle")
                return
            due = min(due, self.last_active + idle)
        self.deadline = due

    def _time_out(self, core: Pop3Connection, deadline: Deadline) -> None:
        """Close for ``deadline``: the core says what may still be sent; no UPDATE."""
        log.info("%s timeout for %s", deadline, self.peer)
        last_words = core.timeout(deadline)
        self._hang_up(f"{deadline} timeout", last_words, abort=deadline == "send")

    def shutdown(self) -> None:
        """Server is stopping: close without UPDATE (a running UPDATE is let finish)."""
        core = self.core
        if self._closing or core is None or self._in_update():
            return
        self._hang_up("shutdown", core.shutdown(), abort=self._handshaking)

    def kick(self) -> None:
        """An administrator ends this session (``pop3d kick``): close without UPDATE."""
        core = self.core
        if self._closing or core is None or self._in_update():
            return
        self._hang_up("kicked", core.kicked(), abort=self._handshaking)

    def _hang_up(self, reason: str, last_words: bytes, *, abort: bool) -> None:
        """Send ``last_words`` (unless the peer cannot take them), close, stop the request."""
        transport = self.transport
        self._result = self._result or reason
        self._closing = True
        if transport is not None:
            if abort or self._write_paused:  # the peer is not reading: nothing more to say
                transport.abort()
            else:
                transport.write(last_words)
                self._close_transport(transport, limits.CLOSE_GRACE)
        self._finish()
        self._cancel_task()

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
            # Replies pipelined before a QUIT may still wait for a peer that does not read.
            self._close_transport(transport, self.server.idle_timeout)
            return
        if core is not None:
            data = core.data_to_send()
            if data:
                transport.write(data)

    def _flush_soon(self) -> None:
        """Have :meth:`flush` called at the end of this turn of the loop (once)."""
        if not self._flush_queued:
            self._flush_queued = True
            self.server.flush_soon(self)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _in_update(self) -> bool:
        return self.core is not None and self.core.state is State.UPDATE

    def _cancel_task(self) -> None:
        """Stop the running request (an authentication's verdict and penalty go on)."""
        later = self._later
        if later is not None and not later.task.done():
            later.task.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _abort(self, reason: str) -> None:
        """Close at once, without UPDATE."""
        self._result = self._result or reason
        self._closing = True
        if self.transport is not None:
            self._close_transport(self.transport, limits.CLOSE_GRACE)
        self._finish()

    def _close_transport(self, transport: asyncio.Transport, grace: float) -> None:
        """Close once the pending output is written, or abort after ``grace`` seconds.

        Every close goes through here: a peer that never reads must not keep a closing
        socket (and its buffer) for ever.
        """
        pending = transport.get_write_buffer_size()
        transport.close()
        if pending:
            self.loop.call_later(grace, transport.abort)

    def _finish(self) -> None:
        """Once per connection: release the maildrop, log the session."""
        if self.core is None:
            return
        core, self.core = self.core, None
        self._closing = True
        maildrop, self.maildrop = self.maildrop, None
        self._fence = None
        if maildrop is not None:
            self.server.spawn(_close_maildrop(maildrop, self._task))
        result = self._result
        if metrics.on:  # (the label is worked out only where it is counted)
            if result == "quit" and core.principal is None:
                ended = "quit_auth"
            elif result.endswith("timeout"):
                ended = "timeout"
            else:
                ended = _ENDED.get(result, "error")
            metrics.session_ended(ended)
        if log.isEnabledFor(logging.INFO):
            deleted = core.deleted_count if result == "quit" else 0
            tls = "no"
            transport = self.transport
            if core.tls_active and transport is not None:  # (else there is no ssl_object)
                ssl_object = transport.get_extra_info("ssl_object")
                tls = (ssl_object.version() if ssl_object is not None else None) or "no"
            log.info(
                "session peer=%s user=%s via=%s tls=%s result=%s retr=%d octets=%d"
                " deleted=%d secs=%.3f",
                self.peer, self.username or "-", self._mechanism, tls, result,
                core.messages_sent, core.octets_sent, deleted, time.monotonic() - self._started,
            )


#: (a module global for :meth:`Pop3Protocol._advance`: one look-up, not two)
_REQUESTS: dict[type, _Start] = Pop3Protocol.REQUESTS


async def _close_maildrop(maildrop: Maildrop, task: asyncio.Task[None] | None) -> None:
    """Release the lock once any running request (an UPDATE, say) is over."""
    if task is not None and not task.done():
        with contextlib.suppress(BaseException):
            await asyncio.wait([task])
    try:
        await maildrop.close()
    except Exception:
        log.exception("closing a maildrop failed")
