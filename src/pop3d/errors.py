"""The exception hierarchy.

Backend errors carry the RFC 2449/3206 response code the session maps them to
(:mod:`pop3d.session`); no reply ever carries exception text.  The core's
own error, :class:`~pop3d.protocol.errors.LocalProtocolError` (a bug: the connection is
closed), lives in the core and is re-exported here.
"""

from __future__ import annotations

from pop3d.protocol.errors import LocalProtocolError

__all__ = [
    "BackendError",
    "ConfigError",
    "LocalProtocolError",
    "MaildropLocked",
    "MessageVanished",
    "NoHome",
    "PermanentBackendError",
    "Pop3dError",
    "QuotaExceeded",
    "TemporaryBackendError",
    "WouldWait",
]


class Pop3dError(Exception):
    """Base of every error pop3d raises on purpose."""


class BackendError(Pop3dError):
    """Storage or authentication failed for a reason that is not the client's."""


class TemporaryBackendError(BackendError):
    """A failure that may go away: answered ``-ERR [SYS/TEMP]``."""


class PermanentBackendError(BackendError):
    """A failure that will not go away by retrying: answered ``-ERR [SYS/PERM]``."""


class NoHome(PermanentBackendError):
    """The template uses ``%h`` and the user database gives this user no usable home."""


class MaildropLocked(BackendError):
    """Another session holds the maildrop: answered ``-ERR [IN-USE]``."""


class MessageVanished(BackendError):
    """A message file disappeared under the session (another deleter)."""


class QuotaExceeded(PermanentBackendError):
    """Delivery would exceed the user's storage quota."""


class WouldWait(Pop3dError):
    """A backend's ``*_now`` fast path cannot answer without waiting: use its async twin."""


class ConfigError(Pop3dError):
    """The configuration file is invalid; the message says where and why."""
