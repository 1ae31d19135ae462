"""The core's own defences: bounded output, deadlines and shutdown as inputs, its error count.

Pure tests: no socket, no loop.  The core stops answering once its queued output reaches
its chunk (or after a batch of lines) and says so with :class:`Flush`; a deadline or a
shutdown is an input that closes the session without UPDATE and returns the last bytes,
which are nothing in the middle of a message.
"""

from __future__ import annotations

import pytest

from pop3d.errors import LocalProtocolError
from pop3d.protocol import (
    AuthRefused,
    Closed,
    Flush,
    NeedData,
    OpenMaildrop,
    PasswordAuthenticate,
    Pop3Connection,
    Pop3Settings,
    SendMessage,
    Update,
)
from pop3d.protocol.states import State
from pop3d.protocol.values import MessageInfo, Principal

from .driver import FakeDriver, transcript


def logged_in(settings: Pop3Settings | None = None) -> Pop3Connection:
    conn = Pop3Connection(settings or Pop3Settings())
    conn.receive_data(b"USER alice\r\nPASS secret\r\n")
    event = conn.next_event()
    assert isinstance(event, PasswordAuthenticate)
    conn.auth_succeeded(Principal("alice"))
    assert isinstance(conn.next_event(), OpenMaildrop)
    conn.maildrop_opened([MessageInfo("u1", 100), MessageInfo("u2", 200)])
    conn.data_to_send()
    return conn


def test_output_is_counted_and_capped_by_flush() -> None:
    """CAPA x1000 is answered a chunk at a time: the core asks for a Flush, never hoards."""
    conn = Pop3Connection(Pop3Settings(output_chunk=4096))
    conn.receive_data(b"CAPA\r\n" * 1000)
    flushes = 0
    while not isinstance(event := conn.next_event(), NeedData):
        assert isinstance(event, Flush)
        flushes += 1
        pending = conn.pending_output
        assert pending < 4096 + 200  # one reply past the chunk at most
        assert len(conn.data_to_send()) == pending
    assert flushes >= 1000 // 64
    assert conn.commands_received == 1000


def test_pending_output_is_exactly_what_data_to_send_returns() -> None:
    """The running count matches the octets handed out (the driver's budget relies on it)."""
    conn = logged_in()
    conn.receive_data(b"STAT\r\nLIST\r\nUIDL\r\nNOOP\r\nDELE 1\r\nRSET\r\nBOGUS\r\n")
    assert isinstance(conn.next_event(), NeedData)
    counted = conn.pending_output
    assert counted == len(conn.data_to_send())
    assert conn.pending_output == 0


def test_many_lines_are_handled_in_batches() -> None:
    """NOOP x1000 yields a Flush every 64 lines, so a driver can give others their turn."""
    conn = logged_in()
    conn.receive_data(b"NOOP\r\n" * 1000)
    events = []
    while not isinstance(event := conn.next_event(), NeedData):
        events.append(event)
        conn.data_to_send()
    assert events == [Flush()] * (1000 // 64)


def test_timeout_closes_with_a_farewell_and_no_update() -> None:
    """A deadline is an input: -ERR, Closed, and the deleted messages stay."""
    conn = logged_in()
    conn.receive_data(b"DELE 1\r\n")
    assert isinstance(conn.next_event(), NeedData)
    out = conn.timeout("idle")
    assert out == b"+OK message 1 deleted\r\n-ERR autologout: idle for too long\r\n"
    assert conn.state is State.CLOSED
    assert conn.next_event() == Closed("idle timeout")


@pytest.mark.parametrize(
    ("deadline", "text"),
    [("login", b"-ERR login timeout\r\n"), ("line", b"-ERR command line timeout\r\n")],
)
def test_login_and_line_deadlines_say_why(deadline: str, text: bytes) -> None:
    conn = Pop3Connection(Pop3Settings())
    conn.data_to_send()
    conn.receive_data(b"CAPA\r\nUSER al")
    conn.next_event()
    conn.data_to_send()
    assert conn.timeout(deadline) == text  # type: ignore[arg-type]
    assert conn.next_event() == Closed(f"{deadline} timeout")


def test_timeout_mid_message_says_nothing_more() -> None:
    """In the middle of a RETR no -ERR can be sent (it would read as message text)."""
    conn = logged_in()
    conn.receive_data(b"RETR 2\r\n")
    assert isinstance(conn.next_event(), SendMessage)
    conn.message_data(b"Subject: x\r\n\r\n")
    conn.data_to_send()
    conn.message_data(b"more body\r\n")
    assert conn.timeout("send") == b""
    assert conn.next_event() == Closed("send timeout")


def test_timeout_before_the_first_chunk_still_answers() -> None:
    """A RETR whose status line is not out yet can still be refused cleanly."""
    conn = logged_in()
    conn.receive_data(b"RETR 2\r\n")
    assert isinstance(conn.next_event(), SendMessage)
    assert conn.timeout("idle") == b"-ERR autologout: idle for too long\r\n"


def test_shutdown_is_an_input_too() -> None:
    conn = logged_in()
    assert conn.shutdown() == b"-ERR [SYS/TEMP] server shutting down\r\n"
    assert conn.next_event() == Closed("shutdown")


def test_lost_maildrop_refuses_the_next_command_and_skips_update() -> None:
    """A lock lost under the session (a cluster lease): the next command, even QUIT after
    a DELE, gets -ERR [SYS/TEMP] and the session closes without an Update event."""
    conn = logged_in()
    conn.receive_data(b"DELE 1\r\nSTAT\r\n")
    assert isinstance(conn.next_event(), NeedData)
    assert conn.data_to_send() == b"+OK message 1 deleted\r\n+OK 1 200\r\n"
    conn.maildrop_lost()
    conn.receive_data(b"QUIT\r\nSTAT\r\n")
    assert conn.next_event() == Closed("lock lost")
    assert conn.data_to_send() == (
        b"-ERR [SYS/TEMP] maildrop lock lost, closing without update\r\n"
    )


def test_lost_maildrop_outside_transaction_changes_nothing() -> None:
    conn = Pop3Connection(Pop3Settings())
    conn.data_to_send()
    conn.maildrop_lost()
    conn.receive_data(b"USER alice\r\n")
    assert isinstance(conn.next_event(), NeedData)
    assert conn.data_to_send() == b"+OK send PASS\r\n"


def test_no_timeout_in_update() -> None:
    """An UPDATE is let finish: the driver may not time it out."""
    conn = logged_in()
    conn.receive_data(b"DELE 1\r\nQUIT\r\n")
    assert isinstance(conn.next_event(), Update)
    with pytest.raises(LocalProtocolError):
        conn.timeout("idle")


def test_error_budget_counts_refusals_not_bytes() -> None:
    """A refused command counts against the budget; any good one resets it."""
    login = [b"USER alice\r\n", b"PASS secret\r\n"]
    driver = FakeDriver()
    transcript([*login, *[b"RETR 9\r\n"] * 19, b"NOOP\r\n", *[b"RETR 9\r\n"] * 19],
               driver=driver)
    assert driver.closed is None
    out, _ = transcript([*login, *[b"RETR 9\r\n"] * 20], driver=FakeDriver())
    assert out.endswith(b"-ERR no such message\r\n-ERR too many bad commands, closing\r\n")


def test_sasl_refusals_are_reported_for_the_audit_line() -> None:
    """A cancelled or malformed exchange, an unknown mechanism: AuthRefused with its word."""
    driver = FakeDriver()
    settings = Pop3Settings(sasl_mechanisms=("PLAIN",))
    transcript([b"AUTH PLAIN\r\n", b"*\r\n", b"AUTH FOO\r\n", b"AUTH PLAIN\r\n", b"!!\r\n"],
               settings=settings, driver=driver)
    refused = [e for e in driver.asked if isinstance(e, AuthRefused)]
    assert [(e.code, e.mechanism) for e in refused] == [
        ("cancelled", "PLAIN"), ("unknown-mech", "FOO"), ("malformed", "PLAIN"),
    ]


def test_capa_after_login_repeats_sasl() -> None:
    """RFC 2449 §5: SASL (like USER) is announced in both states."""
    conn = logged_in(Pop3Settings(sasl_mechanisms=("PLAIN", "LOGIN")))
    conn.receive_data(b"CAPA\r\n")
    conn.next_event()
    capa = conn.data_to_send()
    assert b"\r\nUSER\r\n" in capa
    assert b"\r\nSASL PLAIN LOGIN\r\n" in capa
    assert b"STLS" not in capa
