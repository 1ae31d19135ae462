"""The values the core shares with the backends: who a user is, what a message is.

The core owns them so that it imports nothing of pop3d outside :mod:`pop3d.protocol`;
the backends' interfaces (:mod:`pop3d.auth.base`, :mod:`pop3d.storage.base`) use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated (or looked-up) user."""

    #: The canonical user name, as the backend spells it.
    username: str
    #: Extra fields of the user's record (home, quota, ...); opaque to the protocol core.
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a maildrop, as the session sees it."""

    #: 1-70 characters in 0x21-0x7E, stable across sessions (RFC 1939 §7).
    uid: str
    #: Octets as sent: CRLF line ends, before byte-stuffing, final CRLF included.
    size: int
