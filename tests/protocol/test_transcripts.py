"""Transcripts of the core: client lines in, exact reply bytes out (RFC 1939, 2449)."""

from __future__ import annotations

import pytest

from pop3d.protocol import Pop3Connection, Pop3Settings
from pop3d.protocol import commands as c
from pop3d.protocol.replies import RespCode
from pop3d.protocol.states import State
from pop3d.protocol.values import MessageInfo, Principal
from tests.protocol.driver import FakeDriver, both_ways, transcript, wire

GREETING = b"+OK POP3 server ready\r\n"
LOGIN = [b"USER alice\r\n", b"PASS secret\r\n"]
LOGGED_IN = GREETING + b"+OK send PASS\r\n"
MSGS = [("uid-a", b"Subject: a\r\n\r\nhello\r\n"), ("uid-b", b"Subject: b\n\nbody\n")]


def after_login(lines: list[bytes], messages: list[tuple[str, bytes]] | None = None) -> bytes:
    """Run a session that logs in first; return what followed the PASS reply."""
    out = both_ways(LOGIN + lines, messages=MSGS if messages is None else messages)
    _, sep, rest = out.partition(b"octets)\r\n")
    assert sep, out
    return rest


def test_greeting() -> None:
    """The server speaks first with a positive greeting ending in CRLF."""
    assert both_ways([]) == GREETING


def test_apop_greeting_carries_timestamp() -> None:
    """With APOP enabled the greeting ends with the RFC 1939 timestamp."""
    settings = Pop3Settings(apop_timestamp=b"<1.2@host>")
    assert both_ways([], settings=settings) == b"+OK POP3 server ready <1.2@host>\r\n"


def test_login_reports_count_and_size() -> None:
    """PASS answers with the seed's wording: count and exact octet total."""
    out = both_ways(LOGIN, messages=MSGS)
    assert out == LOGGED_IN + b"+OK alice's maildrop has 2 messages (41 octets)\r\n"


def test_singular_message_count() -> None:
    """One message is "1 message", not "1 messages"."""
    out = both_ways(LOGIN, messages=MSGS[:1])
    assert out.endswith(b"+OK alice's maildrop has 1 message (21 octets)\r\n")


def test_wrong_password_and_unknown_user_same_reply() -> None:
    """An unknown user and a wrong password get identical replies (no enumeration)."""
    wrong = both_ways([b"USER alice\r\n", b"PASS nope\r\n"])
    unknown = both_ways([b"USER mallory\r\n", b"PASS nope\r\n"])
    assert wrong == unknown == LOGGED_IN + b"-ERR [AUTH] invalid password\r\n"


def test_retry_after_failed_pass() -> None:
    """After a failed PASS the client may start again with USER (RFC 1939 §7)."""
    out = both_ways([b"USER alice\r\n", b"PASS x\r\n", b"PASS secret\r\n", *LOGIN], messages=[])
    assert out == (
        LOGGED_IN
        + b"-ERR [AUTH] invalid password\r\n"
        + b"-ERR send USER first\r\n"
        + b"+OK send PASS\r\n"
        + b"+OK alice's maildrop has 0 messages (0 octets)\r\n"
    )


def test_auth_attempt_cap_closes() -> None:
    """After max_auth_attempts failures the connection is closed."""
    out, driver = transcript([b"USER a\r\nPASS b\r\n"] * 4)
    assert out.count(b"-ERR [AUTH] invalid password") == 3
    assert driver.closed == "auth failures"


def test_locked_maildrop() -> None:
    """A locked maildrop is -ERR [IN-USE] and the session stays in AUTHORIZATION."""
    driver = FakeDriver(locked=True)
    out, _ = transcript([*LOGIN, b"STAT\r\n"], driver=driver)
    assert out == (
        LOGGED_IN
        + b"-ERR [IN-USE] maildrop already locked\r\n"
        + b"-ERR command not valid in this state\r\n"
    )


def test_login_delay_is_advertised_in_both_states_only_when_set() -> None:
    """RFC 2449 §6.5: ``LOGIN-DELAY n`` in CAPA before and after login; absent at 0."""
    settings = Pop3Settings(login_delay=300)
    before = both_ways([b"CAPA\r\n"], settings=settings)
    after = both_ways([*LOGIN, b"CAPA\r\n"], settings=settings, messages=MSGS)
    assert before.count(b"\r\nLOGIN-DELAY 300\r\n") == 1
    assert after.count(b"\r\nLOGIN-DELAY 300\r\n") == 1
    assert b"LOGIN-DELAY" not in both_ways([b"CAPA\r\n"])


def test_login_too_soon() -> None:
    """A login refused for its delay is -ERR [LOGIN-DELAY]; the session may try again."""
    driver = FakeDriver(refuse_open=RespCode.LOGIN_DELAY)
    out, _ = transcript(
        [*LOGIN, b"STAT\r\n", b"USER alice\r\n"],
        driver=driver,
        settings=Pop3Settings(login_delay=60),
    )
    assert out == (
        LOGGED_IN
        + b"-ERR [LOGIN-DELAY] wait 60 seconds between logins\r\n"
        + b"-ERR command not valid in this state\r\n"
        + b"+OK send PASS\r\n"
    )


def test_stat_list_uidl() -> None:
    """STAT, LIST and UIDL report CRLF sizes and the stable ids."""
    out = after_login([b"STAT\r\n", b"LIST\r\n", b"LIST 2\r\n", b"UIDL\r\n", b"UIDL 1\r\n"])
    assert out == (
        b"+OK 2 41\r\n"
        b"+OK 2 messages (41 octets)\r\n1 21\r\n2 20\r\n.\r\n"
        b"+OK 2 20\r\n"
        b"+OK unique-id listing follows\r\n1 uid-a\r\n2 uid-b\r\n.\r\n"
        b"+OK 1 uid-a\r\n"
    )


def test_retr_normalises_and_terminates() -> None:
    """RETR sends CRLF lines, the exact octet count, and the terminating dot."""
    out = after_login([b"RETR 2\r\n"])
    assert out == b"+OK 20 octets\r\nSubject: b\r\n\r\nbody\r\n.\r\n"


@pytest.mark.parametrize(
    ("body", "sent"),
    [
        (b".\r\n", b"..\r\n"),
        (b".\r\n.\r\n", b"..\r\n..\r\n"),
        (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n"),
        (b"no final line end", b"no final line end\r\n"),
        (b"bare\nlf\n.dot\n", b"bare\r\nlf\r\n..dot\r\n"),
        (b"\xff\xfe 8-bit \x00 nul\r\n", b"\xff\xfe 8-bit \x00 nul\r\n"),
    ],
)
def test_byte_stuffing(body: bytes, sent: bytes) -> None:
    """Every line starting with '.' is stuffed, the first included; 8-bit passes intact."""
    out = after_login([b"RETR 1\r\n"], messages=[("u", body)])
    status, _, rest = out.partition(b"\r\n")
    assert rest == sent + b".\r\n"
    unstuffed = b"\r\n".join(
        line[1:] if line.startswith(b".") else line for line in sent.split(b"\r\n")
    )
    assert status == b"+OK %d octets" % len(unstuffed)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (0, b"H: 1\r\n.H2: 2\r\n\r\n"),
        (1, b"H: 1\r\n.H2: 2\r\n\r\nl1\r\n"),
        (2, b"H: 1\r\n.H2: 2\r\n\r\nl1\r\n.l2\r\n"),
        (99, b"H: 1\r\n.H2: 2\r\n\r\nl1\r\n.l2\r\nl3\r\n"),
    ],
)
def test_top(lines: int, expected: bytes) -> None:
    """TOP sends the header, the blank line, and n body lines, stuffed."""
    msg = b"H: 1\r\n.H2: 2\r\n\r\nl1\r\n.l2\r\nl3\r\n"
    out = after_login([b"TOP 1 %d\r\n" % lines], messages=[("u", msg)])
    assert out == b"+OK top of message follows\r\n" + expected.replace(b"\n.", b"\n..") + b".\r\n"


def test_top_without_body() -> None:
    """TOP of a message with no blank line sends the whole header."""
    out = after_login([b"TOP 1 5\r\n"], messages=[("u", b"H: 1\r\nH: 2\r\n")])
    assert out == b"+OK top of message follows\r\nH: 1\r\nH: 2\r\n.\r\n"


def test_dele_hides_and_rset_restores() -> None:
    """Deleted messages vanish from STAT/LIST/UIDL, are refused, and RSET restores them."""
    out = after_login(
        [
            b"DELE 1\r\n",
            b"DELE 1\r\n",
            b"RETR 1\r\n",
            b"TOP 1 0\r\n",
            b"LIST 1\r\n",
            b"UIDL 1\r\n",
            b"STAT\r\n",
            b"LIST\r\n",
            b"UIDL\r\n",
            b"RSET\r\n",
            b"STAT\r\n",
        ]
    )
    assert out == (
        b"+OK message 1 deleted\r\n"
        b"-ERR message is deleted\r\n"
        b"-ERR message is deleted\r\n"
        b"-ERR message is deleted\r\n"
        b"-ERR message is deleted\r\n"
        b"-ERR message is deleted\r\n"
        b"+OK 1 20\r\n"
        b"+OK 1 message (20 octets)\r\n2 20\r\n.\r\n"
        b"+OK unique-id listing follows\r\n2 uid-b\r\n.\r\n"
        b"+OK maildrop has 2 messages (41 octets)\r\n"
        b"+OK 2 41\r\n"
    )


def test_quit_in_transaction_updates() -> None:
    """QUIT in TRANSACTION hands exactly the deleted uids to UPDATE."""
    out, driver = transcript([*LOGIN, b"DELE 2\r\n", b"QUIT\r\n"], driver=FakeDriver(messages=MSGS))
    assert driver.updates == [("uid-b",)]
    assert driver.closed == "quit"
    assert out.endswith(b"+OK pop3d signing off (1 left)\r\n")


def test_rset_then_quit_deletes_nothing() -> None:
    """RSET clears the deleted marks: UPDATE removes nothing."""
    _, driver = transcript(
        [*LOGIN, b"DELE 1\r\n", b"RSET\r\n", b"QUIT\r\n"], driver=FakeDriver(messages=MSGS)
    )
    assert driver.updates == [()]


@pytest.mark.parametrize("ending", [b"", b"DELE 1\r\n"])
def test_eof_never_updates(ending: bytes) -> None:
    """A session that ends without QUIT never reaches UPDATE, whatever was deleted."""
    _, driver = transcript([*LOGIN, ending], driver=FakeDriver(messages=MSGS), eof=True)
    assert driver.updates == []
    assert driver.closed == "eof"


def test_quit_before_eof_still_runs() -> None:
    """QUIT followed at once by a close is still honoured (the line was complete)."""
    _, driver = transcript(
        [*LOGIN, b"DELE 1\r\nQUIT\r\n"], driver=FakeDriver(messages=MSGS), eof=True
    )
    assert driver.updates == [("uid-a",)]


def test_quit_in_authorization() -> None:
    """QUIT before login signs off with no UPDATE."""
    out, driver = transcript([b"QUIT\r\n"])
    assert out == GREETING + b"+OK pop3d signing off\r\n"
    assert driver.updates == []
    assert driver.closed == "quit"


@pytest.mark.parametrize("n", [b"0", b"3", b"+1", b"-1", b" 1", b"1 ", b"1_0", b"\xd9\xa1", b"x",
                               b"99999999999", b"\xef\xbc\x91"])
def test_message_numbers_strict(n: bytes) -> None:
    """Only ASCII digits naming an existing message are accepted; the rest is -ERR."""
    out = after_login([b"RETR " + n + b"\r\n", b"NOOP\r\n"])
    assert out.startswith(b"-ERR ")
    assert out.endswith(b"+OK\r\n")
    assert n.strip() not in out.split(b"-ERR", 1)[1] or n.strip() in (b"0", b"1", b"3")


@pytest.mark.parametrize(
    "line",
    [b"STAT x", b"NOOP 1", b"LIST 1 2", b"TOP 1", b"TOP 1 x", b"RETR", b"DELE",
     b"STATS", b"ST", b"XYZZY", b"\x00\x01", b"QUIT ", b"list  1"],
)
def test_malformed_is_err_and_session_goes_on(line: bytes) -> None:
    """Malformed commands get -ERR with our text, and the session continues."""
    out = after_login([line + b"\r\n", b"NOOP\r\n"])
    first, _, rest = out.partition(b"\r\n")
    assert first.startswith(b"-ERR ")
    assert rest == b"+OK\r\n"


def test_keywords_case_insensitive() -> None:
    """Keywords are case-insensitive."""
    out = after_login([b"stat\r\n", b"StAt\r\n"])
    assert out == b"+OK 2 41\r\n+OK 2 41\r\n"


def test_transaction_commands_refused_before_login() -> None:
    """STAT/LIST/RETR/DELE before login are refused."""
    out = both_ways([b"STAT\r\n", b"LIST\r\n", b"RETR 1\r\n", b"DELE 1\r\n", b"NOOP\r\n"])
    assert out == GREETING + b"-ERR command not valid in this state\r\n" * 5


def test_auth_commands_refused_after_login() -> None:
    """USER/PASS/APOP after login are refused."""
    out = after_login([b"USER alice\r\n", b"PASS secret\r\n", b"APOP a " + b"0" * 32 + b"\r\n"])
    assert out == b"-ERR command not valid in this state\r\n" * 3


def test_overlong_line_is_refused_and_its_tail_never_runs() -> None:
    """A line over 255 octets is one -ERR; no part of it runs as a command."""
    evil = b"NOOP " + b"A" * 300 + b"QUIT\r\n"
    out = after_login([evil, b"STAT\r\n"])
    assert out == b"-ERR line too long\r\n+OK 2 41\r\n"


def test_line_of_exactly_255_octets_is_a_command() -> None:
    """A command line of 255 octets including CRLF is accepted."""
    line = b"USER " + b"a" * 248 + b"\r\n"
    assert len(line) == 255
    assert both_ways([line]) == GREETING + b"+OK send PASS\r\n"


def test_bad_command_budget_closes() -> None:
    """After 20 consecutive bad commands the server closes the connection."""
    out, driver = transcript([b"BOGUS\r\n"] * 25)
    assert out.count(b"-ERR unknown command") == 20
    assert out.endswith(b"-ERR too many bad commands, closing\r\n")
    assert driver.closed == "too many errors"


def test_good_command_resets_budget() -> None:
    """The error budget counts consecutive errors only."""
    _, driver = transcript([b"BOGUS\r\n"] * 19 + [b"CAPA\r\n"] + [b"BOGUS\r\n"] * 19)
    assert driver.closed is None


def test_pipelining_answers_in_order() -> None:
    """Many commands in one read are all answered, in order (RFC 2449 PIPELINING)."""
    out = after_login([b"NOOP\r\nSTAT\r\nLIST 1\r\nNOOP\r\n" * 50])
    assert out == b"+OK\r\n+OK 2 41\r\n+OK 1 21\r\n+OK\r\n" * 50


def test_bare_lf_commands_accepted() -> None:
    """A command ended by a bare LF is accepted, as Dovecot does."""
    assert both_ways([b"QUIT\n"]) == GREETING + b"+OK pop3d signing off\r\n"


def test_capa_authorization() -> None:
    """CAPA before login lists USER, UIDL, TOP, PIPELINING, RESP-CODES, EXPIRE, IMPLEMENTATION."""
    out = both_ways([b"CAPA\r\n"])
    assert out == GREETING + (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nUSER\r\nUTF8 USER\r\nEXPIRE NEVER\r\nIMPLEMENTATION pop3d\r\n.\r\n"
    )


def test_capa_transaction_repeats_user_but_not_stls() -> None:
    """CAPA after login still lists USER (RFC 2449 §5: both states), but not STLS or UTF8."""
    out = after_login([b"CAPA\r\n"])
    assert out == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nUSER\r\nEXPIRE NEVER\r\nIMPLEMENTATION pop3d\r\n.\r\n"
    )


def test_stls_offered_and_input_after_it_discarded() -> None:
    """STLS is +OK, and commands sent after it in the clear are never answered."""
    settings = Pop3Settings(tls_available=True)
    out, driver = transcript([b"CAPA\r\nSTLS\r\nCAPA\r\nUSER x\r\n"], settings=settings)
    assert out.count(b"STLS\r\n") == 1  # listed once, in the first CAPA
    assert out.endswith(b"+OK Begin TLS negotiation now\r\n")
    assert driver.tls_started == 1


def test_stls_twice_and_capa_after() -> None:
    """After TLS is up, STLS is refused and CAPA no longer lists it."""
    settings = Pop3Settings(tls_available=True)
    driver = FakeDriver()
    conn = Pop3Connection(settings)
    driver.run(conn)
    conn.receive_data(b"STLS\r\n")
    driver.run(conn)
    conn.receive_data(b"STLS\r\nCAPA\r\n")
    out = driver.run(conn)
    assert out.startswith(b"-ERR TLS is already active\r\n")
    assert b"STLS" not in out.split(b"\r\n", 1)[1]


def test_stls_not_available_without_tls() -> None:
    """STLS without a TLS configuration is refused."""
    assert both_ways([b"STLS\r\n"]) == GREETING + b"-ERR STLS is not available\r\n"


def test_plaintext_refused_on_insecure_connection() -> None:
    """USER/PASS on a cleartext connection outside secure networks get -ERR [AUTH]."""
    settings = Pop3Settings(plaintext_allowed=False, tls_available=True)
    out, _ = transcript([b"CAPA\r\n", *LOGIN], settings=settings)
    assert b"\r\nUSER\r\n" not in out
    assert out.endswith(
        b"-ERR [AUTH] plaintext authentication disallowed on non-secure connections\r\n" * 2
    )


def test_apop_disabled_by_default() -> None:
    """APOP is refused when not enabled."""
    out = both_ways([b"APOP alice " + b"a" * 32 + b"\r\n"])
    assert out == GREETING + b"-ERR APOP is not enabled\r\n"


def test_vanished_message() -> None:
    """A message removed under the session is -ERR for it, and the session goes on."""
    driver = FakeDriver(messages=MSGS, vanished={"uid-a"})
    out, _ = transcript([*LOGIN, b"RETR 1\r\n", b"RETR 2\r\n"], driver=driver)
    assert b"-ERR message was removed by another session\r\n+OK 20 octets\r\n" in out


def test_utf8_user_names() -> None:
    """After UTF8 (RFC 6856) a UTF-8 user name is a name; before it, an unknown user's."""
    driver = FakeDriver(users={"jörg": b"pw", "alice": b"secret"})
    before, _ = transcript(["USER jörg\r\n".encode(), b"PASS pw\r\n"], driver=driver)
    unknown, _ = transcript([b"USER nobody\r\n", b"PASS pw\r\n"], driver=FakeDriver())
    after = both_ways([b"UTF8\r\n", "USER jörg\r\n".encode()])
    assert before == unknown == GREETING + b"+OK send PASS\r\n-ERR [AUTH] invalid password\r\n"
    assert after == GREETING + b"+OK UTF8 enabled\r\n+OK send PASS\r\n"


def test_password_with_spaces() -> None:
    """PASS takes the rest of the line: passwords may contain spaces."""
    driver = FakeDriver(users={"bob": b"two words"})
    out, _ = transcript([b"USER bob\r\n", b"PASS two words\r\n"], driver=driver)
    assert out.endswith(b"+OK bob's maildrop has 0 messages (0 octets)\r\n")


def test_state_after_quit_is_closed() -> None:
    """After the sign-off nothing more is read or answered."""
    conn = Pop3Connection(Pop3Settings())
    driver = FakeDriver()
    driver.run(conn)
    conn.receive_data(b"QUIT\r\nNOOP\r\n")
    out = driver.run(conn)
    assert out == b"+OK pop3d signing off\r\n"
    assert conn.state is State.CLOSED


def test_big_message_as_pieces_is_the_same_octets() -> None:
    """A big stuffed chunk taken as pieces (for one writev) sends what the joined form does."""
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\n"
    big = b"".join(b"." + line if i % 101 == 0 else line for i in range(8_000))
    messages = [("uid-big", big), ("uid-small", b".\n..\nend")]
    outputs = []
    for pieces in (False, True):
        driver = FakeDriver(messages=messages, chunk=1 << 17, pieces=pieces)
        out, _ = transcript([*LOGIN, b"RETR 1\r\nTOP 1 3\r\nRETR 2\r\nQUIT\r\n"], driver=driver)
        outputs.append(out)
    assert outputs[0] == outputs[1]
    w = wire(big)
    stuffed = (b"." + w if w.startswith(b".") else w).replace(b"\r\n.", b"\r\n..")
    assert b"\r\n" + stuffed + b".\r\n" in outputs[1]


def test_each_message_is_stuffed_from_its_own_start() -> None:
    """A message fed without a final line end does not leave the next one mid-line.

    (The session's stuffer serves every message; its first line's dot is stuffed anew.)
    """
    core = Pop3Connection(Pop3Settings())
    core.receive_data(b"USER alice\r\nPASS secret\r\n")
    assert type(core.next_event()).__name__ == "PasswordAuthenticate"
    core.auth_succeeded(Principal("alice"))
    assert type(core.next_event()).__name__ == "OpenMaildrop"
    core.maildrop_opened([MessageInfo("a", 5), MessageInfo("b", 6)])
    core.data_to_send()
    for n, body in ((1, b"x\r\n.y"), (2, b".z\r\n")):
        core.receive_data(b"RETR %d\r\n" % n)
        assert type(core.next_event()).__name__ == "SendMessage"
        core.message_data(body)
        core.message_end()
    assert core.data_to_send() == (
        b"+OK 5 octets\r\nx\r\n..y\r\n.\r\n+OK 6 octets\r\n..z\r\n.\r\n"
    )


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"FOOO ", "trailing space after command"),  # checked before the keyword is looked up
        (b"FOOO a\x00", "NUL in command"),
        (b"FOOO a", "unknown command"),
        (b"STAT a", "this command takes no argument"),
        (b"STAT a\x00", "NUL in command"),
        (b"STAT ", "trailing space after command"),
        (b"ST\x00T", "unknown command"),
        (b"STATS", "unknown command"),
        (b"USER ", "trailing space after command"),
        (b"PASS a\x00b", "NUL in command"),
        (b"RETR", "a message number is required"),
    ],
)
def test_parse_refusals_in_check_order(line: bytes, reason: str) -> None:
    """The reason of a refused line follows the checks' order, whichever path finds it."""
    parsed = c.parse(line)
    assert isinstance(parsed, c.ParseError)
    assert parsed.reason == reason


def test_commands_without_arguments_are_shared_and_equal() -> None:
    assert c.parse(b"stat") is c.parse(b"STAT") == c.Stat()
    assert c.parse(b"Quit") == c.Quit()
