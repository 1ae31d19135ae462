"""The test server's wire: session transcripts, and the faults that rewrite replies.

Installed only by the test server (``ServerContext.wire``): each session's transport is
wrapped in a :class:`WireTap`, which

* sees what the client sends (it puts itself between the socket and the session) and
  records it with secrets masked: ``PASS ****``, ``APOP user ****``, ``AUTH PLAIN ****``
  and every SASL response line;
* follows the replies the core writes, command by command (status line, then a
  multi-line body up to its terminator), records them (a message body up to
  :data:`BODY_RECORD_LIMIT` octets), and rewrites them as the faults in force say:
  latency, a cut after N octets of a RETR, wrong LIST sizes, duplicated or changing
  UIDLs, garbage or overlong first lines, hidden or added capabilities.

The core and the session are untouched: they write the bytes they always write, to a
transport that happens to edit them.  After STLS the tap steps aside for the TLS layer
(it sees only ciphertext there) and a new tap wraps the TLS transport; the transcript of
the session goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pop3d.testing.faults import REFUSABLE, Fault, FaultTable

if TYPE_CHECKING:
    from pop3d.server.connection import Pop3Protocol

#: Octets of a RETR/TOP body kept in a transcript (the rest is counted).
BODY_RECORD_LIMIT = 16 * 1024

#: Sessions a transcript keeps (the oldest are dropped).
MAX_SESSIONS = 1000

#: Commands whose successful reply is multi-line: always, or only without an argument.
_MULTI_ALWAYS = frozenset({"CAPA", "RETR", "TOP"})
_MULTI_WITHOUT_ARG = frozenset({"LIST", "UIDL", "AUTH"})
#: Multi-line replies rewritten whole (small): kept until their terminator.
_BUFFERED = frozenset({"CAPA", "LIST", "UIDL", "AUTH"})

_TERMINATOR = b"\r\n.\r\n"
_MASK = "****"


@dataclass
class Line:
    """One line of a transcript."""

    #: Seconds since the epoch.
    at: float
    #: ``C`` client, ``S`` server, ``*`` a note of the test server (TLS, a fault acted...).
    who: str
    text: str

    def to_json(self) -> dict[str, Any]:
        """The line as the HTTP API shows it."""
        return {"at": self.at, "who": self.who, "text": self.text}


@dataclass
class Session:
    """The transcript of one POP3 session."""

    id: int
    peer: str
    started: float
    tls: bool = False
    user: str | None = None
    ended: float | None = None
    lines: list[Line] = field(default_factory=list)

    def add(self, who: str, text: str) -> None:
        """Append a line."""
        self.lines.append(Line(time.time(), who, text))

    def text(self) -> str:
        """The session as ``C: ...`` / ``S: ...`` lines."""
        return "".join(f"{line.who}: {line.text}\n" for line in list(self.lines))

    def to_json(self, *, lines: bool = True) -> dict[str, Any]:
        """The session as the HTTP API shows it."""
        out: dict[str, Any] = {
            "id": self.id, "peer": self.peer, "user": self.user, "tls": self.tls,
            "started": self.started, "ended": self.ended, "line_count": len(self.lines),
        }
        if lines:
            out["lines"] = [line.to_json() for line in list(self.lines)]
        return out


class Transcript:
    """Every session the test server served, oldest first (bounded); thread-safe to read.

    ``str(transcript)`` is all of them as text; ``transcript.lines()`` the ``C:``/``S:``
    lines of all sessions; ``transcript.sessions`` the :class:`Session` records.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: deque[Session] = deque(maxlen=MAX_SESSIONS)
        self._ids = itertools.count(1)

    def new(self, peer: str) -> Session:
        """Start the transcript of a new session."""
        with self._lock:
            session = Session(next(self._ids), peer, time.time())
            self._sessions.append(session)
        return session

    @property
    def sessions(self) -> list[Session]:
        """The sessions kept, oldest first."""
        with self._lock:
            return list(self._sessions)

    def get(self, ident: int) -> Session | None:
        """The session with id ``ident``, if kept."""
        return next((s for s in self.sessions if s.id == ident), None)

    def lines(self, who: str | None = None) -> list[str]:
        """Every session's lines as ``"C: USER alice"`` strings (only ``who``'s, if given)."""
        return [
            f"{line.who}: {line.text}"
            for session in self.sessions
            for line in list(session.lines)
            if who is None or line.who == who
        ]

    def clear(self) -> None:
        """Forget every session."""
        with self._lock:
            self._sessions.clear()

    def __iter__(self) -> Iterator[Session]:
        return iter(self.sessions)

    def __len__(self) -> int:
        return len(self._sessions)

    def __str__(self) -> str:
        return "".join(
            f"--- session {s.id} from {s.peer} user={s.user or '-'}\n{s.text()}"
            for s in self.sessions
        )


def mask(line: str, in_sasl: bool) -> str:
    """A client line as the transcript shows it: no password, no SASL response."""
    if in_sasl:
        return line if line.strip() == "*" else _MASK
    words = line.split(" ")
    verb = words[0].upper()
    if verb == "PASS" and len(words) > 1:
        return "PASS " + _MASK
    if verb == "APOP" and len(words) > 2:
        return f"APOP {words[1]} {_MASK}"
    if verb == "AUTH" and len(words) > 2:
        return f"AUTH {words[1]} {_MASK}"
    return line


def _decode(data: bytes) -> str:
    return data.rstrip(b"\r\n").decode("utf-8", "backslashreplace")


def _plain_user(initial: str) -> str | None:
    """The authentication identity of a SASL PLAIN initial response (for per-user faults)."""
    try:
        parts = base64.b64decode(initial, validate=True).split(b"\x00")
    except (binascii.Error, ValueError):
        return None
    return parts[1].decode("utf-8", "replace") if len(parts) == 3 else None


@dataclass
class _Command:
    name: str
    arg: str

    @property
    def multiline(self) -> bool:
        return self.name in _MULTI_ALWAYS or (self.name in _MULTI_WITHOUT_ARG and not self.arg)


class Recorder:
    """What every tap of one test server shares: the faults, the transcript, the sessions."""

    def __init__(self, faults: FaultTable, transcript: Transcript) -> None:
        self.faults = faults
        self.transcript = transcript
        #: Sessions in progress by their protocol object's id (kept across STLS).
        self._live: dict[int, Session] = {}
        #: Numbers each session's UIDL rewriting (``uidl_change``).
        self.generations = itertools.count(1)
        #: Taps whose connection is not closed yet (a closing one may hold delayed output).
        self.taps: set[WireTap] = set()

    def tap(self, session: Pop3Protocol, transport: asyncio.Transport) -> WireTap:
        """Wrap a session's transport (new connection, or after STLS)."""
        record = self._live.get(id(session))
        resumed = record is not None
        if record is None:
            peer = transport.get_extra_info("peername")
            name = f"{peer[0]}:{peer[1]}" if peer else "?"
            record = self._live[id(session)] = self.transcript.new(name)
        if transport.get_extra_info("sslcontext") is not None:
            record.tls = True
            if resumed:
                record.add("*", "TLS established")
                early = session.core.buffered if session.core is not None else 0
                if early:
                    # GnuTLS clients (mpop) send CAPA in the flight that ends the
                    # handshake: it reached the session before this tap; its reply is
                    # recorded, line by line, without the command.
                    record.add("*", f"{early} octets came with the TLS handshake "
                                    "(answered; not shown)")
        tap = WireTap(self, session, transport, record, greeting=not resumed)
        self.taps.add(tap)
        return tap

    def abort_all(self) -> None:
        """The server stops: drop every connection still open (delayed output too)."""
        for tap in list(self.taps):
            tap.abort()

    def ended(self, session: Pop3Protocol) -> None:
        """The session's connection is gone."""
        record = self._live.pop(id(session), None)
        if record is not None and record.ended is None:
            record.ended = time.time()
            record.add("*", "connection closed")


class _Input(asyncio.Protocol):
    """Between the socket and the session: what the client sends goes through the tap."""

    def __init__(self, tap: WireTap, session: Pop3Protocol) -> None:
        self.tap = tap
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.tap.client_data(data)
        self.session.data_received(data)

    def eof_received(self) -> bool | None:
        return self.session.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tap.lost()
        self.session.connection_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()


class WireTap(asyncio.Transport):
    """A session's transport that records, and rewrites replies as the faults say."""

    def __init__(
        self,
        recorder: Recorder,
        session: Pop3Protocol,
        inner: asyncio.Transport,
        record: Session,
        *,
        greeting: bool,
    ) -> None:
        super().__init__()
        self.recorder = recorder
        self.faults = recorder.faults
        self.session = session
        self.inner = inner
        self.record = record
        self.loop = session.loop
        self._input = _Input(self, session)
        inner.set_protocol(self._input)
        #: Out of the way (the TLS layer owns the socket): everything passes unchanged.
        self._passthrough = False
        self._in_line = b""
        self._in_sasl = False
        self._user_hint: str | None = None
        self._pending: deque[_Command] = deque()
        if greeting:
            self._pending.append(_Command("GREETING", ""))
        # The reply being written.
        self._reply: _Command | None = None
        self._mode = "status"  # status | buffered | stream | drop
        self._status = b""
        self._body = bytearray()
        self._tail = b""
        self._body_seen = 0
        self._generation = 0
        # Output held back (latency) and the cut.
        self._queue: list[bytes] = []
        self._hold_until = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._close_after_queue = False
        self._cut_left: int | None = None
        self._dead = False

    # ------------------------------------------------------------------ who

    def user(self) -> str | None:
        """The session's user: logged in, or the name it gave so far."""
        return self.session.username or self._user_hint

    def _take(self, kind: str, command: str | None = None) -> Fault | None:
        def match(fault: Fault) -> bool:
            wanted = fault.params.get("command")
            return wanted is None or wanted == command

        return self.faults.take(kind, self.user(), match if command is not None else None)

    def _hidden(self) -> set[str]:
        return {h for f in self.faults if f.kind == "capa" for h in f.params["hide"]}

    # ------------------------------------------------------------------ input

    def client_data(self, data: bytes) -> None:
        """Record the client's complete lines and queue its commands."""
        buffered = self._in_line + data
        *lines, self._in_line = buffered.split(b"\n")
        if len(self._in_line) > 8192:  # a line with no end: recorded in part, as sent
            lines.append(self._in_line)
            self._in_line = b""
        for raw in lines:
            text = _decode(raw)
            self.record.add("C", mask(text, self._in_sasl))
            if self._in_sasl:
                continue
            verb, _, arg = text.partition(" ")
            command = _Command(verb.upper(), arg.strip())
            self._pending.append(command)
            if command.name in ("USER", "APOP") and command.arg:
                self._user_hint = command.arg.split(" ", 1)[0]
            elif command.name == "AUTH" and command.arg:
                mech, _, initial = command.arg.partition(" ")
                mech = mech.upper()
                # PLAIN and EXTERNAL with an initial response are one step: no SASL
                # lines follow, and a pipelined command after them is a command.
                self._in_sasl = not (initial and mech in ("PLAIN", "EXTERNAL"))
                if mech == "PLAIN" and initial:
                    self._user_hint = _plain_user(initial) or self._user_hint

    def lost(self) -> None:
        """The connection is gone."""
        self.recorder.taps.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.recorder.ended(self.session)

    # ------------------------------------------------------------------ output

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Follow the replies in ``data`` and send them, rewritten as the faults say."""
        if self._passthrough:
            self.inner.write(data)
            return
        self._follow(bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """As :meth:`write`, for each piece."""
        for data in list_of_data:
            self.write(data)

    def _follow(self, data: bytes) -> None:
        while data:
            if self._mode == "status":
                end = data.find(b"\n")
                if end < 0:
                    self._status += data
                    return
                line, data = self._status + data[: end + 1], data[end + 1 :]
                self._status = b""
                self._start_reply(line)
            elif self._mode in ("buffered", "drop"):
                self._body += data
                data = b""
                end = (b"\r\n" + bytes(self._body)).find(_TERMINATOR)
                if end >= 0:
                    cut = end + 3  # offset in _body just past ".\r\n"
                    body, data = bytes(self._body[:cut]), bytes(self._body[cut:])
                    self._body.clear()
                    self._end_buffered(body)
            else:  # stream
                window = self._tail + data
                end = window.find(_TERMINATOR)
                if end < 0:
                    self._stream(data)
                    self._tail = window[-4:]
                    return
                cut = end + 5 - len(self._tail)
                self._stream(data[:cut])
                data = data[cut:]
                self._end_stream()

    def _start_reply(self, line: bytes) -> None:
        """A reply's first line: which command it answers, what the faults do to it."""
        continuation = line.startswith(b"+ ") or line in (b"+\r\n", b"+\n")
        if continuation:
            command = self._pending[0] if self._pending else _Command("?", "")
        else:
            command = self._pending.popleft() if self._pending else _Command("?", "")
        self._reply = command
        if self.session.username and self.record.user is None:
            self.record.user = self.session.username
        ok = line.startswith(b"+OK")
        name = command.name
        if name == "AUTH" and not continuation:
            self._in_sasl = False
        if name == "GREETING" and ok:
            self._generation = next(self.recorder.generations)
        latency = self._take("latency", name)
        if latency is not None:
            self._hold(latency.params["seconds"])
            self.record.add("*", f"fault {latency.id}: reply delayed {latency.params['seconds']} s")
        multiline = ok and command.multiline
        hidden = self._hidden()
        if ok and (name in REFUSABLE or name == "CAPA") and name in hidden:
            line = b"-ERR unknown command\r\n"
            self.record.add("*", f"{name} hidden by a capa fault")
            self._mode = "drop" if multiline else "status"
            self._send_status(line)
            return
        if ok and not multiline and name in ("LIST", "UIDL") and command.arg:
            line = self._rewrite_listing(name, [line.rstrip(b"\r\n")], single=True)[0]
            line += b"\r\n"
        garbage = self._take("garbage", name)
        if garbage is not None:
            line = garbage.params["text"].encode("utf-8", "surrogateescape") + b"\r\n"
            self.record.add("*", f"fault {garbage.id}: garbage instead of the first line")
        overlong = self._take("overlong", name)
        if overlong is not None:
            text = line.rstrip(b"\r\n") + b" "
            line = text + b"x" * max(0, overlong.params["length"] - len(text) - 2) + b"\r\n"
            self.record.add("*", f"fault {overlong.id}: first line made {len(line)} octets")
        if ok and name in ("RETR", "TOP"):  # fetchmail reads messages with TOP n 99999999
            cut = self._take("cut_retr")
            if cut is not None:
                self._cut_left = cut.params["after"]
                self.record.add("*", f"fault {cut.id}: cut after {self._cut_left} octets")
        if multiline:
            self._mode = "buffered" if name in _BUFFERED else "stream"
            self._tail = b"\r\n"
            self._body_seen = 0
        else:
            self._cut_left = None
        self._send_status(line)

    def _send_status(self, line: bytes) -> None:
        self.record.add("S", _decode(line))
        self._emit(line)

    def _end_buffered(self, body: bytes) -> None:
        """A whole multi-line body (CAPA, LIST, UIDL, AUTH): rewrite, record, send."""
        mode, self._mode = self._mode, "status"
        if mode == "drop":
            return
        lines = body.split(b"\r\n")[:-2]  # the last two: the "." and what follows its CRLF
        command = self._reply
        name = command.name if command is not None else "?"
        if name == "CAPA":
            lines = self._rewrite_capa(lines)
        elif name in ("LIST", "UIDL"):
            lines = self._rewrite_listing(name, lines, single=False)
        for line in lines:
            self.record.add("S", _decode(line))
        self.record.add("S", ".")
        self._emit(b"".join(line + b"\r\n" for line in lines) + b".\r\n")

    def _stream(self, data: bytes) -> None:
        """Part of a RETR/TOP body: record its beginning, send it (up to a cut)."""
        seen = self._body_seen
        sent = data if self._cut_left is None else data[: self._cut_left]
        if seen < BODY_RECORD_LIMIT and not self._dead:
            self._body += sent[: BODY_RECORD_LIMIT - seen]
        self._body_seen = seen + len(data)
        self._emit(data)

    def _end_stream(self) -> None:
        self._mode = "status"
        self._cut_left = None
        body = bytes(self._body)
        self._body.clear()
        kept = body.split(b"\r\n")
        complete = self._body_seen <= BODY_RECORD_LIMIT
        if kept and not kept[-1]:
            kept = kept[:-1]  # what follows the last CRLF
        for line in kept:
            self.record.add("S", _decode(line))
        if not complete:
            self.record.add("*", f"({self._body_seen} octets of body, the first "
                                 f"{BODY_RECORD_LIMIT} recorded)")

    # ------------------------------------------------------------------ rewriting

    def _rewrite_capa(self, lines: list[bytes]) -> list[bytes]:
        hidden = self._hidden()
        added = [a for f in self.faults if f.kind == "capa" for a in f.params["add"]]
        if not hidden and not added:
            return lines
        out = [ln for ln in lines if ln.split(b" ", 1)[0].decode("ascii", "replace")
               not in hidden]
        for extra in added:
            raw = extra.encode("utf-8")
            sasl = next((i for i, ln in enumerate(out) if ln.startswith(b"SASL ")), None)
            if raw.upper().startswith(b"SASL ") and sasl is not None:
                out[sasl] += raw[4:]
            else:
                out.append(raw)
        return out

    def _rewrite_listing(self, name: str, lines: list[bytes], *, single: bool) -> list[bytes]:
        """LIST sizes off by ``delta``; UIDLs duplicated or changed."""
        if name == "LIST":
            fault = self._take("list_size")
            if fault is None:
                return lines
            self.record.add("*", f"fault {fault.id}: LIST sizes off by {fault.params['delta']}")
            return [_shift_size(ln, fault.params["delta"], single) for ln in lines]
        out = lines
        if self._take("uidl_change") is not None:
            out = [_suffix_uid(ln, self._generation, single) for ln in out]
            self.record.add("*", "UIDLs changed for this session (uidl_change)")
        if not single and self._take("uidl_duplicate") is not None:
            self.record.add("*", "UIDLs duplicated (uidl_duplicate)")
            out = [
                _copy_uid(ln, out[i - 1]) if i % 2 == 1 else ln for i, ln in enumerate(out)
            ]
        return out

    # ------------------------------------------------------------------ sending

    def _hold(self, seconds: float) -> None:
        self._hold_until = max(self._hold_until, self.loop.time() + seconds)

    def _emit(self, data: bytes) -> None:
        if self._dead or not data:
            return
        cut_now = False
        if self._cut_left is not None:
            if len(data) >= self._cut_left:
                data, cut_now = data[: self._cut_left], True
            else:
                self._cut_left -= len(data)
        if self._queue or self.loop.time() < self._hold_until:
            self._queue.append(data)
            if self._timer is None:
                self._timer = self.loop.call_at(self._hold_until, self._release)
        else:
            self.inner.write(data)
        if cut_now:
            self._dead = True
            self.record.add("*", "connection cut (cut_retr)")
            self._cut(self.loop.time() + 5.0)

    def _cut(self, deadline: float) -> None:
        """Drop the connection once the octets before the cut have left (TLS too)."""
        if self._queue or (
            self.inner.get_write_buffer_size() and self.loop.time() < deadline
        ):
            self.loop.call_later(0.005, self._cut, deadline)
            return
        self.inner.abort()

    def _release(self) -> None:
        self._timer = None
        if self.loop.time() < self._hold_until:
            self._timer = self.loop.call_at(self._hold_until, self._release)
            return
        queue, self._queue = self._queue, []
        if queue and not self.inner.is_closing():
            self.inner.writelines(queue)
        if self._close_after_queue:
            self.inner.close()

    # ------------------------------------------------------------------ the transport

    def close(self) -> None:
        """Close once what is held back has gone out."""
        if self._queue:
            self._close_after_queue = True
        else:
            self.inner.close()

    def abort(self) -> None:
        """Close at once."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self.inner.abort()

    def is_closing(self) -> bool:
        """Whether the connection is closing."""
        return self._close_after_queue or self.inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As the real transport."""
        return self.inner.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Another protocol takes the socket (the TLS layer, after STLS): step aside."""
        self.recorder.taps.discard(self)  # the TLS transport's tap takes over
        if self._queue:
            self.inner.writelines(self._queue)
            self._queue = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._passthrough = True
        self.inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The protocol that receives the data."""
        return self.session if not self._passthrough else self.inner.get_protocol()

    def pause_reading(self) -> None:
        """As the real transport."""
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        """As the real transport."""
        self.inner.resume_reading()

    def is_reading(self) -> bool:
        """As the real transport."""
        return self.inner.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """As the real transport."""
        self.inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        """The real transport's buffer, and what is held back."""
        return self.inner.get_write_buffer_size() + sum(len(d) for d in self._queue)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """As the real transport."""
        return self.inner.get_write_buffer_limits()

    def _force_close(self, exc: BaseException | None) -> None:
        """What asyncio's TLS layer calls on its transport after a failed handshake."""
        force = getattr(self.inner, "_force_close", None)
        if force is not None:
            force(exc)
        else:
            self.inner.abort()

    def can_write_eof(self) -> bool:
        """As the real transport."""
        return self.inner.can_write_eof()

    def write_eof(self) -> None:
        """As the real transport."""
        self.inner.write_eof()


def _shift_size(line: bytes, delta: int, single: bool) -> bytes:
    words = line.split(b" ")
    index = 2 if single else 1  # "+OK n size" or "n size"
    if len(words) > index and words[index].isdigit():
        words[index] = b"%d" % max(0, int(words[index]) + delta)
    return b" ".join(words)


def _suffix_uid(line: bytes, generation: int, single: bool) -> bytes:
    words = line.split(b" ")
    index = 2 if single else 1
    if len(words) > index:
        words[index] = words[index][:60] + b"-%d" % generation
    return b" ".join(words)


def _copy_uid(line: bytes, previous: bytes) -> bytes:
    words, before = line.split(b" "), previous.split(b" ")
    if len(words) > 1 and len(before) > 1:
        words[1] = before[1]
    return b" ".join(words)
