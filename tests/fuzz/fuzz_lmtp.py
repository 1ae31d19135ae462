"""Fuzz target: the LMTP listener, fed arbitrary octets over a real socket.

One listener (``start_lmtp``, the real protocol class and handler, a real passwd-file)
runs in a background thread for the whole fuzzing session; each input is one connection
that sends the octets, half-closes, and reads every reply.  Properties:

* the listener answers and closes every connection (no hang: 10 s at most an input) and
  keeps serving the next one;
* every reply line is ``NNN`` then a space or a dash, printable ASCII, CRLF-terminated
  (so no control octet of the client's is ever echoed); no reply carries exception text
  (aiosmtpd's default ``500 Error: (Type) text``); every 4xx and 5xx reply carries an
  enhanced status code (RFC 2034: LMTP advertises ENHANCEDSTATUSCODES);
* nothing is logged with a traceback (an exception escaped a handler);
* every message stored starts with the ``Return-Path:``/``Delivered-To:`` head, and its
  ``Delivered-To`` recipient was answered ``250 2.0.0 <rcpt> Saved``; nothing is stored
  without such a reply, and never more copies than such replies (a user named by several
  recipients of one transaction is stored once, each recipient answered: lmtp.py's "one
  copy per user").
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import tempfile
import threading
from collections.abc import AsyncIterable
from pathlib import Path

from pop3d.auth.passwd_file import PasswdFileAuthenticator
from pop3d.config import Config, LmtpConfig
from pop3d.lmtp import start_lmtp
from pop3d.protocol.values import Principal
from tests.fuzz import harness

_REPLY = re.compile(rb"[2-5][0-9][0-9](?:[ -][\x20-\x7e]*)?\r\n")
#: A reply with an RFC 3463 enhanced status code (every 4xx/5xx reply has one).
_ENHANCED = re.compile(rb"[245][0-9][0-9][ -][245]\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")
_HEAD = re.compile(rb"Return-Path: <[^\r\n]*>\r\nDelivered-To: ([^\r\n]+)\r\n")
_SAVED = re.compile(rb"250 2\.0\.0 <(.*)> Saved")
#: What the listener's replies turn an unprintable character into (``lmtp.wire_reply``).
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


class _Recorder:
    """A Deliverer that keeps what it was given (for one input at a time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[bytes] = []

    async def deliver(self, principal: Principal, message: AsyncIterable[bytes]) -> None:
        data = b"".join([chunk async for chunk in message])
        assert principal.username in ("alice", "bob")
        with self.lock:
            self.messages.append(data)


class _Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None:
            self.seen.append(self.format(record))


class _Listener:
    def __init__(self) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="pop3d-fuzz-lmtp-")
        users = Path(self.folder.name) / "users"
        users.write_text("alice:{PLAIN}x\nbob:{PLAIN}y\n", encoding="utf-8")
        self.auth = PasswdFileAuthenticator(users)
        self.recorder = _Recorder()
        self.tracebacks = _Tracebacks()
        for name in ("pop3d", "mail.log"):
            logging.getLogger(name).addHandler(self.tracebacks)
        self.config = Config(lmtp=LmtpConfig(listen=("127.0.0.1:0",), max_message_size=4096))
        self.port = 0
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        assert ready.wait(10), "the LMTP listener did not start"

    def _run(self, ready: threading.Event) -> None:
        async def main() -> None:
            servers = await start_lmtp(self.config, self.auth, self.recorder)
            self.port = servers[0].sockets[0].getsockname()[1]
            ready.set()
            await asyncio.Event().wait()  # serve until the process ends

        asyncio.run(main())


_listener: _Listener | None = None


def _get_listener() -> _Listener:
    global _listener  # noqa: PLW0603 (one listener for the whole fuzzing session)
    if _listener is None:
        _listener = _Listener()
    return _listener


def test_one_input(data: bytes) -> None:
    """Send ``data`` on a new connection; check every reply and what was stored."""
    listener = _get_listener()
    with listener.recorder.lock:
        listener.recorder.messages.clear()
    listener.tracebacks.seen.clear()
    replies = b""
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may close first (a line too long); its replies still count
        try:
            while chunk := sock.recv(65536):
                replies += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError("the LMTP listener did not close within 10 s") from None
    assert replies.startswith(b"220 "), "no greeting"
    assert replies.endswith(b"\r\n"), "a reply cut short"
    lines = replies.split(b"\r\n")[:-1]
    tracebacks = listener.tracebacks.seen
    for line in lines:
        assert _REPLY.fullmatch(line + b"\r\n"), f"malformed reply {line[:100]!r}"
        assert b"Error: (" not in line, f"exception text in a reply: {line[:100]!r}"
        if line[:1] in b"45":
            assert _ENHANCED.match(line), f"no enhanced status code: {line[:100]!r}"
    assert not tracebacks, tracebacks[0]
    saved = [m.group(1) for line in lines if (m := _SAVED.fullmatch(line))]
    with listener.recorder.lock:
        stored = list(listener.recorder.messages)
    assert len(stored) <= len(saved), f"{len(stored)} stored, {len(saved)} announced"
    assert bool(stored) == bool(saved), f"{len(stored)} stored, {len(saved)} announced"
    for message in stored:
        head = _HEAD.match(message)
        assert head, "a stored message without its head"
        rcpt = _UNPRINTABLE.sub("?", head.group(1).decode("utf-8", "replace")).encode()
        assert rcpt in saved, f"stored for {rcpt[:100]!r}, never answered Saved"


if __name__ == "__main__":
    harness.main("tests.fuzz.fuzz_lmtp")
