"""Performs a core's requests against the backends: auth, maildrop, UPDATE.  Async, no sockets.

This is the only place that maps backend exceptions to response codes; the wire never
carries exception text.  The transport (server/connection.py) owns the socket, the timers
and message streaming; this module owns what a request *means* to the backends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pop3d import limits
from pop3d.auth import schemes
from pop3d.auth.base import Authenticator, Principal
from pop3d.errors import (
    MaildropLocked,
    PermanentBackendError,
    TemporaryBackendError,
    WouldWait,
)
from pop3d.login_delay import LoginDelay
from pop3d.protocol.events import ApopAuthenticate, PasswordAuthenticate, SaslOutcome
from pop3d.protocol.replies import RespCode
from pop3d.storage.base import Maildrop, MailStore

log = logging.getLogger("pop3d.session")


def _backend_failed(exc: Exception) -> None:
    """Log an authentication backend failure: one line when expected (a database down)."""
    if isinstance(exc, TemporaryBackendError):
        log.warning("authentication backend unavailable: %s", exc)
    else:
        log.error("authentication backend failed", exc_info=exc)


@dataclass
class FailureDelays:
    """Delay before a failed login is answered, doubling per source address up to a cap.

    Like Dovecot's auth_failure_delay plus its auth penalty: a client hammering wrong
    passwords from one address waits longer and longer; other addresses are unaffected,
    and the wait is an ``asyncio.sleep`` that blocks no other session.
    """

    base: float
    cap: float
    #: Failures of an address are forgotten after this long without a new one.
    forget_after: float = limits.AUTH_PENALTY_EXPIRY
    #: The clock (monotonic seconds); tests pass their own.
    clock: Callable[[], float] = time.monotonic
    #: Recent consecutive failures per address, and when the last one happened.
    failures: dict[str, tuple[int, float]] = field(default_factory=dict)

    def delay_for(self, address: str) -> float:
        """Record a failure from ``address`` and return how long to wait before answering."""
        now = self.clock()
        n, last = self.failures.get(address, (0, now))
        if now - last > self.forget_after:
            n = 0
        if len(self.failures) > limits.MAX_PENALTY_ADDRESSES:  # bounded memory
            self.failures.clear()
        self.failures[address] = (n + 1, now)
        if self.base <= 0:
            return 0.0
        # Cap the exponent before computing: 2**n for a long-running attacker would
        # overflow a float long after the delay has reached its cap.
        return min(self.base * 2.0 ** min(n, 64), self.cap)

    def succeeded(self, address: str) -> None:
        """Forget the failures of ``address`` after a good login."""
        self.failures.pop(address, None)


@dataclass
class Backends:
    """The authenticator, the mail store, and the failure policy a server shares."""

    authenticator: Authenticator
    store: MailStore
    delays: FailureDelays
    #: RFC 2449 LOGIN-DELAY policy (``[auth] login_delay``); None: no delay.
    login_delay: LoginDelay | None = None
    #: Key of the fake SCRAM salts handed out for unknown users, when the authenticator
    #: has none of its own (``scram_salt_key``): random, but stable for the process.
    _fake_salt_key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

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
        except Exception as exc:
            _backend_failed(exc)
            return RespCode.SYS_TEMP
        if principal is None:
            return await self.failed(address)
        self.delays.succeeded(address)
        return principal

    def authenticate_now(self, event: PasswordAuthenticate, address: str) -> Principal:
        """:meth:`authenticate` without waiting: the login fast path, for a success only.

        Raises:
            WouldWait: the authenticator has no fast path or would wait (a slow scheme),
                the credentials are refused (a refusal waits the failure delay), or the
                backend failed: :meth:`authenticate` answers (and logs) all of those.

        """
        verify_now = getattr(self.authenticator, "verify_password_now", None)
        if verify_now is None:
            raise WouldWait
        try:
            principal: Principal | None = verify_now(event.username, event.password)
        except Exception:
            raise WouldWait from None
        if principal is None:
            raise WouldWait
        self.delays.succeeded(address)
        return principal

    async def failed(self, address: str) -> RespCode:
        """Wait the failure delay of ``address``; return the code to refuse with."""
        await asyncio.sleep(self.delays.delay_for(address))
        return RespCode.AUTH

    async def sasl_secret(self, username: str, scheme: str) -> bytes | RespCode | None:
        """Return the stored secret a SASL mechanism needs, or ``SYS_TEMP`` if auth is down.

        For SCRAM an unknown user gets a fake secret with a stable per-user salt instead
        of ``None`` (RFC 5802 §5.1), so the server-first message does not reveal who
        exists; its random keys can match no proof.
        """
        try:
            secret = await self.authenticator.secret_for(username, scheme)
        except Exception as exc:
            _backend_failed(exc)
            return RespCode.SYS_TEMP
        if secret is None and scheme == "SCRAM-SHA-256":
            key = getattr(self.authenticator, "scram_salt_key", None)
            salt = schemes.scram_salt(key if isinstance(key, bytes) else self._fake_salt_key,
                                      username)
            fake = schemes.ScramSecret(schemes.SCRAM_ITERATIONS, salt, os.urandom(32),
                                       os.urandom(32))
            return fake.encode()
        return secret

    async def sasl_outcome(self, event: SaslOutcome, address: str) -> Principal | RespCode:
        """Finish a SASL exchange the mechanism has judged: look the user up, or refuse.

        A refusal (the mechanism's, or an unknown user) returns after the failure delay.
        """
        if event.success:
            try:
                principal = await self.authenticator.lookup(event.username)
            except Exception:
                log.exception("authentication backend failed")
                return RespCode.SYS_TEMP
            if principal is not None:
                self.delays.succeeded(address)
                return principal
        return await self.failed(address)

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
        """Lock and open the maildrop; return it, or the code to refuse with.

        Under a login delay, a user whose last login is too recent is refused before the
        maildrop is touched, and only a login that opened its maildrop counts as one.
        """
        login_delay = self.login_delay
        if login_delay is not None and login_delay.too_soon(principal.username):
            log.info(
                "login of %r refused: last login less than %d s ago",
                principal.username,
                login_delay.seconds,
            )
            return RespCode.LOGIN_DELAY
        opened = await self._open(principal)
        if login_delay is not None and not isinstance(opened, RespCode):
            login_delay.record(principal.username)
        return opened

    def open_now(self, principal: Principal) -> Maildrop:
        """:meth:`open` without waiting: the login fast path, when the store has one.

        Raises:
            WouldWait: the store has no fast path or would wait, a login delay is set,
                or opening failed: :meth:`open` answers (and logs) all of those.

        """
        open_now = getattr(self.store, "open_now", None)
        if open_now is None or self.login_delay is not None:
            raise WouldWait
        try:
            maildrop: Maildrop = open_now(principal)
        except Exception:
            raise WouldWait from None
        return maildrop

    async def _open(self, principal: Principal) -> Maildrop | RespCode:
        try:
            return await self.store.open(principal)
        except MaildropLocked:
            return RespCode.IN_USE
        except (PermanentBackendError, TemporaryBackendError) as exc:
            # Expected failures say what went wrong in one line; anything else keeps
            # its traceback.
            log.warning("maildrop of %s cannot be opened: %s", principal.username, exc)
            permanent = isinstance(exc, PermanentBackendError)
            return RespCode.SYS_PERM if permanent else RespCode.SYS_TEMP
        except Exception:
            log.warning("maildrop of %s cannot be opened", principal.username, exc_info=True)
            return RespCode.SYS_TEMP

    @staticmethod
    def update_now(maildrop: Maildrop, deleted: tuple[str, ...]) -> bool:
        """:meth:`update`, then release the lock, without waiting; True when all were done.

        For a maildrop with the optional ``commit_now`` and ``release`` (Maildir's).

        Raises:
            WouldWait: the maildrop has no fast path, or too much to do: use :meth:`update`
                (the maildrop is then left open).

        """
        commit_now = getattr(maildrop, "commit_now", None)
        release = getattr(maildrop, "release", None)
        if commit_now is None or release is None:
            raise WouldWait
        try:
            commit_now(deleted)
        except WouldWait:
            raise
        except Exception:
            log.exception("UPDATE failed")
            done = False
        else:
            done = True
        release()
        return done

    @staticmethod
    async def update(maildrop: Maildrop, deleted: tuple[str, ...]) -> bool:
        """Apply the deletions of UPDATE; True when every one was done."""
        try:
            await maildrop.commit(deleted)
        except Exception:
            log.exception("UPDATE failed")
            return False
        return True
