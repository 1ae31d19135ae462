"""The POP3 session state machine (RFC 1939, 2449, 2595, 6856), sans I/O.

The driver feeds received bytes with :meth:`Pop3Connection.receive_data` (``b""`` means the
peer closed), asks :meth:`Pop3Connection.next_event` what to do, and sends what
:meth:`Pop3Connection.data_to_send` returns.  The core answers by itself everything it can
from its own state (CAPA, STAT, LIST, UIDL, DELE, RSET, NOOP, every error) and pauses with
a request event only where the outside world is needed: checking a password, opening the
maildrop, streaming a message, starting TLS, applying deletions.

Rules this file keeps:

* Message numbers, sizes and the deleted set live here, fixed when the maildrop opens;
  backends never see message numbers.  Deletions are only handed out in :class:`Update`,
  which is only produced by QUIT in TRANSACTION.  Every other ending is :class:`Closed`,
  and a closed session never updates.
* Commands are answered strictly in order, one at a time (pipelining is just more lines
  in the buffer).  A command not in its state's row of :data:`states.COMMANDS` is an error.
* Every ``-ERR`` text is ours; no client byte and no exception text reaches the wire.
* Bounded output: once the queued replies reach ``settings.output_chunk`` (and after every
  64 lines handled by itself) the core stops and returns :class:`Flush`; it answers more
  only when asked again, so a driver that stops asking while its peer does not read
  holds a bounded amount, whatever is pipelined.
* A connection refused at accept (a connection cap) gets its one line from the core too,
  :func:`refusal`, without a session: the transport writes no POP3 text of its own.
* Deadlines and shutdown are the driver's inputs (:meth:`Pop3Connection.timeout`,
  :meth:`Pop3Connection.shutdown`): the core closes without UPDATE and says what may still
  be sent (nothing in the middle of a message).  The core counts its own refusals
  against the error budget.
* After :data:`limits.MAX_BAD_COMMANDS` consecutive errors, or
  :data:`limits.MAX_AUTH_ATTEMPTS` failed logins, the connection is closed.
* STLS: the ``+OK`` is the last plaintext byte; anything received after the STLS line is
  discarded, never answered (the STARTTLS command-injection class of bugs).
* AUTH (RFC 5034): while an exchange runs, lines are SASL responses (base64, ``*``
  cancels, at most :data:`limits.MAX_SASL_LINE` octets), not commands.  The mechanisms
  themselves are step machines in :mod:`.sasl`; the core only frames them.  A mechanism
  that carries a password (PLAIN, LOGIN) is refused, unread, wherever USER/PASS would be.
  Challenges and nonces come from the settings, never from a clock or RNG of our own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal

from pop3d.protocol import commands as c
from pop3d.protocol import limits, sasl
from pop3d.protocol.commands import parse
from pop3d.protocol.errors import LocalProtocolError
from pop3d.protocol.events import (
    ApopAuthenticate,
    AuthRefused,
    Closed,
    Event,
    Flush,
    NeedData,
    OpenMaildrop,
    PasswordAuthenticate,
    SaslOutcome,
    SaslSecret,
    SendMessage,
    StartTls,
    Update,
)
from pop3d.protocol.lines import OVERLONG, LineBuffer
from pop3d.protocol.replies import (
    DenseStuffer,
    DotStuffer,
    Piece,
    RespCode,
    TopFilter,
    err,
    multiline,
    ok,
    stuff_dense,
)
from pop3d.protocol.states import COMMANDS, State
from pop3d.protocol.values import MessageInfo, Principal

_NEED_DATA = NeedData()
_FLUSH = Flush()
# The states as module constants: on CPython 3.11 a ``State.X`` look-up goes through
# ``EnumType.__getattr__``'s slow hook (docs/performance.md, store14 and core14).
_AUTHORIZATION = State.AUTHORIZATION
_TRANSACTION = State.TRANSACTION
_UPDATE = State.UPDATE
_CLOSED = State.CLOSED
_MAX_COMMAND_LINE = limits.MAX_COMMAND_LINE
_MAX_SASL_LINE = limits.MAX_SASL_LINE
_SIZE = attrgetter("size")
#: The reports that answer a verification, and every report that ends an authentication.
_VERIFY_EVENTS = (PasswordAuthenticate, ApopAuthenticate, SaslOutcome)
_AUTH_EVENTS = (*_VERIFY_EVENTS, SaslSecret)
_OK = ok()
_SEND_PASS = ok("send PASS")
#: Lines the core handles by itself before it hands the driver a :class:`Flush`, so that
#: the driver can take its turn (and bound its own) inside a long pipelined batch.
_LINES_PER_EVENT = 64

#: The driver's deadlines (see :meth:`Pop3Connection.timeout`): ``idle``, no complete
#: command for ``idle_timeout``; ``login``, not logged in after ``login_timeout``;
#: ``line``, a command line left incomplete too long; ``send``, output not drained.
Deadline = Literal["idle", "login", "line", "send"]

_DEADLINE_TEXT: dict[str, str] = {
    "idle": "autologout: idle for too long",
    "login": "login timeout",
    "line": "command line timeout",
    "send": "output not read",
}


#: The connection caps the transport counts at accept: ``total`` (``max_connections``),
#: ``per_ip`` (``max_connections_per_ip``).
Cap = Literal["total", "per_ip"]

_REFUSAL_TEXT: dict[str, str] = {
    "total": "too many connections",
    "per_ip": "too many connections from your address",
}


# Events and lines that are the same in many sessions are made once (they are immutable).
_UPDATE_NOTHING = Update(())


@functools.lru_cache(maxsize=32)
def _closed(reason: str) -> Closed:
    """The :class:`Closed` event for ``reason`` (one of a dozen texts of this module)."""
    return Closed(reason)


@functools.lru_cache(maxsize=8)
def _greeting(text: str) -> bytes:
    """The greeting line without APOP: the same for every connection (a few configured)."""
    return ok(text)


def refusal(cap: Cap) -> bytes:
    """The one line a connection refused by ``cap`` gets instead of the greeting.

    No session starts for it: the transport writes these bytes (on a cleartext
    listener; a TLS one cannot speak before its handshake) and closes.
    """
    return err(_REFUSAL_TEXT[cap], RespCode.SYS_TEMP)


@dataclass(frozen=True, slots=True)
class Pop3Settings:
    """Everything a session needs to know about its server and its connection."""

    #: Text of the greeting after ``+OK``.
    greeting: str = "POP3 server ready"
    #: RFC 1939 §7 APOP timestamp (``<pid.clock@host>``); None disables APOP.
    apop_timestamp: bytes | None = None
    #: Value of the IMPLEMENTATION capability.
    implementation: str = "pop3d"
    #: STLS can be offered (a TLS context exists and this is a cleartext connection).
    tls_available: bool = False
    #: The connection is already encrypted (implicit TLS, POP3S).
    tls_active: bool = False
    #: The peer may send a password in the clear (it is in secure_networks, or
    #: plaintext_without_tls is set); TLS always allows it.
    plaintext_allowed: bool = True
    #: SASL mechanisms enabled by the configuration, in CAPA order.  Each is offered only
    #: where it can work: PLAIN/LOGIN where plaintext is allowed, CRAM-MD5/SCRAM-SHA-256
    #: when ``sasl_nonce`` is set, EXTERNAL with a verified client certificate.
    sasl_mechanisms: tuple[str, ...] = ()
    #: Unique per connection, printable, no comma: the driver's randomness for CRAM-MD5
    #: challenges and SCRAM server nonces (later exchanges append a counter).  Empty:
    #: those mechanisms are not offered.
    sasl_nonce: str = ""
    #: Host name in the CRAM-MD5 challenge (RFC 2195 ``<unique@host>``).
    hostname: str = "localhost"
    #: User name of the verified TLS client certificate (implicit TLS); enables EXTERNAL.
    client_identity: str | None = None
    #: RFC 2449 LOGIN-DELAY in seconds, advertised in CAPA when positive; the driver
    #: enforces it (it answers OpenMaildrop with ``LOGIN_DELAY``).
    login_delay: int = 0
    max_bad_commands: int = limits.MAX_BAD_COMMANDS
    #: Queued reply octets at which the core stops answering and asks for a :class:`Flush`.
    output_chunk: int = limits.WRITE_COALESCE
    max_auth_attempts: int = limits.MAX_AUTH_ATTEMPTS
    #: What byte-stuffs the big chunks of a message that has many line-start dots (the
    #: regex by default; the server passes :func:`pop3d.simdtext.stuff_dense` when it can).
    stuff_dense: DenseStuffer = stuff_dense


class Pop3Connection:
    """One POP3 session, from greeting to close, with no I/O of its own."""

    # Slots: an idle session holds one of these; no per-instance dict.
    __slots__ = (
        "_auth_failures",
        "_bad_commands",
        "_capa",
        "_client_identity",
        "_close_reason",
        "_deleted",
        "_dots",
        "_eof",
        "_lines",
        "_listing",
        "_live_count",
        "_live_size",
        "_lost",
        "_out",
        "_pending",
        "_queued",
        "_refused",
        "_sasl",
        "_sasl_count",
        "_status_line",
        "_stuffer",
        "_top",
        "_user",
        "_utf8",
        "commands_received",
        "deleted_count",
        "messages_sent",
        "octets_sent",
        "pending_output",
        "principal",
        "settings",
        "state",
        "tls_active",
    )

    def __init__(self, settings: Pop3Settings) -> None:
        self.settings = settings
        self.state = _AUTHORIZATION
        self.tls_active = settings.tls_active
        self._lines = LineBuffer()
        if settings.apop_timestamp is None:
            greeting = _greeting(settings.greeting)
        else:
            greeting = ok(settings.greeting + " " + settings.apop_timestamp.decode("ascii"))
        #: Replies, and the pieces of a message being sent, in order.
        self._out: list[Piece] = [greeting]
        #: Octets in ``_out``, queued for the peer and not yet taken by
        #: :meth:`data_to_send`: what the driver's output budget counts (an attribute,
        #: not a property: the driver reads it after every event).
        self.pending_output = len(greeting)
        #: Whether the command being handled was refused (it counts against the budget).
        self._refused = False
        self._eof = False
        self._pending: Event | None = None
        self._queued: Event | None = None
        self._close_reason = ""
        self._bad_commands = 0
        #: The CAPA reply, made once per state (a flood of CAPA costs a copy each).
        self._capa: bytes | None = None
        self._auth_failures = 0
        self._utf8 = False
        self._user: str | None = None
        self._client_identity = settings.client_identity
        #: The SASL exchange in progress (its lines are not commands).
        self._sasl: sasl.Mechanism | None = None
        self._sasl_count = 0
        self.principal: Principal | None = None
        self._listing: tuple[MessageInfo, ...] = ()
        #: Indexes marked by DELE: a dict as an ordered set (an empty dict is 64 octets,
        #: an empty set 216, in every idle session).
        self._deleted: dict[int, None] = {}
        self._live_count = 0
        self._live_size = 0
        #: The maildrop's lock was lost (a cluster lease): the next command ends the session.
        self._lost = False
        # The message being streamed.
        self._stuffer: DotStuffer | None = None
        #: The session's stuffer, made at its first message and restarted for each.
        self._dots: DotStuffer | None = None
        self._top: TopFilter | None = None
        self._status_line = b""
        # Statistics for the session log line.
        self.messages_sent = 0
        #: Complete command (or SASL) lines taken from the input: the driver's activity.
        self.commands_received = 0
        self.octets_sent = 0
        self.deleted_count = 0

    # ---------------------------------------------------------------- the three verbs

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
        elif self.state is not _CLOSED:
            self._lines.feed(data)

    def data_to_send(self) -> bytes:
        """Return (and forget) the bytes the core has queued for the peer."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out)  # one bytes piece is returned as it is, not copied
        out.clear()
        self.pending_output = 0
        return data

    def pieces_to_send(self) -> list[Piece]:
        """Return (and forget) what :meth:`data_to_send` would, as pieces not yet joined.

        For a driver that can write several buffers at once (``writev``): a big stuffed
        chunk then goes out without being copied into one buffer first.
        """
        out, self._out = self._out, []
        self.pending_output = 0
        return out

    def next_event(self) -> Event:
        """Return what the driver must do next.

        Raises:
            LocalProtocolError: the previous request event was not answered yet.

        """
        if self._pending is not None:
            raise LocalProtocolError(f"{type(self._pending).__name__} was not answered")
        if self._queued is not None:
            queued, self._queued = self._queued, None
            if not isinstance(queued, AuthRefused):  # information only: nothing to answer
                self._pending = queued
            return queued
        # Locals for what the loop reads on every line (this runs for every command).
        lines = self._lines
        output_chunk = self.settings.output_chunk
        answered = 0
        while self.state is not _CLOSED:
            if self.pending_output >= output_chunk or answered >= _LINES_PER_EVENT:
                # Answer no more until the driver has taken these (and let others run).
                return _FLUSH
            answered += 1
            in_sasl = self._sasl is not None
            line = lines.next_line(_MAX_SASL_LINE if in_sasl else _MAX_COMMAND_LINE)
            if line is None:
                if self._eof:
                    self._close("eof")
                    break
                return _NEED_DATA
            self.commands_received += 1
            if line is OVERLONG:
                self._sasl = None
                self._bad("line too long")
                continue
            event = self._sasl_line(line) if in_sasl else self._dispatch(line)
            if event is None:
                continue
            if isinstance(event, AuthRefused):
                return event  # information only: nothing to wait for
            self._pending = event
            return event
        return _closed(self._close_reason)

    @property
    def buffered(self) -> int:
        """Octets received but not yet answered (the driver stops reading past a bound)."""
        return self._lines.pending()

    # ---------------------------------------------------------------- driver reports

    def auth_succeeded(self, principal: Principal) -> None:
        """The credentials of the pending authentication event are good."""
        self._answer(_VERIFY_EVENTS)
        self.principal = principal
        self._queued = OpenMaildrop(principal)

    def auth_failed(self, code: RespCode | None = RespCode.AUTH) -> None:
        """The credentials were refused (``code`` AUTH), or auth is down (``SYS_TEMP``)."""
        pending = self._pending
        self._answer(_AUTH_EVENTS)
        self._user = None
        self._sasl = None
        if code is RespCode.SYS_TEMP:
            self._emit(err("authentication temporarily unavailable", code))
            return
        self._auth_failures += 1
        by_password = isinstance(pending, ApopAuthenticate) or (
            isinstance(pending, PasswordAuthenticate) and pending.mechanism == "USER"
        )
        self._emit(err("invalid password" if by_password else "authentication failed", code))
        if self._auth_failures >= self.settings.max_auth_attempts:
            self._close("auth failures")

    def sasl_secret(self, secret: bytes | None) -> None:
        """The secret a :class:`SaslSecret` asked for (``None``: there is none)."""
        self._answer(SaslSecret)
        assert self._sasl is not None
        event = self._sasl_step(self._sasl.secret(secret))
        if event is not None:
            self._queued = event

    def maildrop_opened(self, listing: Sequence[MessageInfo]) -> None:
        """The maildrop is locked and open; ``listing`` is fixed for the session."""
        self._answer(OpenMaildrop)
        self._listing = listing = tuple(listing)
        self._live_count = len(listing)
        self._live_size = sum(map(_SIZE, listing))
        self.state = _TRANSACTION
        self._capa = None
        assert self.principal is not None
        self._emit(
            ok(f"{self.principal.username}'s maildrop has {self._summary()}")
        )

    def maildrop_failed(self, code: RespCode) -> None:
        """The maildrop could not be opened, or may not be yet.

        ``IN_USE``: locked; ``LOGIN_DELAY``: too soon after the user's last login;
        ``SYS_TEMP``/``SYS_PERM``: broken.
        """
        self._answer(OpenMaildrop)
        self.principal = None
        self._user = None
        if code is RespCode.IN_USE:
            self._emit(err("maildrop already locked", code))
        elif code is RespCode.LOGIN_DELAY:
            delay = self.settings.login_delay
            self._emit(err(f"wait {delay} seconds between logins", code))
        else:
            self._emit(err("unable to lock maildrop", code))

    def message_data(self, chunk: bytes) -> bool:
        """Add the next chunk of the message being sent; False means "stop, I have enough"."""
        if not isinstance(self._pending, SendMessage):
            raise LocalProtocolError("report does not match the pending event")
        stuffer = self._stuffer
        assert stuffer is not None
        if self._status_line:
            self._emit(self._status_line)
            self._status_line = b""
        top = self._top
        if top is not None:
            chunk = top.feed(chunk)
        self.octets_sent += len(chunk)
        pieces = stuffer.feed(chunk)
        self._out += pieces
        self.pending_output += sum(map(len, pieces))
        return top is None or not top.done

    def message_end(self) -> None:
        """The message (or all of it that TOP wanted) has been fed."""
        self._answer(SendMessage)
        assert self._stuffer is not None
        if self._status_line:
            self._emit(self._status_line)
        self._emit(self._stuffer.end())
        self._stuffer = self._top = None
        self._status_line = b""
        self.messages_sent += 1

    def message_failed(self, *, vanished: bool) -> None:
        """The message could not be read (``vanished``: another program removed it)."""
        self._answer(SendMessage)
        started = not self._status_line
        self._stuffer = self._top = None
        self._status_line = b""
        if started:
            # Part of a multi-line reply is out: the client cannot be resynchronised.
            self._close("read error")
        elif vanished:
            self._emit(err("message was removed by another session"))
        else:
            self._emit(err("cannot read message", RespCode.SYS_TEMP))

    def tls_established(self, client_identity: str | None = None) -> None:
        """The TLS handshake after STLS succeeded; the session starts over (RFC 2595 §4).

        Args:
            client_identity: the user name of the client's verified certificate, if it
                presented one (enables SASL EXTERNAL).

        """
        self._answer(StartTls)
        self.tls_active = True
        self._capa = None
        self._user = None
        self._client_identity = client_identity

    def update_done(self) -> None:
        """UPDATE removed every message marked deleted."""
        self._answer(Update)
        left = self._live_count
        self._emit(ok(f"{self.settings.implementation} signing off ({left} left)"))
        self._close("quit")

    def update_failed(self) -> None:
        """UPDATE could not remove some deleted messages (RFC 1939 §6)."""
        self._answer(Update)
        self._emit(err("some deleted messages not removed", RespCode.SYS_TEMP))
        self._close("update failed")

    # ---------------------------------------------------------------- driver inputs

    def maildrop_lost(self) -> None:
        """The maildrop's lock is gone (a cluster lease expired or was taken).

        The session may no longer act on the maildrop: its next command, whatever it is,
        is answered ``-ERR [SYS/TEMP]`` and the session closes without UPDATE, so nothing
        marked deleted is removed.  A request in progress is let finish (the backend
        fences its own reads and UPDATE).  Outside TRANSACTION this does nothing.
        """
        if self.state is _TRANSACTION:
            self._lost = True

    def timeout(self, deadline: Deadline) -> bytes:
        """One of the driver's deadlines expired: close without UPDATE.

        Returns the last bytes to send (the driver writes them if the peer can still
        take them, then hangs up).  Mid-message no ``-ERR`` is possible (it would read as
        message text), so nothing more is said.  The driver stops the request it was
        performing; never call this while an :class:`Update` is pending.

        Raises:
            LocalProtocolError: the session is in UPDATE.

        """
        text = _DEADLINE_TEXT[deadline]
        return self._hang_up(f"{deadline} timeout", text, None)

    def shutdown(self) -> bytes:
        """The server is stopping: close without UPDATE; return the last bytes to send.

        Raises:
            LocalProtocolError: the session is in UPDATE (let it finish instead).

        """
        return self._hang_up("shutdown", "server shutting down", RespCode.SYS_TEMP)

    def kicked(self) -> bytes:
        """An administrator ended the session (``pop3d kick``): close without UPDATE.

        Returns the last bytes to send.

        Raises:
            LocalProtocolError: the session is in UPDATE (let it finish instead).

        """
        return self._hang_up("kicked", "session ended by the administrator", RespCode.SYS_TEMP)

    def _hang_up(self, reason: str, text: str, code: RespCode | None) -> bytes:
        if self.state is _UPDATE:
            raise LocalProtocolError("a session in UPDATE is let finish")
        if self.state is not _CLOSED:
            mid_message = self._stuffer is not None and not self._status_line
            self._pending = self._queued = None
            self._sasl = None
            self._stuffer = self._top = None
            self._status_line = b""
            if mid_message:
                self._out.clear()
                self.pending_output = 0
            else:
                self._emit(err(text, code))
            self._close(reason)
        return self.data_to_send()

    # ---------------------------------------------------------------- internals

    def _answer(self, kinds: type | tuple[type, ...]) -> None:
        if not isinstance(self._pending, kinds):
            raise LocalProtocolError("report does not match the pending event")
        self._pending = None

    def _close(self, reason: str) -> None:
        self.state = _CLOSED
        self._close_reason = reason
        self._lines.clear()

    def _emit(self, reply: bytes) -> None:
        """Queue one reply (or piece of one) for the peer."""
        self._out.append(reply)
        self.pending_output += len(reply)

    def _refuse(self, reason: str, code: RespCode | None = None) -> None:
        """Answer the command being handled with ``-ERR``; it counts as a bad command."""
        self._emit(err(reason, code))
        self._refused = True

    def _bad(self, reason: str, code: RespCode | None = None) -> None:
        self._emit(err(reason, code))
        self._count_bad()

    def _count_bad(self) -> None:
        """One more consecutive error; the budget spent closes the connection."""
        self._bad_commands += 1
        if self._bad_commands >= self.settings.max_bad_commands:
            self._emit(err("too many bad commands, closing"))
            self._close("too many errors")

    def _summary(self) -> str:
        n = self._live_count
        return f"{n} message{'' if n == 1 else 's'} ({self._live_size} octets)"

    def _plaintext_ok(self) -> bool:
        return self.tls_active or self.settings.plaintext_allowed

    def _dispatch(self, line: bytes) -> Event | None:
        if self._lost:
            self._emit(err("maildrop lock lost, closing without update", RespCode.SYS_TEMP))
            self._close("lock lost")
            return None
        cmd = parse(line, self._utf8)
        # One lookup both checks the command against its state's row of COMMANDS and
        # finds its handler (a parse error is in no row).
        handler = _HANDLERS[self.state].get(type(cmd))
        if handler is None:
            if isinstance(cmd, c.ParseError):
                self._bad(cmd.reason)
            else:
                self._bad("command not valid in this state")
            return None
        self._refused = False
        event = handler(self, cmd)
        self._count_errors()
        return event

    def _count_errors(self) -> None:
        """A command the core refused counts against the error budget; any other resets it."""
        if self._refused:
            self._count_bad()
        else:
            self._bad_commands = 0

    # ---------------------------------------------------------------- the commands
    # One method a command, found by the command's type in _HANDLERS.

    def _on_capa(self, _: c.Capa) -> None:
        capa = self._capa
        if capa is None:
            capa = multiline(ok("Capability list follows"), self._capabilities())
            self._capa = capa
        self._emit(capa)

    def _on_quit(self, _: c.Quit) -> Update | None:
        if self.state is _TRANSACTION:
            self.state = _UPDATE
            if not self._deleted:
                return _UPDATE_NOTHING
            listing = self._listing
            deleted = tuple([listing[i].uid for i in sorted(self._deleted)])
            self.deleted_count = len(deleted)
            return Update(deleted)
        self._emit(ok(f"{self.settings.implementation} signing off"))
        self._close("quit")
        return None

    def _on_user(self, cmd: c.User) -> AuthRefused | None:
        if not self._plaintext_ok():
            return self._refuse_plaintext("USER")
        self._user = cmd.name
        self._emit(_SEND_PASS)
        return None

    def _on_pass(self, cmd: c.Pass) -> Event | None:
        if not self._plaintext_ok():
            return self._refuse_plaintext("PASS")
        if self._user is None:
            self._refuse("send USER first")
            return None
        return PasswordAuthenticate(self._user, cmd.password)

    def _on_apop(self, cmd: c.Apop) -> ApopAuthenticate | None:
        if self.settings.apop_timestamp is None:
            self._refuse("APOP is not enabled")
            return None
        return ApopAuthenticate(cmd.name, self.settings.apop_timestamp, cmd.digest)

    def _on_auth(self, cmd: c.Auth) -> Event | None:
        return self._auth(cmd.mechanism, cmd.initial_response)

    def _on_stls(self, _: c.Stls) -> Event | None:
        return self._stls()

    def _on_utf8(self, _: c.Utf8) -> None:
        self._utf8 = True
        self._emit(ok("UTF8 enabled"))

    def _on_noop(self, _: c.Noop) -> None:
        self._emit(_OK)

    def _on_stat(self, _: c.Stat) -> None:
        self._emit(b"+OK %d %d\r\n" % (self._live_count, self._live_size))

    def _on_list(self, cmd: c.List) -> None:
        n = cmd.msg
        if n is None:
            lines = [
                b"%d %d" % (i + 1, m.size)
                for i, m in enumerate(self._listing)
                if i not in self._deleted
            ]
            self._emit(multiline(ok(self._summary()), lines))
        elif (info := self._message(n)) is not None:
            self._emit(ok(f"{n} {info.size}"))

    def _on_uidl(self, cmd: c.Uidl) -> None:
        n = cmd.msg
        if n is None:
            lines = [
                b"%d %s" % (i + 1, m.uid.encode())
                for i, m in enumerate(self._listing)
                if i not in self._deleted
            ]
            self._emit(multiline(ok("unique-id listing follows"), lines))
        elif (info := self._message(n)) is not None:
            self._emit(ok(f"{n} {info.uid}"))

    def _on_retr(self, cmd: c.Retr) -> SendMessage | None:
        if (info := self._message(cmd.msg)) is not None:
            return self._send(info, b"+OK %d octets\r\n" % info.size, None)
        return None

    def _on_top(self, cmd: c.Top) -> SendMessage | None:
        if (info := self._message(cmd.msg)) is not None:
            return self._send(info, ok("top of message follows"), cmd.lines)
        return None

    def _on_dele(self, cmd: c.Dele) -> None:
        n = cmd.msg
        if (info := self._message(n)) is not None:
            self._deleted[n - 1] = None
            self._live_count -= 1
            self._live_size -= info.size
            self._emit(ok(f"message {n} deleted"))

    def _on_rset(self, _: c.Rset) -> None:
        self._deleted.clear()
        self._live_count = len(self._listing)
        self._live_size = sum(map(_SIZE, self._listing))
        self._emit(ok(f"maildrop has {self._summary()}"))

    def _message(self, n: int) -> MessageInfo | None:
        """Return message ``n`` (1-based) or queue the ``-ERR`` saying why not."""
        if not 1 <= n <= len(self._listing):
            self._refuse("no such message")
            return None
        if n - 1 in self._deleted:
            self._refuse("message is deleted")
            return None
        return self._listing[n - 1]

    def _send(self, info: MessageInfo, status: bytes, body_lines: int | None) -> SendMessage:
        stuffer = self._dots
        if stuffer is None:
            stuffer = self._dots = DotStuffer(self.settings.stuff_dense)
        else:
            stuffer.restart()  # a call, where a new one is a class call and its __init__
        self._stuffer = stuffer
        self._top = TopFilter(body_lines) if body_lines is not None else None
        # The +OK goes out with the first chunk, so that a message that cannot be
        # opened still gets a clean -ERR.
        self._status_line = status
        return SendMessage(info.uid, body_lines)

    def _refuse_plaintext(self, what: str, mechanism: str = "USER") -> AuthRefused:
        self._refuse("plaintext authentication disallowed on non-secure connections", RespCode.AUTH)
        return AuthRefused(
            f"{what} without TLS from outside secure_networks",
            "cleartext-refused",
            mechanism,
            self._user or "",
        )

    # ---------------------------------------------------------------- SASL (RFC 5034)

    def _mechanisms(self) -> list[str]:
        """The SASL mechanisms usable on this connection now, in configured order."""
        plaintext_ok = self._plaintext_ok()
        nonce = bool(self.settings.sasl_nonce)
        certificate = self._client_identity is not None
        return [
            name for name in self.settings.sasl_mechanisms
            if (mech := sasl.REGISTRY.get(name)) is not None
            and sasl.usable(mech, plaintext_ok=plaintext_ok, nonce=nonce, certificate=certificate)
        ]

    def _auth(self, mechanism: str | None, initial: bytes | None) -> Event | None:
        usable = self._mechanisms()
        if mechanism is None:
            # Not in RFC 5034, but what RFC 1734-era clients (Outlook) send, as Dovecot does.
            self._emit(multiline(ok(), [m.encode() for m in usable]))
            return None
        if mechanism not in usable:
            known = sasl.REGISTRY.get(mechanism)
            if known is not None and known.plaintext and mechanism in self.settings.sasl_mechanisms:
                # The response is not read.
                return self._refuse_plaintext("AUTH " + mechanism, mechanism)
            self._refuse("unsupported authentication mechanism")
            return AuthRefused("an unknown SASL mechanism", "unknown-mech", mechanism[:20])
        data = None
        if initial is not None:
            data = sasl.decode_response(initial)
            if data is None:
                self._refuse("invalid base64 in initial response")
                return AuthRefused("invalid base64 in a SASL response", "malformed", mechanism)
        self._sasl = mech = self._new_mechanism(mechanism)
        return self._sasl_step(mech.start(data))

    def _new_mechanism(self, name: str) -> sasl.Mechanism:
        # The first exchange uses the driver's nonce as given (so the RFC examples run
        # through the core byte for byte); later ones on the connection append a counter.
        self._sasl_count += 1
        unique = self.settings.sasl_nonce
        if self._sasl_count > 1:
            unique += f".{self._sasl_count}"
        setting = sasl.Setting(unique, self.settings.hostname, self._client_identity)
        return sasl.REGISTRY[name].create(setting)

    def _sasl_line(self, line: bytes) -> Event | None:
        """One client line inside an exchange: ``*``, or a base64 response."""
        assert self._sasl is not None
        self._refused = False
        mechanism = self._sasl.name
        event: Event | None
        if line == b"*":
            self._sasl = None
            self._refuse("authentication cancelled")
            event = AuthRefused("a cancelled SASL exchange", "cancelled", mechanism)
        elif (data := sasl.decode_response(line)) is None:
            self._sasl = None
            self._refuse("invalid base64 in SASL response")
            event = AuthRefused("invalid base64 in a SASL response", "malformed", mechanism)
        else:
            event = self._sasl_step(self._sasl.step(data))
        self._count_errors()
        return event

    def _sasl_step(self, step: sasl.Step) -> Event | None:
        """Perform what the mechanism asked for; the exchange ends unless it is waiting."""
        mech = self._sasl
        assert mech is not None
        match step:
            case sasl.Challenge(data):
                self._emit(sasl.encode_challenge(data))
                return None
            case sasl.NeedSecret(username, scheme):
                return SaslSecret(username, scheme)
        self._sasl = None
        match step:
            case sasl.CheckPassword(username, password):
                return PasswordAuthenticate(username, password, mech.name)
            case sasl.Outcome(username, success, reason):
                return SaslOutcome(username, mech.name, success, reason)
            case sasl.Failed(reason):
                self._refuse(reason)
                return AuthRefused(reason, "malformed", mech.name)
        return None

    def _stls(self) -> Event | None:
        if self.tls_active:
            self._refuse("TLS is already active")
            return None
        if not self.settings.tls_available:
            self._refuse("STLS is not available")
            return None
        self._emit(ok("Begin TLS negotiation now"))
        # Whatever followed the STLS line arrived in the clear and must not be answered
        # inside TLS (CVE-2021-38371 class, "STARTTLS injection").
        self._lines.clear()
        return StartTls()

    def _capabilities(self) -> list[bytes]:
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        # RFC 2449 §5: capabilities of the AUTHORIZATION state "MUST be announced in both
        # states": USER and SASL are listed after login too (STLS and UTF8 USER, which
        # can only be used before it, are not).
        if self._plaintext_ok():
            caps.append(b"USER")
        if mechanisms := self._mechanisms():
            caps.append(b"SASL " + " ".join(mechanisms).encode())
        if self.state is _AUTHORIZATION:
            if self.settings.tls_available and not self.tls_active:
                caps.append(b"STLS")
            caps.append(b"UTF8 USER")
        caps.append(b"EXPIRE NEVER")
        if self.settings.login_delay > 0:
            caps.append(b"LOGIN-DELAY %d" % self.settings.login_delay)
        caps.append(b"IMPLEMENTATION " + self.settings.implementation.encode())
        return caps


#: Each state's commands (its row of :data:`states.COMMANDS`) and their handlers.
_HANDLERS: dict[State, dict[type, Callable[[Pop3Connection, Any], Event | None]]] = {
    state: {
        kind: getattr(Pop3Connection, "_on_" + kind.__name__.lower()) for kind in kinds
    }
    for state, kinds in COMMANDS.items()
}
