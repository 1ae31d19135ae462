"""What an authentication backend promises.

After Twisted's checker/realm split: an :class:`Authenticator` verifies a secret and says
*who* the client is; the mail store decides *where* that user's mail is.

``None`` always means "no" (wrong password, unknown user: indistinguishable to the caller,
and equally slow, since an unknown user gets a dummy verification).  An exception means
the backend itself is broken and is answered ``-ERR [SYS/TEMP]``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pop3d.protocol.values import Principal


class Authenticator(Protocol):
    """A source of users and their secrets (passwd-file, SQL, ...)."""

    async def verify_password(self, username: str, password: bytes) -> Principal | None:
        """Return the user when ``password`` is theirs, else ``None`` after the same work."""
        ...

    async def lookup(self, username: str) -> Principal | None:
        """Return the user without checking a secret (LMTP RCPT, SASL EXTERNAL)."""
        ...

    async def secret_for(self, username: str, scheme: str) -> bytes | None:
        """Return the stored secret in ``scheme`` (``PLAIN``, ``CRAM-MD5``, ``SCRAM-SHA-256``).

        Used by challenge-response mechanisms (APOP, CRAM-MD5, SCRAM) that need more
        than a verify.  ``None`` when the user is unknown or their stored password cannot
        produce that scheme.
        """
        ...


async def find_user(authenticator: Authenticator, address: str) -> Principal | None:
    """The user ``local@domain`` if it exists, else the user ``local``; ``None`` if neither.

    The rule for LMTP recipients, which ``pop3d deliver`` shares so that a Postfix
    pipe transport may pass ``${recipient}`` or ``${user}`` alike.
    """
    found: Principal | None = await authenticator.lookup(address)
    if found is None and "@" in address:
        local = address.rpartition("@")[0]
        if local:
            found = await authenticator.lookup(local)
    return found


# ---------------------------------------------------------------------------- fast paths


@runtime_checkable
class ScramSaltKey(Protocol):
    """An :class:`Authenticator` whose stable SCRAM salts come from a key of its own.

    The session fakes unknown users' salts with the same key, so that a SCRAM
    server-first message does not tell who exists.
    """

    @property
    def scram_salt_key(self) -> bytes:
        """The key per-user SCRAM salts are derived from."""
        ...
