"""Property tests: arbitrary input never breaks the core (h11 fuzz invariant, h2 state tests)."""

from __future__ import annotations

import re
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3d.protocol import Pop3Connection, Pop3Settings, replies
from pop3d.protocol import commands as c
from pop3d.protocol.lines import OVERLONG, LineBuffer
from pop3d.protocol.replies import DotStuffer, TopFilter
from pop3d.protocol.states import State
from tests.protocol.driver import FakeDriver, wire

MSGS = [("a", b"Subject: x\r\n\r\n.body\r\n"), ("b", b".\n..\nend")]
KEYWORDS = [b"USER alice", b"PASS secret", b"STAT", b"LIST", b"LIST 1", b"RETR 1", b"RETR 2",
            b"TOP 1 0", b"TOP 2 1", b"DELE 1", b"DELE 2", b"RSET", b"NOOP", b"UIDL", b"UIDL 2",
            b"CAPA", b"QUIT", b"APOP alice " + b"0" * 32, b"STLS", b"UTF8", b"AUTH", b"XXXX"]


def _replies_well_formed(out: bytes) -> None:
    """Every reply line is +OK/-ERR, or a multi-line body item, or the terminator.

    The lines are walked in order: a multi-line reply (its status line is one of the
    commands that have one) runs to its ``.`` line, and its items are dot-stuffed; every
    other line is a status line of its own, or a SASL challenge (``+ ...``).
    """
    assert out.startswith(b"+OK")
    assert out.endswith(b"\r\n")
    lines = out.split(b"\r\n")[:-1]
    i = 0
    while i < len(lines):
        line = lines[i]
        assert line.startswith((b"+OK", b"-ERR", b"+ ")) or line == b"+", line
        assert not any(bad in line for bad in (b"\r", b"\n", b"Traceback", b"Error")), line
        i += 1
        if line.startswith(b"+OK") and i < len(lines) and _opens_body(line, lines[i:]):
            while lines[i] != b".":  # the body, up to its terminator
                assert not lines[i].startswith(b".") or lines[i].startswith(b".."), lines[i]
                i += 1
                assert i < len(lines), "a multi-line reply without its terminator"
            i += 1


#: The status lines of pop3d's multi-line replies (CAPA, LIST, UIDL, RETR, TOP).
_MULTILINE = re.compile(
    rb"\+OK (Capability list follows|unique-id listing follows|top of message follows"
    rb"|\d+ octets|\d+ messages? \(\d+ octets\))"
)


def _opens_body(status: bytes, rest: list[bytes]) -> bool:
    """Whether the +OK line ``status`` begins a multi-line reply.

    A bare ``+OK`` does for AUTH without a mechanism (the mechanisms' names follow) and
    does not for NOOP and the others (a status line follows, or nothing).
    """
    if _MULTILINE.fullmatch(status):
        return True
    return status == b"+OK" and bool(rest) and (
        rest[0] == b"." or re.fullmatch(rb"[A-Z0-9_-]+", rest[0]) is not None
    )


def test_the_reply_check_reads_every_line() -> None:
    """The check above fails on a bad line anywhere, not only at the ends."""
    _replies_well_formed(b"+OK hi\r\n+OK 2 octets\r\n..x\r\n.\r\n-ERR no\r\n+OK\r\nPLAIN\r\n.\r\n")
    for broken in (
        b"+OK hi\r\nnot a reply\r\n+OK bye\r\n",
        b"+OK 2 octets\r\n.x\r\n.\r\n+OK\r\n",  # an unstuffed dot line
        b"+OK hi\r\n+OK 2 octets\r\nab\r\n",  # no terminator
        b"+OK hi\r\n-ERR Traceback (most recent call last)\r\n",
    ):
        with pytest.raises(AssertionError):
            _replies_well_formed(broken)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12), st.booleans())
def test_arbitrary_bytes_never_raise(chunks: list[bytes], logged_in: bool) -> None:
    """Any bytes, in any chunking, get +OK, -ERR or a close, and never an exception."""
    conn = Pop3Connection(Pop3Settings(tls_available=True))
    driver = FakeDriver(messages=MSGS)
    out = [driver.run(conn)]
    if logged_in:
        conn.receive_data(b"USER alice\r\nPASS secret\r\n")
        out.append(driver.run(conn))
    for chunk in chunks:
        conn.receive_data(chunk)
        out.append(driver.run(conn))
    _replies_well_formed(b"".join(out))
    lines = b"".join(chunks).split(b"\n")[:-1]  # complete lines only
    if not any(line.removesuffix(b"\r").upper() == b"QUIT" for line in lines):
        assert driver.updates == []  # only a QUIT line ever leads to UPDATE


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(KEYWORDS), max_size=30), st.booleans())
def test_any_command_sequence_keeps_a_valid_state(cmds: list[bytes], eof: bool) -> None:
    """Every command in every state answers, and the state stays one of the four."""
    conn = Pop3Connection(Pop3Settings(tls_available=True))
    driver = FakeDriver(messages=MSGS)
    out = [driver.run(conn)]
    for cmd in cmds:
        conn.receive_data(cmd + b"\r\n")
        out.append(driver.run(conn))
        assert conn.state in State
    if eof:
        conn.receive_data(b"")
        out.append(driver.run(conn))
        assert conn.state is State.CLOSED
    _replies_well_formed(b"".join(out))
    # Update happens only as the result of QUIT in TRANSACTION, once.
    assert len(driver.updates) <= 1


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_stuffing_is_chunking_independent(body: bytes, cuts: list[int]) -> None:
    """Stuffing a message in chunks gives the same bytes as stuffing it whole, and unstuffs back."""
    data = wire(body)
    whole = DotStuffer()
    expected = b"".join(whole.feed(data)) + whole.end()
    stuffer = DotStuffer()
    out: list[bytes | memoryview] = []
    pos = 0
    i = 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        out += stuffer.feed(data[pos : pos + step])
        pos += step
        i += 1
    out.append(stuffer.end())
    assert b"".join(out) == expected
    lines = expected.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    unstuffed = [ln[1:] if ln.startswith(b".") else ln for ln in lines[:-2]]
    assert b"\r\n".join(unstuffed) + b"\r\n" == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 5), st.integers(1, 40))
def test_top_filter_matches_reference(body: bytes, n: int, step: int) -> None:
    """TOP in chunks equals the reference: header, blank line, n body lines."""
    data = wire(body)
    lines = data.split(b"\r\n")[:-1]
    try:
        blank = lines.index(b"")
    except ValueError:
        expected = data
    else:
        kept = lines[: blank + 1 + n]
        expected = b"".join(ln + b"\r\n" for ln in kept)
    top = TopFilter(n)
    got = []
    for i in range(0, len(data), step):
        got.append(top.feed(data[i : i + step]))
        if top.done:
            break
    assert b"".join(got) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=20), st.integers(5, 40))
def test_line_buffer_bounds_and_order(chunks: list[bytes], limit: int) -> None:
    """Lines come out in order; nothing over the limit ever comes out; memory stays bounded."""
    buf = LineBuffer()
    data = b"".join(chunks)
    got: list[bytes | object] = []
    for chunk in chunks:
        buf.feed(chunk)
        while (line := buf.next_line(limit)) is not None:
            got.append(line)
        assert len(buf) < limit + 80
    expected: list[bytes | object] = [
        OVERLONG if len(raw) + 1 > limit else raw.removesuffix(b"\r")
        for raw in data.split(b"\n")[:-1]
    ]
    # An overlong tail without LF may leave the buffer discarding; compare complete lines.
    assert [g for g in got if g is not OVERLONG] == [e for e in expected if e is not OVERLONG]
    for g in got:
        assert g is OVERLONG or len(g) < limit  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.binary(max_size=80), st.integers(0, 3), st.booleans()), max_size=20),
    st.integers(5, 40),
)
def test_line_buffer_lines_taken_late(
    feeds: list[tuple[bytes, int, bool]], limit: int
) -> None:
    """Lines left untaken while more arrives (a paused core) come out the same, as bytes.

    Covers the buffer's three shapes: the received bytes kept as they are, a tail moved
    into a bytearray, and that bytearray extended; a fed bytearray changed afterwards
    changes nothing taken later.
    """
    buf = LineBuffer()
    got: list[bytes | object] = []
    for chunk, take, as_bytearray in feeds:
        if as_bytearray:
            fed = bytearray(chunk)
            buf.feed(fed)  # type: ignore[arg-type]  # what a reused receive buffer would do
            fed[:] = b"\n" * len(fed)
        else:
            buf.feed(chunk)
        for _ in range(take):
            if (line := buf.next_line(limit)) is None:
                break
            got.append(line)
    while (line := buf.next_line(limit)) is not None:
        got.append(line)
    data = b"".join(chunk for chunk, _, _ in feeds)
    expected = [raw.removesuffix(b"\r") for raw in data.split(b"\n")[:-1] if len(raw) < limit]
    assert [g for g in got if g is not OVERLONG] == expected
    assert all(type(g) is bytes for g in got if g is not OVERLONG)


def _stuffed_by_lines(data: bytes) -> bytes:
    """The RFC 1939 rule, one line at a time: the reference for :class:`DotStuffer`."""
    lines = data.split(b"\n")
    return b"\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([b".", b"\r\n", b"\n", b"x", b"..", b"abc def", b"." * 9]),
             max_size=1500),
    st.integers(1, 5000),
)
def test_stuffing_matches_the_line_rule_sparse_or_dense(tokens: list[bytes], step: int) -> None:
    """Dense dots (the regex path) and sparse dots (the find walk) stuff alike, per the rule.

    The walk runs on chunks of 64 KiB and more; here it is made to run on every chunk
    too, so that hypothesis's small examples reach both paths.
    """
    data = b"".join(tokens)
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    for walk_min in (replies._WALK_MIN, 1):
        with patch.object(replies, "_WALK_MIN", walk_min):
            stuffer = DotStuffer()
            pieces = [p for chunk in chunks for p in stuffer.feed(chunk)]
        assert b"".join(pieces) == _stuffed_by_lines(data)  # what a writev of them sends


def test_sparse_dots_in_a_big_chunk_are_stuffed() -> None:
    """A megabyte of attachment-like lines with a few dot lines, in one chunk and split."""
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=" * 2 + b"\r\n"
    data = b"".join(line if i % 997 else b"." + line for i in range(15_000))
    for step in (len(data), 1 << 16, 4093):
        stuffer = DotStuffer()
        chunks = [data[i : i + step] for i in range(0, len(data), step)]
        out = b"".join(p for chunk in chunks for p in stuffer.feed(chunk))
        assert out == _stuffed_by_lines(data)
        assert out.count(b"\n..") == data.count(b"\n.")


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.booleans())
def test_argument_octets_are_judged_octet_by_octet(arg: bytes, utf8: bool) -> None:
    """USER and PASS accept exactly the octets the RFC rules name, whatever the mix.

    Written out per octet here, as the parser once did it, against its one-call checks.
    """
    printable = all(0x21 <= b <= 0x7E for b in arg)
    user = c.parse(b"USER " + arg, utf8=utf8)
    if printable:
        assert user == c.User(arg.decode("ascii"))
    elif not utf8 and all(b > 0x20 and b != 0x7F for b in arg):
        # Non-ASCII before UTF8: a name no account can have (answered as an unknown user).
        assert user == c.User(arg.decode("ascii", "surrogateescape"))
    elif not utf8:
        assert isinstance(user, c.ParseError)
    password_ok = b"\x00" not in arg and (utf8 or all(0x20 <= b <= 0x7E for b in arg))
    password = c.parse(b"PASS " + arg, utf8=utf8)
    assert (password == c.Pass(arg)) is password_ok
    assert isinstance(password, c.ParseError) is not password_ok
