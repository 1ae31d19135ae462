"""The sans-I/O POP3 protocol core: bytes in, bytes and events out.

Nothing in this package touches a socket, a file, a clock or an event loop.
"""

from __future__ import annotations

from pop3d.protocol.events import (
    ApopAuthenticate,
    AuthRefused,
    Closed,
    Event,
    Flush,
    NeedData,
    OpenMaildrop,
    PasswordAuthenticate,
    SaslOutcome,
    SaslSecret,
    SendMessage,
    StartTls,
    Update,
)
from pop3d.protocol.pop3 import Cap, Pop3Connection, Pop3Settings, refusal
from pop3d.protocol.replies import RespCode

__all__ = [
    "ApopAuthenticate",
    "AuthRefused",
    "Cap",
    "Closed",
    "Event",
    "Flush",
    "NeedData",
    "OpenMaildrop",
    "PasswordAuthenticate",
    "Pop3Connection",
    "Pop3Settings",
    "RespCode",
    "SaslOutcome",
    "SaslSecret",
    "SendMessage",
    "StartTls",
    "Update",
    "refusal",
]
