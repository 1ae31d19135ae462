"""The fault catalogue of the test server: what it can get wrong on purpose, and when.

A fault is a small record: a ``kind`` (one of :data:`KINDS`), its parameters, and whom it
hits: ``user`` (None: every session) and ``times`` (None: until removed; N: the next N
times it fires, then it is gone).  The same record comes from Python
(``srv.faults.add("login", code="IN-USE", user="alice")``) and from JSON over the
``pop3d testserver`` HTTP API (``{"kind": "login", "code": "IN-USE", "user": "alice"}``):
:func:`parse` is the one way in for both.  Faults can be added and removed while the
server runs; each session looks them up when it needs them.

Where each kind acts (none of them is in the production code path):

* ``login``: in wrappers of the authenticator, the mail store and the login-delay policy
  (:mod:`pop3d.testing.backends`), so the refusal goes through the session's one path
  and the core words it, as it would a real one;
* ``capa`` (STLS and SASL parts): in the settings each connection gets;
* every other kind: in the bytes the core sends, rewritten by the test server's
  transport (:mod:`pop3d.testing.wire`);
* ``certificate``: the server's certificate is swapped (as a reload would).

The catalogue with the client bug each fault catches is docs/testing-clients.md.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "Fault", "FaultError", "FaultTable", "parse"]

#: The response codes a ``login`` fault can refuse with (RFC 2449, RFC 3206).
LOGIN_CODES = ("IN-USE", "SYS/TEMP", "SYS/PERM", "LOGIN-DELAY", "AUTH")

#: Certificate problems a ``certificate`` fault can give the server.
CERTIFICATE_PROBLEMS = ("expired", "wrong-host")

#: Capabilities whose hiding also makes the command refused: read-only commands, whose
#: refusal leaves the session's state as it was.
REFUSABLE = ("UIDL", "TOP")

#: The capabilities (CAPA tags) a ``capa`` fault may hide; "SASL X" hides one mechanism.
HIDEABLE = (
    "CAPA", "STLS", "SASL", "UIDL", "TOP", "USER", "PIPELINING", "RESP-CODES",
    "AUTH-RESP-CODE", "UTF8", "EXPIRE", "LOGIN-DELAY", "IMPLEMENTATION",
)


class FaultError(ValueError):
    """A fault that cannot be made: unknown kind, missing or bad parameter."""


@dataclass
class Fault:
    """One fault as set: its kind, parameters, and whom it hits."""

    kind: str
    params: dict[str, Any]
    #: Only sessions of this user (None: every session).
    user: str | None = None
    #: How many more times it fires (None: until removed).
    times: int | None = None
    id: int = 0

    def to_json(self) -> dict[str, Any]:
        """The fault as the HTTP API shows it (the form :func:`parse` reads, plus ``id``)."""
        return {"id": self.id, "kind": self.kind, "user": self.user, "times": self.times,
                **self.params}


# ------------------------------------------------------------------ parameter checks


def _str(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise FaultError(f"{name} must be a non-empty string")
    return value


def _opt_str(value: object, name: str) -> str | None:
    return None if value is None else _str(value, name)


def _number(value: object, name: str, *, low: float = 0.0, high: float = 3600.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultError(f"{name} must be a number")
    if not low <= value <= high:
        raise FaultError(f"{name} must be between {low} and {high}")
    return float(value)


def _int(value: object, name: str, *, low: int = 0, high: int = 1 << 30) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FaultError(f"{name} must be an integer")
    if not low <= value <= high:
        raise FaultError(f"{name} must be between {low} and {high}")
    return value


def _words(value: object, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, str) and v and "\r" not in v and "\n" not in v for v in value
    ):
        raise FaultError(f"{name} must be a list of one-line strings")
    return [str(v) for v in value]


def _command(value: object) -> str | None:
    """A POP3 command name (upper case), ``greeting``, or None (every reply)."""
    if value is None:
        return None
    text = _str(value, "command")
    return text.upper()


# ------------------------------------------------------------------ the kinds


@dataclass(frozen=True)
class Kind:
    """One kind of fault: its parameters' checker and whether it can target a user."""

    name: str
    summary: str
    check: Callable[[dict[str, Any]], dict[str, Any]]
    per_user: bool = True
    #: The parameters and their defaults, for the OpenAPI document.
    params: Mapping[str, Any] = field(default_factory=dict)


def _capa(p: dict[str, Any]) -> dict[str, Any]:
    hide = [h.upper() for h in _words(p.pop("hide", []), "hide")]
    for item in hide:
        if item.split(" ", 1)[0] not in HIDEABLE:
            raise FaultError(f"cannot hide {item!r} (one of {', '.join(HIDEABLE)})")
    add = _words(p.pop("add", []), "add")
    if not hide and not add:
        raise FaultError("capa needs hide or add")
    return {"hide": hide, "add": add}


def _login(p: dict[str, Any]) -> dict[str, Any]:
    code = _str(p.pop("code", "AUTH"), "code").upper()
    if code not in LOGIN_CODES:
        raise FaultError(f"code must be one of {', '.join(LOGIN_CODES)}")
    return {"code": code}


def _latency(p: dict[str, Any]) -> dict[str, Any]:
    return {"seconds": _number(p.pop("seconds", 1.0), "seconds", high=600.0),
            "command": _command(p.pop("command", None))}


def _cut(p: dict[str, Any]) -> dict[str, Any]:
    return {"after": _int(p.pop("after", 100), "after")}


def _list_size(p: dict[str, Any]) -> dict[str, Any]:
    return {"delta": _int(p.pop("delta", 100), "delta", low=-(1 << 30))}


def _nothing(p: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG001 (no parameters)
    return {}


def _garbage(p: dict[str, Any]) -> dict[str, Any]:
    text = p.pop("text", "\x00\x7f\xff garbage \x1b[2J")
    if not isinstance(text, str) or "\n" in text or "\r" in text:
        raise FaultError("text must be a one-line string")
    return {"command": _command(p.pop("command", "greeting")), "text": text}


def _overlong(p: dict[str, Any]) -> dict[str, Any]:
    return {"command": _command(p.pop("command", "greeting")),
            "length": _int(p.pop("length", 4096), "length", low=513, high=1 << 20)}


def _certificate(p: dict[str, Any]) -> dict[str, Any]:
    problem = _str(p.pop("problem", "expired"), "problem")
    if problem not in CERTIFICATE_PROBLEMS:
        raise FaultError(f"problem must be one of {', '.join(CERTIFICATE_PROBLEMS)}")
    return {"problem": problem}


#: Every kind of fault, by name.
KINDS: Mapping[str, Kind] = {
    k.name: k
    for k in (
        Kind("capa", "hide or add capabilities (CAPA, STLS, SASL, SASL <mech>, UIDL, TOP...)",
             _capa, per_user=False, params={"hide": [], "add": []}),
        Kind("login", "refuse logins with -ERR [code]", _login, params={"code": "AUTH"}),
        Kind("latency", "delay the reply to a command (or every reply)", _latency,
             params={"seconds": 1.0, "command": None}),
        Kind("cut_retr", "cut the connection after N octets of a RETR reply", _cut,
             params={"after": 100}),
        Kind("list_size", "report wrong sizes in LIST", _list_size, params={"delta": 100}),
        Kind("uidl_duplicate", "give every second message its predecessor's UIDL",
             _nothing),
        Kind("uidl_change", "give messages new UIDLs in every session", _nothing),
        Kind("garbage", "replace a reply's first line with garbage", _garbage,
             params={"command": "greeting", "text": "\x00\x7f\xff garbage \x1b[2J"}),
        Kind("overlong", "pad a reply's first line past RFC 1939's 512 octets", _overlong,
             params={"command": "greeting", "length": 4096}),
        Kind("certificate", "serve an expired or wrong-host certificate", _certificate,
             per_user=False, params={"problem": "expired"}),
    )
}


def parse(spec: Mapping[str, Any]) -> Fault:
    """Make a :class:`Fault` from its JSON form ``{"kind": ..., params..., "user", "times"}``.

    Raises:
        FaultError: unknown kind or parameter, or a bad value.

    """
    p = dict(spec)
    p.pop("id", None)
    kind = KINDS.get(str(p.pop("kind", "")))
    if kind is None:
        raise FaultError(f"kind must be one of {', '.join(KINDS)}")
    user = _opt_str(p.pop("user", None), "user")
    times = p.pop("times", None)
    if times is not None:
        times = _int(times, "times", low=1)
    if user is not None and not kind.per_user:
        raise FaultError(f"a {kind.name} fault acts before login: it takes no user")
    params = kind.check(p)
    if p:
        raise FaultError(f"unknown parameter(s) of {kind.name}: {', '.join(sorted(p))}")
    return Fault(kind.name, params, user, times)


class FaultTable:
    """The faults in force; shared by the test's thread and the server's.

    Readers take a snapshot (a tuple replaced whole under a lock), so a session never sees
    a half-made change.  ``on_change`` is called after every change (the test server
    swaps its certificate there).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: tuple[Fault, ...] = ()
        self._ids = itertools.count(1)
        self.on_change: Callable[[], None] | None = None

    def add(self, kind: str | Mapping[str, Any], **params: Any) -> Fault:
        """Add a fault: ``add("login", code="IN-USE", user="alice")`` or its JSON mapping."""
        spec = dict(kind) if isinstance(kind, Mapping) else {"kind": kind}
        spec.update(params)
        fault = parse(spec)
        with self._lock:
            fault.id = next(self._ids)
            self._faults = (*self._faults, fault)
        self._changed()
        return fault

    def remove(self, fault: Fault | int) -> bool:
        """Remove a fault (or its id); False if it was not there."""
        ident = fault.id if isinstance(fault, Fault) else fault
        with self._lock:
            kept = tuple(f for f in self._faults if f.id != ident)
            found = len(kept) != len(self._faults)
            self._faults = kept
        if found:
            self._changed()
        return found

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults = ()
        self._changed()

    def __iter__(self) -> Any:
        return iter(self._faults)

    def __len__(self) -> int:
        return len(self._faults)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def find(self, kind: str, user: str | None = None,
             match: Callable[[Fault], bool] | None = None) -> Fault | None:
        """The first fault of ``kind`` for ``user`` (without using it up)."""
        for fault in self._faults:
            if fault.kind != kind or (fault.user is not None and fault.user != user):
                continue
            if match is None or match(fault):
                return fault
        return None

    def take(self, kind: str, user: str | None = None,
             match: Callable[[Fault], bool] | None = None) -> Fault | None:
        """The first fault of ``kind`` for ``user``, counting one use of it."""
        with self._lock:
            fault = self.find(kind, user, match)
            if fault is None or fault.times is None:
                return fault
            fault.times -= 1
            if fault.times <= 0:
                self._faults = tuple(f for f in self._faults if f is not fault)
        return fault


def describe() -> list[dict[str, Any]]:
    """The catalogue as JSON: name, summary, parameters with defaults, per-user or not."""
    return [
        {"kind": k.name, "summary": k.summary, "per_user": k.per_user,
         "params": dict(k.params)}
        for k in KINDS.values()
    ]

