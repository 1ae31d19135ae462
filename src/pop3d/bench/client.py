r"""A small POP3 client built for load, not for convenience.

It is an :class:`asyncio.Protocol` (no StreamReader layers) that keeps one outstanding
command at a time, like Thunderbird or fetchmail without PIPELINING.  Multi-line bodies are
never accumulated: each received chunk is checked on the fly, so a 20 MiB RETR costs a
fixed amount of memory and two passes over bytes that are still in the CPU cache:

* ``bytes.count(b"\r\n.")`` counts the stuffed lines (RFC 1939 §3: every line that begins
  with ``.`` gets one more ``.``), which gives the size of the message once un-stuffed;
* CRC-32 over the body exactly as it came on the wire (still stuffed), which the
  manifest knows in advance (:func:`pop3d.bench.manifest.wire_entry`).  zlib-ng's
  ``crc32`` is used when the ``zlib-ng`` package is installed (``bench/.venv`` has it): the
  same CRC-32 as ``zlib.crc32``, computed with carry-less multiplication instead of tables
  and several times faster (docs/performance.md), which keeps the checksum from capping
  what one core of the generator can take in.

The end of a multi-line response is found in O(1) per chunk: the client never pipelines, so
the server sends nothing after ``CRLF.CRLF`` and the terminator can only be at the end of
the data received so far.  A server that ends early, or forgets to stuff a line, is caught
by the size check against LIST and by the checksum.
"""

from __future__ import annotations

import _ssl
import asyncio
import ctypes
import ssl
import sys
from dataclasses import dataclass
from typing import Any, Self, cast

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # plain zlib: the same values, slower
    from zlib import crc32

__all__ = [
    "MAX_STATUS_LINE",
    "Body",
    "NegativeReply",
    "Pop3Client",
    "ProtocolFailure",
    "ResumingContext",
    "client_context",
    "count_stuffed",
    "crc32",
    "unstuff",
]

#: Longest status line accepted (RFC 2449 §4: 512 octets for a response line, with margin).
MAX_STATUS_LINE = 4096

_TERMINATOR = b"\r\n.\r\n"
_STUFF = b"\r\n."


class ProtocolFailure(Exception):
    """The server broke the protocol or closed the connection unexpectedly."""


class NegativeReply(Exception):
    """The server answered ``-ERR`` where ``+OK`` was expected."""


@dataclass(slots=True)
class Body:
    """What the client learned about one multi-line body without keeping it."""

    #: The status line (without CRLF).
    status: bytes
    #: Octets of the body as sent, still stuffed, without the terminating ``.CRLF``.
    wire_octets: int
    #: Octets once un-stuffed: what LIST/STAT must have announced (RFC 1939 §11).
    octets: int
    #: CRC-32 of the body as sent (still stuffed).
    crc: int
    #: The body itself, only when the caller asked to keep it (small listings).
    data: bytes | None = None


class _SetSession:
    """``SSL_set_session`` on a ``_ssl`` object, without CPython's copy of the session.

    CPython's ``session`` setter (and ``wrap_bio(session=...)``) copies the session with
    ``i2d_SSL_SESSION``/``d2i_SSL_SESSION`` before handing it to OpenSSL, which decodes the
    server's certificate again: on OpenSSL 3.0 that copy cost the load generator ~250 µs of
    every resumed session, a quarter of all its work per session, and made it the limit of
    ``login-tls-resume``.  The generator only reads the session it offers, so OpenSSL's own
    reference counting (``SSL_set_session`` takes a reference) is all it needs.

    The pointers are read from the ``_ssl`` objects' C structs (``PySSLSocket``: head, weak
    socket, ``SSL *``, context; ``PySSLSession``: head, ``SSL_SESSION *``, context).  The
    layout is checked on every call by reading only inside the objects: each struct's
    context field must hold the address of the context that made it.  Where it does not
    (another Python, another build), ``__call__`` returns False and the caller falls back
    to CPython's setter, which is slower but the same handshake.
    """

    _HEAD = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)
    _PTR = ctypes.sizeof(ctypes.c_void_p)

    def __init__(self) -> None:
        self._set: Any = None
        if sys.implementation.name != "cpython":
            return
        try:
            # dlsym through _ssl's own handle finds the libssl it is linked with
            fn = ctypes.CDLL(_ssl.__file__).SSL_set_session
        except (OSError, AttributeError):
            return
        fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
        fn.restype = ctypes.c_int
        self._set = fn

    def _field(self, obj: object, index: int) -> int:
        return ctypes.c_void_p.from_address(id(obj) + self._HEAD + index * self._PTR).value or 0

    def __call__(self, context: ssl.SSLContext, tls: ssl.SSLObject,
                 session: ssl.SSLSession) -> bool:
        """Offer ``session`` on ``tls`` (made by ``context``, no handshake yet).

        False when this Python's objects are not laid out as expected.
        """
        raw = getattr(tls, "_sslobj", None)
        if self._set is None or raw is None:
            return False
        # PySSLSocket: Socket, ssl, ctx; PySSLSession: session, ctx
        if self._field(raw, 2) != id(context) or self._field(session, 1) != id(context):
            return False
        return bool(self._set(self._field(raw, 1), self._field(session, 0)))


_set_session = _SetSession()


class ResumingContext(ssl.SSLContext):
    """A client TLS context that offers the last session it was given (``session``).

    asyncio and uvloop wrap each connection with ``wrap_bio`` and pass no session, so
    resumption is offered here, as a client that keeps its session ticket between polls
    (Thunderbird, K-9, fetchmail through OpenSSL) does.  ``session`` stays ``None`` for
    full handshakes.
    """

    session: ssl.SSLSession | None = None
    #: Keep each connection's session for the next (``Pop3Client.connect``).
    keep_session = False

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: Any = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        """Wrap as asked, offering :attr:`session` when the caller gave none."""
        offer = session or self.session
        tls = super().wrap_bio(incoming, outgoing, server_side, server_hostname)
        if offer is not None and not _set_session(self, tls, offer):
            tls.session = offer  # CPython's setter: a copy of the session each time
        return tls


def client_context(resume: bool = False) -> ResumingContext:
    """TLS for loopback benchmarks: no certificate check (self-signed), sessions kept.

    TLS 1.3 with OpenSSL's default groups: the one key share it sends is X25519, as
    Thunderbird's, K-9's and OpenSSL-based clients' first share is.
    """
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.keep_session = resume
    return ctx


class Pop3Client(asyncio.Protocol):
    """One POP3 connection.  Use :meth:`connect`, then :meth:`command` / :meth:`multi`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[bytes | Body] | None = None
        self._closed: BaseException | None = None
        # multi-line state
        self._multi = False
        self._keep = False
        self._in_body = False
        self._status = b""
        self._tail = b""
        self._hold = b""
        self._dots = 0
        self._wire = 0
        self._crc = 0
        self._parts: list[bytes] = []
        #: Octets received on this connection (wire bytes, all responses).
        self.bytes_in = 0
        #: POP3S: the TLS handshake resumed a session.
        self.resumed = False

    # --- public API -------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, host: str, port: int, loop: asyncio.AbstractEventLoop | None = None,
        tls: ResumingContext | None = None,
    ) -> tuple[Pop3Client, bytes]:
        """Open a connection (implicit TLS with ``tls``: POP3S) and read the greeting.

        With a ``tls`` context made for resumption, the session (the TLS 1.3 ticket comes
        with the greeting) is kept for the next connection, and :attr:`resumed` tells
        whether this one resumed.
        """
        loop = loop or asyncio.get_running_loop()
        if tls is None:
            _, client = await loop.create_connection(lambda: cls(loop), host, port)
        else:
            _, client = await loop.create_connection(lambda: cls(loop), host, port, ssl=tls,
                                                     server_hostname="localhost")
        greeting = await client.reply()
        if not greeting.startswith(b"+OK"):
            client.abort()
            raise NegativeReply(f"greeting: {greeting[:80]!r}")
        if tls is not None:
            tls_object = client.transport_info("ssl_object")
            if tls_object is not None:
                client.resumed = bool(tls_object.session_reused)
                # a resumed session's ticket stays good: only a full handshake brings one
                if tls.keep_session and not client.resumed and tls_object.session is not None:
                    tls.session = tls_object.session
        return client, greeting

    async def command(self, line: bytes) -> bytes:
        """Send ``line`` (with CRLF) and return the single-line reply (without CRLF)."""
        self._send(line)
        return await self.reply()

    async def ok(self, line: bytes) -> bytes:
        """Like :meth:`command`, but raise :class:`NegativeReply` unless the reply is +OK."""
        self._send(line)
        reply = await self.reply()
        if not reply.startswith(b"+OK"):
            raise NegativeReply(f"{line.split(b' ', 1)[0].strip().decode('ascii', 'replace')}"
                                f": {reply[:80]!r}")
        return reply

    async def multi(self, line: bytes, keep: bool = False) -> Body:
        """Send ``line`` and read a multi-line reply; ``keep`` keeps the body's bytes.

        Raises:
            NegativeReply: the server answered ``-ERR``.
            ProtocolFailure: the connection closed or the reply is malformed.

        """
        self._send(line)
        fut: asyncio.Future[bytes | Body] = self._loop.create_future()
        self._waiter = fut
        self._multi = True
        self._keep = keep
        self._in_body = False
        self._try()
        result = await fut
        if isinstance(result, bytes):
            raise NegativeReply(f"{line.split(b' ', 1)[0].strip().decode('ascii', 'replace')}"
                                f": {result[:80]!r}")
        return result

    async def quit(self) -> None:
        """Send QUIT, wait for the reply, close."""
        try:
            await self.ok(b"QUIT\r\n")
        finally:
            self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Drop the connection when the block failed; a clean exit leaves it as it is."""
        if kind is not None:
            self.abort()

    def transport_info(self, name: str) -> Any:
        """The transport's ``get_extra_info(name)`` (``None`` once closed)."""
        return self._transport.get_extra_info(name) if self._transport is not None else None

    def close(self) -> None:
        """Close the transport (after what was written is flushed)."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        if self._transport is not None:
            self._transport.abort()

    # --- internals --------------------------------------------------------------------------

    def _send(self, line: bytes) -> None:
        if self._closed is not None or self._transport is None:
            raise ProtocolFailure("connection closed")
        self._transport.write(line)

    def reply(self) -> asyncio.Future[bytes]:
        """Wait for the next single-line reply (without CRLF)."""
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._waiter = fut  # type: ignore[assignment]
        self._multi = False
        self._try()
        return fut

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (uvloop's is not an asyncio.Transport subclass, but acts as one)."""
        self._transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the pending reply, if any."""
        self._closed = exc or ProtocolFailure("connection closed by server")
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ProtocolFailure("connection closed by server"))

    def data_received(self, data: bytes) -> None:
        """Buffer a status line, or check a body chunk on the fly."""
        self.bytes_in += len(data)
        if self._in_body:
            self._feed_body(data)
            return
        self._buf += data
        if self._waiter is not None:
            self._try()
        elif len(self._buf) > MAX_STATUS_LINE:
            self._fail("unsolicited data from server")

    def _fail(self, why: str) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ProtocolFailure(why))
        self.abort()

    def _try(self) -> None:
        buf = self._buf
        i = buf.find(b"\r\n")
        if i < 0:
            if len(buf) > MAX_STATUS_LINE:
                self._fail("status line too long")
            elif self._closed is not None:
                self._fail("connection closed by server")
            return
        status = bytes(buf[:i])
        if not self._multi or not status.startswith(b"+OK"):
            del buf[: i + 2]
            waiter, self._waiter = self._waiter, None
            if waiter is not None:
                waiter.set_result(status)
            return
        # The status line's CRLF opens the stream the terminator search looks at.
        rest = bytes(buf[i + 2 :])
        buf.clear()
        self._status = status
        self._in_body = True
        self._tail = b"\r\n"
        self._hold = b""
        self._dots = 0
        self._wire = 0
        self._crc = 0
        self._parts = []
        if rest:
            self._feed_body(rest)
        elif self._closed is not None:
            self._fail("connection closed by server")

    def _feed_body(self, data: bytes) -> None:
        n = len(data)
        tail = self._tail
        # Stuffed lines: "\r\n." inside this chunk, plus one that straddles the boundary.
        self._dots += (tail[-2:] + data[:2]).count(_STUFF) + count_stuffed(data)
        # CRC of everything but the last 3 octets seen (they may be the ".\r\n" terminator).
        hold = self._hold
        if n >= 3:
            if hold:
                self._crc = crc32(hold, self._crc)
                if self._keep:
                    self._parts.append(hold)
            with memoryview(data) as view:
                self._crc = crc32(view[: n - 3], self._crc)
            if self._keep:
                self._parts.append(data[: n - 3])
            self._hold = data[n - 3 :]
        else:
            both = hold + data
            cut = max(0, len(both) - 3)
            if cut:
                self._crc = crc32(both[:cut], self._crc)
                if self._keep:
                    self._parts.append(both[:cut])
            self._hold = both[cut:]
        self._wire += n
        self._tail = data[-5:] if n >= 5 else (tail + data)[-5:]
        if not self._tail.endswith(_TERMINATOR):
            return
        # Done: the stream "\r\n" + body + ".\r\n" ended; its last "\r\n." is the terminator.
        self._in_body = False
        wire = self._wire - 3
        body = Body(
            status=self._status,
            wire_octets=wire,
            octets=wire - (self._dots - 1),
            crc=self._crc,
            data=b"".join(self._parts) if self._keep else None,
        )
        self._parts = []
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(body)


#: Dots looked at one by one before counting the rest of a chunk in one pass.
_DOTS_ONE_BY_ONE = 8


def count_stuffed(data: bytes) -> int:
    """Count ``CRLF.`` in ``data``: fast where dots are rare (attachments, base64).

    ``bytes.count`` of a 3-octet pattern runs near 1 GB/s over CRLF text, while finding a
    single ``.`` is memchr: look at the first few dots directly, and count from there on
    only when there are many.
    """
    n = 0
    seen = 0
    i = data.find(b".")
    while i >= 0:
        if seen == _DOTS_ONE_BY_ONE:
            return n + data.count(_STUFF, max(0, i - 2))
        if i >= 2 and data[i - 2] == 13 and data[i - 1] == 10:  # CR LF
            n += 1
        seen += 1
        i = data.find(b".", i + 1)
    return n


def unstuff(wire: bytes) -> bytes:
    """Undo RFC 1939 byte-stuffing of a multi-line body (for callers that kept the bytes)."""
    body = (b"\r\n" + wire).replace(_STUFF, b"\r\n")
    return body[2:]
