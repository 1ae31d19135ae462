"""Fuzz target: the command channel's line splitter and command parser.

Properties, for any octets cut into any chunks:

* :class:`LineBuffer` hands out lines without LF, never longer than the limit, and the
  same lines whatever the chunking (overlong ones as ``OVERLONG``, once each);
* :func:`commands.parse` returns a command or a :class:`ParseError` (never raises), with
  or without UTF8; a ParseError's reason is ours (a fixed text, never the input);
* a parsed command names only what was on the line: its numbers are the digits given.
"""

from __future__ import annotations

from pop3d.protocol import commands as c
from pop3d.protocol import limits
from pop3d.protocol.lines import OVERLONG, LineBuffer, Overlong
from tests.fuzz import harness

#: Every reason the parser may give (grown as the parser grows; an unknown one fails).
_REASONS = frozenset(
    {
        "unknown command",
        "trailing space after command",
        "NUL in command",
        "this command takes no argument",
        "invalid message number",
        "a message number is required",
        "USER needs a user name",
        "PASS needs a password",
        "invalid characters in password",
        "APOP needs a user name and a digest",
        "APOP needs a user name and a 32-digit hex digest",
        "invalid AUTH arguments",
        "TOP needs a message number and a line count",
        "invalid number in TOP",
    }
)


def _lines(pieces: list[bytes], limit: int) -> list[bytes | Overlong]:
    buf = LineBuffer()
    out: list[bytes | Overlong] = []
    for piece in pieces:
        buf.feed(piece)
        while (line := buf.next_line(limit)) is not None:
            out.append(line)
        assert len(buf) <= limit + len(piece), "buffered more than the limit and one chunk"
    return out


def test_one_input(data: bytes) -> None:
    """Check the properties above on one input."""
    split = harness.Split(data)
    limit = split.byte() % 64 + 8 if split.byte() & 1 else limits.MAX_COMMAND_LINE
    utf8 = bool(split.byte() & 1)
    text = split.rest()
    whole = _lines([text], limit)
    cut = _lines(harness.Split(text[::-1]).pieces(text), limit)
    assert whole == cut, "the lines depend on how the input was cut"
    complete = text.count(b"\n")
    assert len(whole) == complete, "a line ending was lost or invented"
    for line in whole:
        if line is OVERLONG:
            continue
        assert isinstance(line, bytes)
        assert b"\n" not in line
        assert len(line) < limit
        cmd = c.parse(line, utf8=utf8)
        if isinstance(cmd, c.ParseError):
            assert cmd.reason in _REASONS, f"unexpected reason {cmd.reason!r}"
            continue
        for number in ("msg", "lines"):
            value = getattr(cmd, number, None)
            if value is not None:
                assert str(value).encode() in line, "a number that was not on the line"


if __name__ == "__main__":
    harness.main("tests.fuzz.fuzz_commands")
