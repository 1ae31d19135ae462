"""Events the core hands to its driver (:meth:`Pop3Connection.next_event`).

Each event other than :class:`NeedData` and :class:`Closed` is a request: the core pauses
until the driver performs it and reports back through the method named in the event's
docstring.  Events are plain frozen data and never carry a password in their ``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pop3d.protocol.values import Principal, quick_init


@dataclass(frozen=True, slots=True)
class NeedData:
    """Everything received has been answered: flush ``data_to_send()`` and read more."""


@dataclass(frozen=True, slots=True)
class Flush:
    """The replies queued reach ``settings.output_chunk``: send them before asking again.

    The core stops answering here, so a client that pipelines without reading cannot make
    it queue more than that; the driver writes, and waits while the peer does not read.
    """


@quick_init
@dataclass(frozen=True, slots=True)
class PasswordAuthenticate:
    """Verify ``password`` for ``username`` (USER/PASS, SASL PLAIN and LOGIN).

    Report with ``auth_succeeded(principal)`` or ``auth_failed()``.
    """

    username: str
    password: bytes = field(repr=False)
    #: The mechanism used (``USER``, ``PLAIN``, ``LOGIN``), for the log.
    mechanism: str = "USER"


@quick_init
@dataclass(frozen=True, slots=True)
class ApopAuthenticate:
    """Check an APOP digest: MD5 of ``timestamp`` + the user's PLAIN secret.

    Report with ``auth_succeeded(principal)`` or ``auth_failed()``.
    """

    username: str
    timestamp: bytes
    digest: str


@quick_init
@dataclass(frozen=True, slots=True)
class SaslSecret:
    """Look up the stored secret of ``username`` in ``scheme`` (``CRAM-MD5``, ``SCRAM-SHA-256``).

    Report with ``sasl_secret(secret)`` (``None``: unknown user, or the stored password
    cannot give that scheme), or ``auth_failed(RespCode.SYS_TEMP)`` if the backend is down.
    For SCRAM the driver should hand an unknown user a fake secret with a stable salt
    instead of ``None`` (RFC 5802 §5.1), so that the challenge does not reveal who exists.
    """

    username: str
    scheme: str


@quick_init
@dataclass(frozen=True, slots=True)
class SaslOutcome:
    """A SASL mechanism has decided who the client is (CRAM-MD5, SCRAM, EXTERNAL, refusals).

    ``success``: look the user up and report ``auth_succeeded(principal)``, or
    ``auth_failed()`` if there is no such user.  Otherwise wait the failure delay, log
    ``reason`` and report ``auth_failed()``.
    """

    username: str
    mechanism: str
    success: bool
    #: Why it failed, for the log only.
    reason: str = ""


@quick_init
@dataclass(frozen=True, slots=True)
class AuthRefused:
    """Information, not a request (no report): the core refused to authenticate by itself.

    Sent where nothing was checked, e.g. a password offered on a cleartext connection from
    outside the secure networks, or a SASL exchange cancelled or malformed; the driver
    logs it with the peer address (the audit line, :func:`pop3d.audit.auth_failed`).
    """

    #: What happened, for the session log.
    reason: str
    #: The audit line's one-word reason (``cleartext-refused``, ``cancelled``, ...).
    code: str = "cleartext-refused"
    #: ``USER``, ``APOP`` or the SASL mechanism name.
    mechanism: str = "USER"
    #: The user name, when the client gave one.
    username: str = ""


@quick_init
@dataclass(frozen=True, slots=True)
class OpenMaildrop:
    """Lock and open the maildrop of ``principal``.

    Report with ``maildrop_opened(listing)`` or ``maildrop_failed(code)``.
    """

    principal: Principal


@quick_init
@dataclass(frozen=True, slots=True)
class SendMessage:
    """Stream the message ``uid`` (RETR, or TOP when ``body_lines`` is not None).

    Feed chunks to ``message_data(chunk)`` until it returns False or the message ends,
    then call ``message_end()``; on a read error call ``message_failed(...)``.
    """

    uid: str
    body_lines: int | None


@dataclass(frozen=True, slots=True)
class StartTls:
    """``+OK`` to STLS is queued: flush it, start TLS, then call ``tls_established()``."""


@quick_init
@dataclass(frozen=True, slots=True)
class Update:
    """Enter UPDATE: remove ``deleted`` (uids), then ``update_done()`` / ``update_failed()``."""

    deleted: tuple[str, ...]


@quick_init
@dataclass(frozen=True, slots=True)
class Closed:
    """The session is over: flush ``data_to_send()``, close the maildrop (no UPDATE), hang up."""

    #: Why: ``quit``, ``eof``, ``too many errors``, ``auth failures``, ``read error``, ...
    reason: str


Event = (
    NeedData
    | Flush
    | PasswordAuthenticate
    | ApopAuthenticate
    | SaslSecret
    | SaslOutcome
    | AuthRefused
    | OpenMaildrop
    | SendMessage
    | StartTls
    | Update
    | Closed
)
