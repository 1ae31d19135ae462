"""The values the core shares with the backends: who a user is, what a message is.

The core owns them so that it imports nothing of pop3d outside :mod:`pop3d.protocol`;
the backends' interfaces (:mod:`pop3d.auth.base`, :mod:`pop3d.storage.base`) use them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

_T = TypeVar("_T")


def quick_init(cls: type[_T]) -> type[_T]:
    """Give a frozen dataclass with slots an ``__init__`` that stores through its slots.

    A frozen dataclass's own ``__init__`` sets each field with ``object.__setattr__``;
    the slot's own ``__set__`` does the same store for about half the cost on CPython
    3.11 (figures: docs/performance.md, core14).  The class stays
    what it was (frozen, equal and hashed by value, matchable); only its construction is
    cheaper.  The ``__init__`` has the same parameters and defaults, generated like
    dataclasses' own.  For the objects the core makes for every session.
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    namespace: dict[str, object] = {"_missing": dataclasses.MISSING}
    params = []
    body = []
    for f in fields:
        if not f.init or f.kw_only or f.name not in getattr(cls, "__slots__", ()):
            raise TypeError(f"quick_init: {cls.__name__}.{f.name} is not a plain slot field")
        namespace[f"_set_{f.name}"] = cls.__dict__[f.name].__set__
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_missing")
            body.append(f"    if {f.name} is _missing: {f.name} = _factory_{f.name}()\n")
        else:
            params.append(f.name)
        body.append(f"    _set_{f.name}(self, {f.name})\n")
    exec(f"def __init__(self, {', '.join(params)}):\n{''.join(body)}", namespace)  # noqa: S102
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"  # type: ignore[attr-defined]
    cls.__init__ = init  # type: ignore[method-assign,assignment]
    return cls


@quick_init
@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated (or looked-up) user."""

    #: The canonical user name, as the backend spells it.
    username: str
    #: Extra fields of the user's record (home, quota, ...); opaque to the protocol core.
    attributes: Mapping[str, str] = field(default_factory=dict)


@quick_init
@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a maildrop, as the session sees it."""

    #: 1-70 characters in 0x21-0x7E, stable across sessions (RFC 1939 §7).
    uid: str
    #: Octets as sent: CRLF line ends, before byte-stuffing, final CRLF included.
    size: int
