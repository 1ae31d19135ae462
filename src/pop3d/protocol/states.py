"""The session states and, per state, the commands that are legal in it.

One enum, one table: a command missing from its state's row is answered ``-ERR`` by the
core, with no ``if`` chain deciding it (h2 ``_transitions``, popa3d's per-state tables).
"""

from __future__ import annotations

import enum

from pop3d.protocol import commands as c


class State(enum.Enum):
    """Where the session is (RFC 1939 §3)."""

    #: After the greeting, until a maildrop is opened.
    AUTHORIZATION = "AUTHORIZATION"
    #: A maildrop is open and locked.
    TRANSACTION = "TRANSACTION"
    #: QUIT was received in TRANSACTION: deletions are being applied.
    UPDATE = "UPDATE"
    #: The session is over; nothing more is read or answered.
    CLOSED = "CLOSED"

    # A member is only ever equal to itself, so the identity hash serves: Enum's own
    # hashes the name in a Python call, and the core looks a state up at every command.
    __hash__ = object.__hash__


COMMANDS: dict[State, frozenset[type[c.Command]]] = {
    State.AUTHORIZATION: frozenset(
        {c.User, c.Pass, c.Apop, c.Auth, c.Quit, c.Capa, c.Stls, c.Utf8}
    ),
    State.TRANSACTION: frozenset(
        {c.Stat, c.List, c.Retr, c.Dele, c.Noop, c.Rset, c.Top, c.Uidl, c.Quit, c.Capa}
    ),
    State.UPDATE: frozenset(),
    State.CLOSED: frozenset(),
}
