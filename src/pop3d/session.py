"""Performs a core's requests against the backends: auth, maildrop, UPDATE.  Async, no sockets.

This is the only place that maps backend exceptions to response codes; the wire never
carries exception text.  The transport (server/connection.py) owns the socket, the timers
and message streaming; this module owns what a request *means* to the backends.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from pop3d.auth import schemes
from pop3d.auth.base import Authenticator, Principal
from pop3d.errors import MaildropLocked, PermanentBackendError
from pop3d.protocol.events import ApopAuthenticate, PasswordAuthenticate
from pop3d.protocol.replies import RespCode
from pop3d.storage.base import Maildrop, MailStore, MessageInfo

log = logging.getLogger("pop3d.session")


@dataclass
class FailureDelays:
    """Delay before a failed login is answered, doubling per source address up to a cap.

    Like Dovecot's auth_failure_delay plus its auth penalty: a client hammering wrong
    passwords from one address waits longer and longer; other addresses are unaffected,
    and the wait is an ``asyncio.sleep`` that blocks no other session.
    """

    base: float
    cap: float
    #: Recent consecutive failures per address.
    failures: dict[str, int] = field(default_factory=dict)

    def delay_for(self, address: str) -> float:
        """Record a failure from ``address`` and return how long to wait before answering."""
        n = self.failures.get(address, 0)
        if len(self.failures) > 100_000:  # bounded memory under a distributed attack
            self.failures.clear()
        self.failures[address] = n + 1
        return min(self.base * (2**n), self.cap) if self.base > 0 else 0.0

    def succeeded(self, address: str) -> None:
        """Forget the failures of ``address`` after a good login."""
        self.failures.pop(address, None)


@dataclass
class Backends:
    """The authenticator, the mail store, and the failure policy a server shares."""

    authenticator: Authenticator
    store: MailStore
    delays: FailureDelays

    async def authenticate(
        self, event: PasswordAuthenticate | ApopAuthenticate, address: str
    ) -> Principal | RespCode:
        """Check credentials; return the user, or the code to refuse with.

        A refusal returns only after the failure delay for ``address``.
        """
        try:
            if isinstance(event, PasswordAuthenticate):
                principal = await self.authenticator.verify_password(
                    event.username, event.password
                )
            else:
                principal = await self._apop(event)
        except Exception:
            log.exception("authentication backend failed")
            return RespCode.SYS_TEMP
        if principal is None:
            await asyncio.sleep(self.delays.delay_for(address))
            return RespCode.AUTH
        self.delays.succeeded(address)
        return principal

    async def _apop(self, event: ApopAuthenticate) -> Principal | None:
        secret = await self.authenticator.secret_for(event.username, "PLAIN")
        if secret is None:
            # Same work for unknown users and users without a PLAIN secret.
            schemes.verify_apop(b"\x00" * 16, event.timestamp, event.digest)
            return None
        if not schemes.verify_apop(secret, event.timestamp, event.digest):
            return None
        return await self.authenticator.lookup(event.username)

    async def open(self, principal: Principal) -> Maildrop | RespCode:
        """Lock and open the maildrop; return it, or the code to refuse with."""
        try:
            return await self.store.open(principal)
        except MaildropLocked:
            return RespCode.IN_USE
        except PermanentBackendError:
            log.warning("maildrop of %s cannot be opened", principal.username, exc_info=True)
            return RespCode.SYS_PERM
        except Exception:
            log.warning("maildrop of %s cannot be opened", principal.username, exc_info=True)
            return RespCode.SYS_TEMP

    @staticmethod
    async def update(maildrop: Maildrop, deleted: tuple[str, ...]) -> bool:
        """Apply the deletions of UPDATE; True when every one was done."""
        try:
            await maildrop.commit(deleted)
        except Exception:
            log.exception("UPDATE failed")
            return False
        return True

    @staticmethod
    def listing(maildrop: Maildrop) -> tuple[MessageInfo, ...]:
        """Return the maildrop's fixed listing."""
        return tuple(maildrop.listing())
