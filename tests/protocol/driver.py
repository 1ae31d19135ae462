"""A tiny in-memory driver for the sans-I/O core, for transcript tests.

It answers request events from plain dicts: no sockets, files or event loop, so each
test is a pure function of the bytes fed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pop3d.protocol import (
    ApopAuthenticate,
    AuthRefused,
    Closed,
    NeedData,
    OpenMaildrop,
    PasswordAuthenticate,
    Pop3Connection,
    Pop3Settings,
    SaslOutcome,
    SaslSecret,
    SendMessage,
    StartTls,
    Update,
)
from pop3d.protocol.replies import RespCode
from pop3d.protocol.values import MessageInfo, Principal


def wire(message: bytes) -> bytes:
    """The message as storage hands it over: CRLF line ends and a final CRLF."""
    text = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return text if text.endswith(b"\r\n") else text + b"\r\n"


@dataclass
class FakeDriver:
    """Performs the core's requests against in-memory users and messages.

    ``users`` maps a user to their password; ``accounts`` are users without one (who can
    still log in by SASL: SCRAM from ``secrets``, EXTERNAL).  Every event the core
    produced is recorded in ``asked``.
    """

    users: dict[str, bytes] = field(default_factory=lambda: {"alice": b"secret"})
    accounts: set[str] = field(default_factory=set)
    secrets: dict[tuple[str, str], bytes] = field(default_factory=dict)
    asked: list[object] = field(default_factory=list)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    locked: bool = False
    #: Answer OpenMaildrop with this code instead of opening (``locked``: IN_USE).
    refuse_open: RespCode | None = None
    chunk: int = 7
    vanished: set[str] = field(default_factory=set)
    updates: list[tuple[str, ...]] = field(default_factory=list)
    closed: str | None = None
    tls_started: int = 0
    #: Take the output as pieces (``pieces_to_send``, a writev) instead of joined bytes.
    pieces: bool = False

    def listing(self) -> list[MessageInfo]:
        return [MessageInfo(uid, len(wire(body))) for uid, body in self.messages]

    def take(self, conn: Pop3Connection) -> bytes:
        """What the core has to send, as the transport would write it."""
        return b"".join(conn.pieces_to_send()) if self.pieces else conn.data_to_send()

    def run(self, conn: Pop3Connection) -> bytes:
        """Handle events until the core needs data or closes; return what it sent."""
        out = [self.take(conn)]
        while True:
            event = conn.next_event()
            self.asked.append(event)
            match event:
                case NeedData():
                    break
                case Closed(reason):
                    self.closed = reason
                    break
                case PasswordAuthenticate(username, password):
                    if self.users.get(username) == password:
                        conn.auth_succeeded(Principal(username))
                    else:
                        conn.auth_failed()
                case ApopAuthenticate():
                    conn.auth_failed()
                case SaslSecret(username, scheme):
                    conn.sasl_secret(self.secrets.get((username, scheme)))
                case SaslOutcome(username, _, success):
                    if success and (username in self.users or username in self.accounts):
                        conn.auth_succeeded(Principal(username))
                    else:
                        conn.auth_failed()
                case AuthRefused():
                    pass  # information only: nothing to report
                case OpenMaildrop():
                    if self.locked or self.refuse_open is not None:
                        conn.maildrop_failed(self.refuse_open or RespCode.IN_USE)
                    else:
                        conn.maildrop_opened(self.listing())
                case SendMessage(uid):
                    if uid in self.vanished:
                        conn.message_failed(vanished=True)
                    else:
                        data = wire(dict(self.messages)[uid])
                        for i in range(0, len(data), self.chunk):
                            if not conn.message_data(data[i : i + self.chunk]):
                                break
                        conn.message_end()
                case StartTls():
                    self.tls_started += 1
                    conn.tls_established()
                case Update(deleted):
                    self.updates.append(deleted)
                    conn.update_done()
            out.append(self.take(conn))
        out.append(self.take(conn))
        return b"".join(out)


def transcript(
    lines: Iterable[bytes],
    *,
    settings: Pop3Settings | None = None,
    driver: FakeDriver | None = None,
    byte_at_a_time: bool = False,
    eof: bool = False,
) -> tuple[bytes, FakeDriver]:
    """Feed ``lines`` (joined) to a new connection; return everything it sent."""
    driver = driver or FakeDriver()
    conn = Pop3Connection(settings or Pop3Settings())
    data = b"".join(lines)
    out = [driver.run(conn)]
    pieces = [data[i : i + 1] for i in range(len(data))] if byte_at_a_time else [data]
    for piece in pieces:
        conn.receive_data(piece)
        out.append(driver.run(conn))
    if eof:
        conn.receive_data(b"")
        out.append(driver.run(conn))
    return b"".join(out), driver


def both_ways(
    lines: list[bytes],
    *,
    settings: Pop3Settings | None = None,
    messages: list[tuple[str, bytes]] | None = None,
    eof: bool = False,
) -> bytes:
    """Run a transcript whole and byte at a time; both must send the same bytes."""
    whole, _ = transcript(
        lines, settings=settings, driver=FakeDriver(messages=list(messages or [])), eof=eof
    )
    split, _ = transcript(
        lines,
        settings=settings,
        driver=FakeDriver(messages=list(messages or [])),
        byte_at_a_time=True,
        eof=eof,
    )
    assert whole == split
    return whole
