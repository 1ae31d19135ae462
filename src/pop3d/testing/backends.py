"""Faults at the backends: wrappers of the authenticator, the store and the login delay.

The test server's :class:`ScriptedContext` builds the session's :class:`~pop3d.session.
Backends` from these wrappers, so a ``login`` fault is an answer of a backend, carried by
the session's one path (``Backends.authenticate`` / ``Backends.open``) and worded by the
core like any real refusal:

* ``AUTH``: the authenticator says "no" (``verify_password`` / ``lookup`` return None);
* ``LOGIN-DELAY``: the login-delay policy says "too soon";
* ``IN-USE``, ``SYS/TEMP``, ``SYS/PERM``: the store's ``open`` raises what a locked,
  unavailable or broken maildrop raises.

The wrappers offer only the base protocols (no ``Inline*`` fast path): every request
takes the session's general path, which is the one every backend has.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from pop3d.auth.base import Authenticator
from pop3d.auth.passwd_file import DEFAULT_KEY_FILE, PasswdFileAuthenticator
from pop3d.config import Config
from pop3d.errors import MaildropLocked, PermanentBackendError, TemporaryBackendError
from pop3d.login_delay import LoginDelay
from pop3d.protocol import Pop3Settings, limits
from pop3d.protocol.values import Principal
from pop3d.server.context import ServerContext
from pop3d.server.tls import TlsContexts
from pop3d.session import Backends
from pop3d.storage.base import Maildrop, MailStore
from pop3d.testing.faults import Fault, FaultTable

if TYPE_CHECKING:
    from pop3d.server.connection import Pop3Protocol
    from pop3d.testing.wire import Recorder


def _code_is(code: str) -> Any:
    def match(fault: Fault) -> bool:
        return bool(fault.params["code"] == code)

    return match


class FaultAuthenticator:
    """An authenticator that refuses the users a ``login`` fault with ``AUTH`` names."""

    def __init__(self, inner: Authenticator, faults: FaultTable) -> None:
        self.inner = inner
        self.faults = faults

    def _refused(self, username: str) -> bool:
        return self.faults.take("login", username, _code_is("AUTH")) is not None

    async def verify_password(self, username: str, password: bytes) -> Principal | None:
        """As the inner authenticator, unless a fault refuses ``username``."""
        if self._refused(username):
            return None
        return await self.inner.verify_password(username, password)

    async def lookup(self, username: str) -> Principal | None:
        """As the inner authenticator (the end of SASL and APOP), unless refused."""
        if self._refused(username):
            return None
        return await self.inner.lookup(username)

    async def secret_for(self, username: str, scheme: str) -> bytes | None:
        """As the inner authenticator."""
        return await self.inner.secret_for(username, scheme)

    def close(self) -> None:
        """Close the inner authenticator (its hashing threads)."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


#: What the store raises for each ``login`` code it answers.
_OPEN_ERRORS: dict[str, type[Exception]] = {
    "IN-USE": MaildropLocked,
    "SYS/TEMP": TemporaryBackendError,
    "SYS/PERM": PermanentBackendError,
}


class FaultStore:
    """A mail store whose ``open`` fails as a ``login`` fault with a maildrop code says."""

    def __init__(self, inner: MailStore, faults: FaultTable) -> None:
        self.inner = inner
        self.faults = faults

    async def open(self, principal: Principal) -> Maildrop:
        """Open the maildrop, or raise what the fault's code stands for."""
        fault = self.faults.take(
            "login", principal.username, lambda f: f.params["code"] in _OPEN_ERRORS
        )
        if fault is not None:
            raise _OPEN_ERRORS[fault.params["code"]](f"fault {fault.id}: {fault.params['code']}")
        return await self.inner.open(principal)


class FaultLoginDelay(LoginDelay):
    """The login-delay policy, or "too soon" for a user a ``LOGIN-DELAY`` fault names."""

    def __init__(self, inner: LoginDelay | None, faults: FaultTable) -> None:
        # The inner policy (if any) keeps its own state; this one has none.
        self.inner = inner
        self.faults = faults
        self.seconds = inner.seconds if inner is not None else 0

    def too_soon(self, username: str) -> bool:
        """True when a fault says so, else what the real policy says."""
        if self.faults.take("login", username, _code_is("LOGIN-DELAY")) is not None:
            return True
        return self.inner is not None and self.inner.too_soon(username)

    def record(self, username: str) -> None:
        """Record an allowed login with the real policy."""
        if self.inner is not None:
            self.inner.record(username)


class ScriptedContext(ServerContext):
    """The test server's :class:`ServerContext`: fault-wrapped backends, a recording wire.

    The STLS and SASL parts of a ``capa`` fault change the settings a new connection gets,
    so the core neither announces nor accepts what is hidden.
    """

    def __init__(
        self,
        config: Config,
        backends: Backends,
        tls: TlsContexts | None,
        *,
        faults: FaultTable,
        recorder: Recorder,
    ) -> None:
        authenticator: Authenticator = backends.authenticator
        passwd_file = config.auth.passwd_file
        if isinstance(authenticator, PasswdFileAuthenticator) and passwd_file is not None:
            # Users the test adds are seen at the next login, not a second later.
            authenticator = PasswdFileAuthenticator(
                passwd_file,
                check_interval=0,
                key_file=config.auth.key_file or passwd_file.parent / DEFAULT_KEY_FILE,
            )
        wrapped = Backends(
            authenticator=FaultAuthenticator(authenticator, faults),
            store=FaultStore(backends.store, faults),
            delays=backends.delays,
            login_delay=FaultLoginDelay(backends.login_delay, faults),
        )
        super().__init__(config, wrapped, tls)
        self.faults = faults
        self.recorder = recorder
        self.wire = self._wire

    async def shutdown(self, grace: float = limits.SHUTDOWN_GRACE) -> None:
        """As the server's, then drop connections still closing (held back by latency)."""
        await super().shutdown(grace)
        self.recorder.abort_all()

    def _wire(self, session: Pop3Protocol, transport: asyncio.Transport) -> asyncio.Transport:
        return self.recorder.tap(session, transport)

    def settings_for(
        self, address: str, implicit_tls: bool, client_identity: str | None = None
    ) -> Pop3Settings:
        """The usual settings, less the STLS and SASL mechanisms a ``capa`` fault hides."""
        settings = super().settings_for(address, implicit_tls, client_identity)
        hidden = {h for f in self.faults if f.kind == "capa" for h in f.params["hide"]}
        if not hidden:
            return settings
        changes: dict[str, Any] = {}
        if "STLS" in hidden:
            changes["tls_available"] = False
        if "SASL" in hidden:
            changes["sasl_mechanisms"] = ()
        else:
            gone = {h.split(" ", 1)[1].strip() for h in hidden if h.startswith("SASL ")}
            if gone:
                changes["sasl_mechanisms"] = tuple(
                    m for m in settings.sasl_mechanisms if m not in gone
                )
        return dataclasses.replace(settings, **changes) if changes else settings
