"""POP3 commands as frozen dataclasses, and the strict parser that makes them.

Rules (RFC 1939 §3, RFC 2449 §4, popa3d ``pop_get_int``):

* A keyword is 3-4 ASCII letters or digits (``UTF8``), case-insensitive, followed by
  arguments each separated by exactly one space.  Arguments are printable ASCII
  (0x21-0x7E) and at most 40 characters (RFC 2449), except where noted below.
* ``PASS`` takes the rest of the line (RFC 1939 allows spaces in passwords) and so does
  the initial response of ``AUTH``; both are bounded by the line limit only.
* Message numbers are ASCII digits only, at most :data:`limits.MAX_NUMBER_DIGITS` of them:
  ``int()`` would also take ``+1``, `` 1 ``, ``1_0`` and non-ASCII digits.
* After ``UTF8`` (RFC 6856) the user name and password may be UTF-8; they must decode.
* The parser never echoes input: a :class:`ParseError` carries our own reason text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pop3d.protocol import limits
from pop3d.protocol.values import quick_init


@quick_init
@dataclass(frozen=True, slots=True)
class User:
    """``USER name``."""

    name: str


@quick_init
@dataclass(frozen=True, slots=True)
class Pass:
    """``PASS string`` (the password is kept as bytes and never logged)."""

    password: bytes

    def __repr__(self) -> str:
        return "Pass(password=<hidden>)"


@quick_init
@dataclass(frozen=True, slots=True)
class Apop:
    """``APOP name digest``."""

    name: str
    digest: str


@quick_init
@dataclass(frozen=True, slots=True)
class Auth:
    """``AUTH [mechanism [initial-response]]`` (RFC 5034)."""

    mechanism: str | None
    initial_response: bytes | None

    def __repr__(self) -> str:
        return f"Auth(mechanism={self.mechanism!r}, initial_response=<hidden>)"


@dataclass(frozen=True, slots=True)
class Quit:
    """``QUIT``."""


@dataclass(frozen=True, slots=True)
class Stat:
    """``STAT``."""


@quick_init
@dataclass(frozen=True, slots=True)
class List:
    """``LIST [msg]``."""

    msg: int | None


@quick_init
@dataclass(frozen=True, slots=True)
class Retr:
    """``RETR msg``."""

    msg: int


@quick_init
@dataclass(frozen=True, slots=True)
class Dele:
    """``DELE msg``."""

    msg: int


@dataclass(frozen=True, slots=True)
class Noop:
    """``NOOP``."""


@dataclass(frozen=True, slots=True)
class Rset:
    """``RSET``."""


@quick_init
@dataclass(frozen=True, slots=True)
class Top:
    """``TOP msg n``."""

    msg: int
    lines: int


@quick_init
@dataclass(frozen=True, slots=True)
class Uidl:
    """``UIDL [msg]``."""

    msg: int | None


@dataclass(frozen=True, slots=True)
class Capa:
    """``CAPA`` (RFC 2449)."""


@dataclass(frozen=True, slots=True)
class Stls:
    """``STLS`` (RFC 2595)."""


@dataclass(frozen=True, slots=True)
class Utf8:
    """``UTF8`` (RFC 6856)."""


Command = (
    User | Pass | Apop | Auth | Quit | Stat | List | Retr | Dele | Noop | Rset | Top | Uidl
    | Capa | Stls | Utf8
)


@quick_init
@dataclass(frozen=True, slots=True)
class ParseError:
    """A line that is not a valid command; ``reason`` is our text for the ``-ERR``."""

    reason: str


#: Printable ASCII, for ``bytes.translate`` to delete: what is left was not printable
#: (one C call per argument instead of a Python test per octet).
_PRINTABLE_OCTETS = bytes(range(0x21, 0x7F))
#: What a password may hold without UTF8: printable ASCII and the space.
_PASSWORD_OCTETS = b" " + _PRINTABLE_OCTETS


def _printable(arg: bytes) -> bool:
    """Whether every octet of ``arg`` is printable ASCII (no space)."""
    return not arg.translate(None, _PRINTABLE_OCTETS)


def _number(arg: bytes) -> int | None:
    if not arg or len(arg) > limits.MAX_NUMBER_DIGITS or not arg.isdigit():
        return None  # bytes.isdigit() is ASCII-only: no '+', '_', spaces or other scripts
    return int(arg)


def _text(arg: bytes, utf8: bool) -> str | None:
    """Decode a name argument: printable ASCII, or valid UTF-8 after the UTF8 command."""
    if _printable(arg):
        return arg.decode("ascii")
    if not utf8:
        return None
    try:
        text = arg.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() and " " not in text else None


def _split(rest: bytes, count: int) -> list[bytes] | None:
    """Split ``rest`` into exactly ``count`` single-space separated printable arguments."""
    args = rest.split(b" ") if rest else []
    if len(args) != count:
        return None
    for a in args:
        if not a or len(a) > limits.MAX_ARGUMENT or not _printable(a):
            return None
    return args


#: What parses the arguments of one keyword (``None``: there were none) into its command.
Parser = Callable[[bytes | None, bool], "Command | ParseError"]


def _optional_number(make: type[List | Uidl]) -> Parser:
    def parse(rest: bytes | None, _: bool) -> Command | ParseError:
        if rest is None:
            return make(None)
        n = _number(rest)
        return make(n) if n is not None else ParseError("invalid message number")

    return parse


def _one_number(make: type[Retr | Dele]) -> Parser:
    def parse(rest: bytes | None, _: bool) -> Command | ParseError:
        n = _number(rest) if rest is not None else None
        return make(n) if n is not None else ParseError("a message number is required")

    return parse


def _parse_user(rest: bytes | None, utf8: bool) -> Command | ParseError:
    # User names may be longer than RFC 2449's 40 characters (mail addresses often are);
    # the line limit bounds them.
    name = _text(rest, utf8) if rest else None
    if name is None and rest and not utf8 and min(rest) > 0x20 and 0x7F not in rest:
        # A non-ASCII name before UTF8 (RFC 6856) names no account: it is answered like
        # an unknown user (same replies, same dummy work), not with a telling error.
        # Undecoded octets become lone surrogates, which no backend's user name holds.
        name = rest.decode("ascii", "surrogateescape")
    return User(name) if name else ParseError("USER needs a user name")


def _parse_pass(rest: bytes | None, utf8: bool) -> Command | ParseError:
    if not rest:
        return ParseError("PASS needs a password")
    if 0 in rest or (not utf8 and rest.translate(None, _PASSWORD_OCTETS)):
        return ParseError("invalid characters in password")
    return Pass(rest)


def _parse_apop(rest: bytes | None, utf8: bool) -> Command | ParseError:
    parts = rest.split(b" ") if rest else []
    if len(parts) != 2:
        return ParseError("APOP needs a user name and a digest")
    name = _text(parts[0], utf8)
    digest = parts[1]
    if not name or len(digest) != 32 or not all(c in b"0123456789abcdef" for c in digest):
        return ParseError("APOP needs a user name and a 32-digit hex digest")
    return Apop(name, digest.decode("ascii"))


def _parse_auth(rest: bytes | None) -> Command | ParseError:
    if rest is None:
        return Auth(None, None)
    mech, _, initial = rest.partition(b" ")
    if (
        not mech
        or len(mech) > limits.MAX_ARGUMENT
        or not _printable(mech)
        or (initial and not _printable(initial))
        or rest.endswith(b" ")
    ):
        return ParseError("invalid AUTH arguments")
    return Auth(mech.decode("ascii").upper(), initial or None)


def _parse_top(rest: bytes | None) -> Command | ParseError:
    args = _split(rest, 2) if rest else None
    if args is None:
        return ParseError("TOP needs a message number and a line count")
    msg, lines = _number(args[0]), _number(args[1])
    if msg is None or lines is None:
        return ParseError("invalid number in TOP")
    return Top(msg, lines)


def parse(line: bytes, utf8: bool = False) -> Command | ParseError:
    """Parse one command line (without its CRLF).

    Args:
        line: the line as received.
        utf8: whether the client has enabled UTF-8 with the ``UTF8`` command.

    Returns:
        The command, or a :class:`ParseError` whose reason is safe to send.

    """
    # Every key of the tables is a valid keyword (3-4 ASCII letters or digits), so a
    # keyword found there needs no other check: this is the path of every good command,
    # with one lookup and, for a command without arguments, no call and no new object.
    keyword, sep, rest = line.partition(b" ")
    keyword = keyword.upper()
    parser = _PARSERS.get(keyword)
    if parser is None:
        bare = _BARE.get(keyword)
        if bare is not None and not sep:
            return bare
        return _refusal(keyword, sep, rest, line)
    if not sep:
        return parser(None, utf8)
    if not rest:
        return ParseError("trailing space after command")  # "CMD " with nothing after
    # An int operand: ``b"\x00" in rest`` first tries the bytes as an index and clears
    # the TypeError, several times the cost of the search (CPython 3.11).
    if 0 in rest:
        return ParseError("NUL in command")
    return parser(rest, utf8)


def _refusal(keyword: bytes, sep: bytes, rest: bytes, line: bytes) -> ParseError:
    """Why a line that is no good command without arguments is refused, in check order."""
    if not 3 <= len(keyword) <= 4 or not keyword.isalnum() or not keyword.isascii():
        return ParseError("unknown command")
    if sep and not rest:
        return ParseError("trailing space after command")
    if 0 in line:
        return ParseError("NUL in command")
    if keyword in _BARE:
        return ParseError("this command takes no argument")
    return ParseError("unknown command")


#: The commands that take no argument, each one shared instance (they are immutable and
#: hold nothing): STAT and QUIT make no object.
_BARE: dict[bytes, Command] = {
    b"QUIT": Quit(),
    b"STAT": Stat(),
    b"NOOP": Noop(),
    b"RSET": Rset(),
    b"CAPA": Capa(),
    b"STLS": Stls(),
    b"UTF8": Utf8(),
}

#: The parser of each keyword that takes arguments: one dict lookup, not a comparison
#: per keyword.
_PARSERS: dict[bytes, Parser] = {
    b"USER": _parse_user,
    b"PASS": _parse_pass,
    b"APOP": _parse_apop,
    b"AUTH": lambda rest, _: _parse_auth(rest),
    b"LIST": _optional_number(List),
    b"RETR": _one_number(Retr),
    b"DELE": _one_number(Dele),
    b"TOP": lambda rest, _: _parse_top(rest),
    b"UIDL": _optional_number(Uidl),
}
