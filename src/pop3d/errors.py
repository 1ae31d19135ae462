"""The exception hierarchy.

Two sides, as in h11: a :class:`RemoteProtocolError` is the peer's fault (answered with
``-ERR``), a :class:`LocalProtocolError` is ours (the connection is closed and the
traceback logged locally).  Backend errors carry the RFC 2449/3206 response code the
driver maps them to.  Only the driver turns exceptions into replies, and no reply ever
carries exception text.
"""

from __future__ import annotations


class Pop3dError(Exception):
    """Base of every error pop3d raises on purpose."""


class ProtocolError(Pop3dError):
    """The POP3 conversation went wrong."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; it gets ``-ERR`` (or a close past the error budget)."""


class LocalProtocolError(ProtocolError):
    """pop3d misused its own core: a bug.  The connection is closed."""


class BackendError(Pop3dError):
    """Storage or authentication failed for a reason that is not the client's."""


class TemporaryBackendError(BackendError):
    """A failure that may go away: answered ``-ERR [SYS/TEMP]``."""


class PermanentBackendError(BackendError):
    """A failure that will not go away by retrying: answered ``-ERR [SYS/PERM]``."""


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
