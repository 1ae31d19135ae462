"""What a password check decided, typed: a user, a refusal with its reason, or work left.

The transport needs the *reason* of a refusal for the audit line (:func:`pop3d.audit.
auth_failed`) and the server log, and must never let it reach the client: every refusal
is answered with the same bytes.  So the authenticator returns a :class:`Refused` member
instead of a bare ``None``; its :attr:`~Refused.audit_reason` is the one word the audit
line takes (all of them are ``bad-password`` there: fail2ban counts a guess at a name that
does not exist like any other), and its value is the detail for the server's own log.

A check that cannot finish at once (a slow hash, a file due a reload) hands back an
:class:`Unfinished`, which holds the rest of the work and never starts over: the inline
part already done (say, a PLAIN comparison) is not repeated by the task that finishes it.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from pop3d.protocol.values import Principal

__all__ = ["InlineVerify", "Refused", "Unfinished", "Verdict"]


class Refused(enum.Enum):
    """Why credentials were refused (for logs only; the client sees one answer)."""

    #: No such user (or an impossible name).
    UNKNOWN_USER = "unknown user"
    #: The password, digest or proof does not match the stored secret.
    BAD_PASSWORD = "password mismatch"  # noqa: S105 (a reason, not a password)
    #: The right password, but the record says ``nologin``.
    NOLOGIN = "login disabled"
    #: The stored secret cannot serve this mechanism (a hash, for APOP).
    NO_SECRET = "no usable secret"  # noqa: S105

    @property
    def audit_reason(self) -> str:
        """The audit line's ``reason=`` word (:mod:`pop3d.audit`): the same for all."""
        return "bad-password"


@dataclass(frozen=True, slots=True)
class Unfinished:
    """A verification that must wait (thread pool, file reload); await :meth:`result`.

    The work done inline before it was handed over is not repeated.
    """

    _finish: Callable[[], Awaitable[Principal | Refused]] = field(repr=False)

    async def result(self) -> Principal | Refused:
        """Finish the verification.

        Raises:
            TemporaryBackendError: the verification could not run.

        """
        return await self._finish()


#: A check's outcome: who (success), why not (refusal), or the rest of the work.
Verdict = Principal | Refused | Unfinished


@runtime_checkable
class InlineVerify(Protocol):
    """An authenticator that checks a password as far as it can without waiting.

    The one path of a password check (``session.Backends.authenticate``): :meth:`begin`
    reaches the verdict at once, or hands back an :class:`Unfinished` holding the rest,
    which the session's task awaits; nothing done inline is ever done again.
    """

    def begin(self, username: str, password: bytes) -> Verdict:
        """The verdict, or the rest of the work.

        Raises:
            TemporaryBackendError: the verification could not run.

        """
        ...
