"""``quick_init``: the cheaper ``__init__`` keeps each decorated dataclass what it was."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from dataclasses import dataclass, field

import pytest

from pop3d.protocol import commands, events, values
from pop3d.protocol.values import Principal, quick_init


def _quick_classes() -> list[type]:
    """The dataclasses of the core whose ``__init__`` is ``quick_init``'s (it stores
    through ``_set_<field>``)."""
    return [
        obj
        for module in (commands, events, values)
        for obj in vars(module).values()
        if isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and obj.__module__ == module.__name__
        and "_set_" in "".join(obj.__init__.__code__.co_names)
    ]


QUICK = _quick_classes()


def test_the_per_session_objects_are_quick() -> None:
    names = {cls.__name__ for cls in QUICK}
    for name in ("User", "Pass", "Retr", "PasswordAuthenticate", "OpenMaildrop", "Update",
                 "Closed", "SendMessage", "Principal", "MessageInfo"):
        assert name in names


@pytest.mark.parametrize("cls", QUICK, ids=lambda cls: cls.__name__)
def test_same_parameters_frozen_equal_and_matchable(cls: type) -> None:
    fields = dataclasses.fields(cls)
    params = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        assert (p.default is inspect.Parameter.empty) == (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
    args = [object() for _ in fields]
    obj = cls(*args)
    assert [getattr(obj, f.name) for f in fields] == args
    assert obj == cls(**{f.name: a for f, a in zip(fields, args, strict=True)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, fields[0].name, None)
    assert cls.__dict__["__match_args__"] == tuple(f.name for f in fields)
    with pytest.raises(TypeError):
        cls(*args, None)


def test_defaults_and_factories() -> None:
    user = events.PasswordAuthenticate("u", b"p")
    assert user.mechanism == "USER"
    assert "b'p'" not in repr(user)  # field(repr=False) still holds
    a, b = Principal("x"), Principal("x")
    assert a.attributes == {}
    assert a.attributes is not b.attributes  # a fresh dict each, as the factory says
    assert Principal("x", {"k": "v"}).attributes == {"k": "v"}
    assert pickle.loads(pickle.dumps(Principal("x", {"k": "v"}))) == Principal("x", {"k": "v"})
    assert dataclasses.replace(user, mechanism="PLAIN").mechanism == "PLAIN"


def test_refuses_what_it_cannot_make() -> None:
    @dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly:
        name: str

    with pytest.raises(TypeError, match="not a plain slot field"):
        quick_init(KeywordOnly)

    @dataclass(frozen=True)
    class NoSlots:
        name: str = field(default="x")

    with pytest.raises(TypeError, match="not a plain slot field"):
        quick_init(NoSlots)
