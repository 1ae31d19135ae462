"""The LMTP listener (RFC 2033): Postfix/Exim hand mail to pop3d's maildrops over it.

Built on aiosmtpd's :class:`aiosmtpd.lmtp.LMTP` (greeting, LHLO, MAIL, RCPT, RSET,
NOOP, QUIT, the 30-bit-clean command parser), with DATA replaced.

Rules of this file:

* **One reply per accepted recipient after DATA** (RFC 2033 §4.2), in RCPT order, each
  sent as soon as that delivery is done.  aiosmtpd's own DATA sends one reply for the
  whole transaction (aiosmtpd issue #517), which an LMTP client reads as the answer for
  the first recipient only and then waits for the rest: our DATA never does that.
* **RCPT** ``local@domain`` is the passwd-file user of that exact name if there is one,
  else the user ``local`` (:func:`~pop3d.auth.base.find_user`); a bare ``local`` is the
  user ``local``.  Unknown: ``550 5.1.1``.  A failing user lookup: ``451 4.3.0`` (the
  client retries).  More than :data:`MAX_RECIPIENTS` in one transaction: ``452 4.5.3``.
* **DATA streams**: the message goes, dot-unstuffed, into an unlinked spool file, in
  buffered writes, never into memory whole.  Lines of any length are accepted (the
  mailbox is not an SMTP relay; Dovecot's LMTP accepts them too).
* **Size**: past ``[lmtp] max_message_size`` the rest is read and dropped, and every
  recipient gets ``552 5.3.4``.  ``SIZE`` is advertised and ``MAIL ... SIZE=`` over it is
  refused at once.
* **Per-recipient results**: stored ``250 2.0.0``; over quota ``552 5.2.2``; permanent
  storage error ``554 5.3.0``; anything else (disk full, lock timeout, a bug)
  ``451 4.3.0`` -- a failure of ours is retried, never bounced.  If the spool itself
  cannot be written, every recipient gets ``451 4.3.0``.
* **Headers added** per recipient, as Dovecot's LMTP does: ``Return-Path: <sender>``
  then ``Delivered-To: rcpt``, in front of the message as received.
* **Replies never carry exception text**; failures are logged with the recipient.  An
  exception that escapes a command anyway is logged once and answered with a fixed
  ``451 4.3.0`` (:meth:`LmtpServerProtocol.handle_exception`; aiosmtpd's own answer
  would be ``500 Error: (Type) text``).
* **Every reply line is printable ASCII**: any other octet (a control octet of an echoed
  address or command, a non-UTF-8 or non-ASCII octet) goes out as ``?``, and an unknown
  command or a VRFY argument is not echoed at all (:func:`wire_reply`).
* **Every reply carries an enhanced status code** (RFC 2034 §3; the greeting and LHLO's
  reply aside): aiosmtpd's own replies, which have none, get the RFC 3463 code of their
  reply code (``501 5.5.4`` for a syntax error...).
* **Addresses**: a ``MAIL``/``RCPT`` address that is not valid UTF-8 is refused
  (``553 5.1.7`` / ``553 5.1.3``); one the stdlib address parser cannot read (it raises
  on ``MAIL FROM:<``, bpo-27931) is a syntax error, ``501 5.5.4``.
* ``LHLO`` advertises ``PIPELINING`` and ``ENHANCEDSTATUSCODES``, which RFC 2033 §5
  requires of every LMTP server; aiosmtpd reads pipelined commands in order.
* **Connection caps** (``[lmtp] max_connections``, ``max_connections_per_ip``) are
  counted at accept, before the greeting: a connection over a cap gets ``421 4.3.2`` and
  is closed at once (the MTA retries later).  UNIX-socket peers count only in the total.
  As POP3's, the counts are per worker process.
* **One copy per user**: ``RCPT`` of a user already in the transaction (again, or by
  another address that names the same user) is accepted, and after DATA answered with
  the reply of that user's one delivery; the message is stored once.
* Every recipient answered, at RCPT (refused) or after DATA, is counted by
  :func:`pop3d.metrics.lmtp_delivery`: ``ok``, ``unknown_user``, ``over_quota``,
  ``tempfail`` (we are to blame; the MTA retries) or ``failed`` (a permanent refusal:
  message too big, permanent storage error).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, AnyStr

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import syntax

from pop3d import metrics
from pop3d.auth.base import Authenticator, find_user
from pop3d.config import Config, parse_address
from pop3d.errors import NoHome, PermanentBackendError, QuotaExceeded
from pop3d.protocol import limits
from pop3d.protocol.values import Principal
from pop3d.storage.base import Deliverer

__all__ = [
    "MAX_RECIPIENTS",
    "Admission",
    "LmtpHandler",
    "LmtpServerProtocol",
    "bind_lmtp",
    "start_lmtp",
    "wire_reply",
]

log = logging.getLogger("pop3d.lmtp")

#: Recipients accepted in one transaction (RFC 5321 §4.5.3.1.8 asks for at least 100;
#: Postfix sends at most lmtp_destination_recipient_limit = 50 by default).
MAX_RECIPIENTS = 1000

#: Seconds an LMTP client may stay silent before the connection is closed (RFC 5321
#: §4.5.3.2.7 suggests 5 minutes for the server).
LMTP_TIMEOUT = 300.0

#: Listen backlog of the LMTP sockets (an MTA opens few, long-lived connections).
_BACKLOG = 128

#: Spool writes are batched into pieces of this size.
_SPOOL_BUFFER = limits.READ_CHUNK


class LmtpHandler:
    """aiosmtpd handler hooks: recipient lookup and LHLO extensions.

    Args:
        authenticator: where recipients are looked up (``lookup``).
        deliverer: where messages are stored.

    """

    def __init__(self, authenticator: Authenticator, deliverer: Deliverer) -> None:
        self.authenticator = authenticator
        self.deliverer = deliverer

    async def handle_EHLO(  # noqa: N802 (aiosmtpd's hook name)
        self, _server: Any, session: Any, _envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        """Add PIPELINING and ENHANCEDSTATUSCODES to the LHLO reply (RFC 2033 §5)."""
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(  # noqa: N802
        self, _server: Any, _session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        """Accept the sender (``<>`` included); ``553 5.1.7`` if it is not valid UTF-8."""
        if not _is_utf8(address):
            log.info("MAIL: a sender address that is not valid UTF-8 refused")
            return "553 5.1.7 Sender address is not valid UTF-8"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.principals = []
        return "250 2.1.0 Ok"

    async def handle_RCPT(  # noqa: N802
        self, _server: Any, _session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        """Look the recipient up: ``550 5.1.1`` if unknown, ``451 4.3.0`` if lookup fails.

        An address that is not valid UTF-8 names nobody: ``553 5.1.3``.
        """
        principals: list[Principal] = getattr(envelope, "principals", [])
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            metrics.lmtp_delivery("tempfail")
            return "452 4.5.3 Too many recipients"
        if not _is_utf8(address):
            log.info("RCPT: a recipient address that is not valid UTF-8 refused")
            metrics.lmtp_delivery("unknown_user")
            return "553 5.1.3 Recipient address is not valid UTF-8"
        try:
            principal = await self.find_user(address)
        except Exception:
            log.exception("user lookup failed for <%s>", _printable(address))
            metrics.lmtp_delivery("tempfail")
            return f"451 4.3.0 <{address}> Temporary user lookup failure"
        if principal is None:
            metrics.lmtp_delivery("unknown_user")
            return f"550 5.1.1 <{address}> User doesn't exist"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        principals.append(principal)
        envelope.principals = principals
        return "250 2.1.5 Ok"

    async def find_user(self, address: str) -> Principal | None:
        """The user ``local@domain`` if it exists, else ``local``; ``None`` if neither."""
        return await find_user(self.authenticator, address)


class Admission:
    """The connections a listener holds, in total and per client address (one process)."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.open = 0
        self.per_address: dict[str, int] = {}

    def admit(self, address: str) -> str | None:
        """Count a new connection; return the cap it is over (and do not count it)."""
        if self.open >= self.total:
            return "total"
        if address and self.per_address.get(address, 0) >= self.per_ip:
            return "per_ip"
        self.open += 1
        if address:
            self.per_address[address] = self.per_address.get(address, 0) + 1
        return None

    def release(self, address: str) -> None:
        """Forget a connection :meth:`admit` counted."""
        self.open -= 1
        if address:
            left = self.per_address[address] - 1
            if left:
                self.per_address[address] = left
            else:
                del self.per_address[address]


def _peer_address(transport: asyncio.BaseTransport) -> str:
    """The client's IP address; ``""`` for a UNIX-socket peer."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class LmtpServerProtocol(LMTP):
    """aiosmtpd's LMTP with a streaming DATA that replies once per recipient."""

    event_handler: LmtpHandler
    #: The caps this connection is counted against (``None``: none).
    admission: Admission | None = None
    #: The address it was counted under; ``None`` until admitted (or when refused).
    _admitted_as: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection at accept; over a cap, answer ``421`` and close."""
        if self.admission is not None:
            address = _peer_address(transport)
            cap = self.admission.admit(address)
            if cap is not None:
                metrics.connection_refused(cap)
                log.warning("LMTP connection from %s refused: %s cap", address or "unix", cap)
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(b"421 4.3.2 Too many connections, try again later\r\n")
                transport.close()
                return
            self._admitted_as = address
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """Release the connection's count (a refused one never had aiosmtpd's state)."""
        if self.admission is not None:
            if self._admitted_as is None:
                return
            self.admission.release(self._admitted_as)
            self._admitted_as = None
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        """Bytes from a refused connection are dropped."""
        if self.admission is None or self._admitted_as is not None:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        """EOF of a refused connection: let it close."""
        if self.admission is not None and self._admitted_as is None:
            return False
        return super().eof_received()

    #: Whether the reply being sent answers LHLO (its 250 lines carry no enhanced codes).
    _in_lhlo = False

    async def push(self, status: AnyStr) -> None:
        """Send one reply line as :func:`wire_reply` makes it (every reply passes here)."""
        assert self.session is not None
        line = wire_reply(status, enhanced=False)
        greeting = not self.session.host_name and line.startswith(b"220")
        lhlo = self._in_lhlo and line.startswith(b"250")
        await super().push(line if greeting or lhlo else wire_reply(line))

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str) -> None:  # noqa: N802 (aiosmtpd's verb method)
        """LHLO, its 250 reply marked as such (no enhanced status codes: RFC 2034 §3)."""
        self._in_lhlo = True
        try:
            await super().smtp_LHLO(arg)
        finally:
            self._in_lhlo = False

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:  # noqa: N802
        """VRFY verifies nothing (RFC 5321 §3.5.3 allows 252) and echoes nothing."""
        if await self.check_auth_needed("VRFY"):
            return
        if arg:
            await self.push("252 2.5.2 Cannot VRFY user, but will accept message "
                            "and attempt delivery")  # fmt: skip
        else:
            await self.push("501 5.5.4 Syntax: VRFY <address>")

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Parse an address as aiosmtpd does; a parser exception is a syntax error.

        (The stdlib's parser raises ``IndexError`` on ``<`` alone, bpo-27931.)  An empty
        address makes aiosmtpd answer ``501``.
        """
        try:
            return super()._getaddr(arg)
        except Exception:
            log.info("an address the parser cannot read: a syntax error")
            return "", ""

    async def handle_exception(self, error: Exception) -> str:
        """An exception escaped a command: log it once, answer ``451 4.3.0``, no text of it.

        (aiosmtpd's default answers ``500 Error: (Type) text`` and logs it itself.)
        """
        peer = self.session.peer if self.session is not None else None
        log.error("LMTP session with %s: unexpected error", peer, exc_info=error)
        return "451 4.3.0 Internal error, try again later"

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802 (aiosmtpd's verb method)
        """Receive the message into a spool, then deliver and reply for each recipient."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        spool = _Spool(self.data_size_limit)
        try:
            if not await self._receive(spool):
                return  # the connection was lost during DATA
            await self._deliver_all(envelope, spool)
        finally:
            spool.close()
            self._set_post_data_state()  # type: ignore[no-untyped-call]

    async def _receive(self, spool: _Spool) -> bool:
        """Read DATA up to the lone dot into ``spool``; False if the client went away."""
        reader = self._reader
        at_line_start = True
        while self.transport is not None:
            try:
                line: bytes = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                # A long line: take what was examined (never half of a CRLF) and go on.
                line = await reader.read(exc.consumed)
            except asyncio.IncompleteReadError:
                return False
            if at_line_start:
                if line == b".\r\n":
                    spool.finish()
                    return True
                if line.startswith(b"."):
                    line = line[1:]
            at_line_start = line.endswith(b"\r\n")
            spool.write(line)
        return False

    async def _deliver_all(self, envelope: Any, spool: _Spool) -> None:
        principals: list[Principal] = getattr(envelope, "principals", [])
        sender = envelope.mail_from or ""
        if sender == "<>":
            sender = ""
        #: The outcome of each user's one delivery, for its repeated recipients.
        done: dict[str, _Result] = {}
        for rcpt, principal in zip(envelope.rcpt_tos, principals, strict=True):
            result = done.get(principal.username)
            if result is None:
                result = await self._deliver_one(rcpt, principal, sender, spool)
                done[principal.username] = result
            else:
                log.info("<%s>: same user as an earlier recipient, stored once", rcpt)
            metrics.lmtp_delivery(result.metric)
            await self.push(f"{result.code} <{rcpt}> {result.text}")

    async def _deliver_one(
        self, rcpt: str, principal: Principal, sender: str, spool: _Spool
    ) -> _Result:
        if spool.too_big:
            return _TOO_BIG
        if spool.failed:
            return _TEMPFAIL
        try:
            head = f"Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n".encode()
            await self.event_handler.deliverer.deliver(principal, spool.stream(head))
        except QuotaExceeded:
            log.info("<%s>: over quota", rcpt)
            return _OVER_QUOTA
        except NoHome as exc:
            # The user database's to fix (a home for a %h template): retried, not bounced.
            log.warning("<%s>: %s", rcpt, exc)
            return _TEMPFAIL
        except PermanentBackendError:
            log.exception("<%s>: permanent delivery failure", rcpt)
            return _FAILED
        except Exception:
            log.exception("<%s>: delivery failed", rcpt)
            return _TEMPFAIL
        log.info("<%s>: delivered %d octets", rcpt, spool.size + len(head))
        return _SAVED


#: Octets a reply line may carry: printable ASCII.
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
#: A reply with its RFC 3463 enhanced status code already.
_HAS_ENHANCED = re.compile(r"[245][0-9][0-9](?:[ -]|$)[245]\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")
#: A reply code that takes an enhanced status code (2xx, 4xx, 5xx: RFC 2034 §3).
_TAKES_ENHANCED = re.compile(r"[245][0-9][0-9](?:[ -]|$)")
#: The enhanced status code of aiosmtpd's own replies, by reply code (RFC 3463); others
#: get ``X.0.0``.
_ENHANCED = {
    "500": "5.5.2",  # unknown command, bad syntax, line too long
    "501": "5.5.4",  # syntax error in the arguments
    "502": "5.5.1",  # command not implemented (EXPN)
    "503": "5.5.1",  # bad sequence of commands
    "504": "5.5.4",
    "552": "5.3.4",  # message too big (MAIL ... SIZE=)
    "553": "5.1.3",  # malformed address
    "555": "5.5.4",  # unknown MAIL/RCPT parameters
}
#: aiosmtpd's reply to an unknown command, which echoes it.
_UNKNOWN_COMMAND = re.compile(r'500 Error: command ".*" not recognized')


def _printable(text: str) -> str:
    """``text`` with every character outside printable ASCII as ``?``."""
    return _UNPRINTABLE.sub("?", text)


def _is_utf8(address: str) -> bool:
    """Whether an address aiosmtpd decoded (UTF-8, surrogateescape) was valid UTF-8."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def wire_reply(status: str | bytes, *, enhanced: bool = True) -> bytes:
    """One reply line as it goes on the wire (without its CRLF).

    Every octet outside printable ASCII becomes ``?`` (control octets, CR and LF of an
    echoed client string included: no reply can be split or carry terminal escapes);
    aiosmtpd's echo of an unknown command is replaced by fixed text; with ``enhanced``
    a 2xx/4xx/5xx reply without an enhanced status code gets one (:data:`_ENHANCED`).
    """
    text = status.decode("latin-1") if isinstance(status, bytes) else status
    text = _printable(text)
    if _UNKNOWN_COMMAND.fullmatch(text):
        text = "500 Error: command not recognized"
    if enhanced and _TAKES_ENHANCED.match(text) and not _HAS_ENHANCED.match(text):
        code, rest = text[:3], text[4:]
        extended = _ENHANCED.get(code, f"{code[0]}.0.0")
        text = f"{code}{text[3:4] or ' '}{extended}" + (f" {rest}" if rest else "")
    return text.encode("ascii")


@dataclass(frozen=True, slots=True)
class _Result:
    """A recipient's reply after DATA (without the address) and its metrics label."""

    code: str
    text: str
    metric: str


_SAVED = _Result("250 2.0.0", "Saved", "ok")
_OVER_QUOTA = _Result("552 5.2.2", "Mailbox is full", "over_quota")
_TOO_BIG = _Result("552 5.3.4", "Message too big", "failed")
_FAILED = _Result("554 5.3.0", "Delivery failed", "failed")
_TEMPFAIL = _Result("451 4.3.0", "Temporary failure", "tempfail")


class _Spool:
    """An unlinked temporary file holding one message, written in batches."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.size = 0
        self.too_big = False
        self.failed = False
        self._buffer = bytearray()
        self._file: IO[bytes] | None = None
        try:
            self._file = tempfile.TemporaryFile(prefix="pop3d-lmtp.")  # noqa: SIM115
        except OSError:
            log.exception("cannot create the LMTP spool file")
            self.failed = True

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.limit and self.size > self.limit:
            self.too_big = True
        if self.too_big or self.failed:
            self._buffer.clear()
            return
        self._buffer += data
        if len(self._buffer) >= _SPOOL_BUFFER:
            self._flush()

    def finish(self) -> None:
        if not (self.too_big or self.failed):
            self._flush()

    def _flush(self) -> None:
        assert self._file is not None
        try:
            self._file.write(self._buffer)
            self._file.flush()
        except OSError:
            log.exception("cannot write the LMTP spool file")
            self.failed = True
        self._buffer.clear()

    async def stream(self, head: bytes) -> AsyncIterator[bytes]:
        """``head`` then the spooled message, in bounded chunks."""
        assert self._file is not None
        yield head
        fd = self._file.fileno()
        offset = 0
        while True:
            data = await asyncio.to_thread(os.pread, fd, limits.READ_CHUNK, offset)
            if not data:
                return
            offset += len(data)
            yield data

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def protocol_factory(
    config: Config, handler: LmtpHandler, loop: asyncio.AbstractEventLoop
) -> Callable[[], LmtpServerProtocol]:
    """Return a factory of LMTP protocol instances for ``loop.create_server``."""
    size_limit = config.lmtp.max_message_size or None
    admission = Admission(config.lmtp.max_connections, config.lmtp.max_connections_per_ip)

    def factory() -> LmtpServerProtocol:
        protocol = LmtpServerProtocol(
            handler,
            data_size_limit=size_limit,
            enable_SMTPUTF8=True,
            hostname=config.lmtp.hostname,
            ident="pop3d LMTP",
            timeout=LMTP_TIMEOUT,
            loop=loop,
        )
        protocol.admission = admission
        return protocol

    return factory


def bind_lmtp(config: Config) -> list[socket.socket]:
    """Bind and listen on every ``[lmtp] listen`` address, before workers fork.

    Pass the result to :func:`start_lmtp` in each worker (``sockets=``): the workers then
    share the listening sockets, as they share the POP3 ones.  A UNIX socket file gets
    mode 0666 (LMTP grants nothing but delivery, as Dovecot's socket); a stale one left by
    a dead server is replaced, anything else at that path is an error.

    Raises:
        OSError: an address cannot be bound (the sockets already bound are closed).

    """
    out: list[socket.socket] = []
    try:
        for address in config.lmtp.listen:
            if address.startswith("unix:"):
                out.append(_bind_unix(Path(address.removeprefix("unix:"))))
            else:
                out.append(_bind_tcp(address))
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


async def start_lmtp(
    config: Config,
    authenticator: Authenticator,
    deliverer: Deliverer,
    *,
    sockets: list[socket.socket] | None = None,
) -> list[asyncio.Server]:
    """Serve LMTP on every ``[lmtp] listen`` address; return the started servers.

    Args:
        config: the configuration (``[lmtp]``: addresses, size limit, host name).
        authenticator: where recipients are looked up.
        deliverer: the store messages go into.
        sockets: sockets from :func:`bind_lmtp`, bound before the workers forked.  Without
            them each call binds by itself: ``host:port`` with ``SO_REUSEPORT`` (so that
            several worker processes may each do so; the kernel spreads connections),
            ``unix:PATH`` via :func:`bind_lmtp`, except that a path another live process
            already listens on is skipped with a warning (a sibling worker got it first).

    ``host:port`` with port 0 picks a free port: read it from
    ``server.sockets[0].getsockname()``.  Stop with ``server.close()`` and ``await
    server.wait_closed()``; a UNIX socket file is left for the next start to replace.

    Raises:
        OSError: an address cannot be bound (the servers already started are closed).

    """
    loop = asyncio.get_running_loop()
    factory = protocol_factory(config, LmtpHandler(authenticator, deliverer), loop)
    servers: list[asyncio.Server] = []
    try:
        if sockets is not None:
            for sock in sockets:
                if sock.family == socket.AF_UNIX:
                    servers.append(await loop.create_unix_server(factory, sock=sock))
                else:
                    servers.append(await loop.create_server(factory, sock=sock))
            return servers
        for address in config.lmtp.listen:
            if address.startswith("unix:"):
                path = Path(address.removeprefix("unix:"))
                try:
                    sock = _bind_unix(path)
                except OSError as exc:
                    if isinstance(exc, FileExistsError) or not _remove_stale_socket(path):
                        raise
                    log.warning("LMTP: %s is already served by another process", path)
                    continue
                servers.append(await loop.create_unix_server(factory, sock=sock))
            else:
                where = parse_address(address, "[lmtp] listen")
                servers.append(
                    await loop.create_server(
                        factory, where.host, where.port, reuse_port=True, backlog=_BACKLOG
                    )
                )
            log.info("LMTP listening on %s", address)
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers


def _bind_unix(path: Path) -> socket.socket:
    if _remove_stale_socket(path):
        raise OSError(errno.EADDRINUSE, f"{path}: another server is listening")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o666)  # noqa: PTH101, S103 (delivery only, as Dovecot's)
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_tcp(address: str) -> socket.socket:
    where = parse_address(address, "[lmtp] listen")
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((where.host, where.port))
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: Path) -> bool:
    """Remove a UNIX socket file nobody listens on.  True: a live server listens there.

    Raises:
        FileExistsError: something other than a socket is at ``path``.

    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return False
    finally:
        probe.close()
    return True
