"""Performs a core's requests against the backends: auth, maildrop, UPDATE.  No sockets.

This is the only place that maps backend exceptions to response codes; the wire never
carries exception text.  The transport (server/connection.py) owns the socket, the timers
and message streaming; this module owns what a request *means* to the backends.

One path per request.  Each request (authenticate, open, update) has one method here,
which either finishes at once, on the event loop, and returns the answer, or returns a
:class:`Later` holding the rest of the work for the connection's task to await.  A backend
fast path (the typed ``Inline*`` protocols of ``storage/base.py`` and ``auth/base.py``)
either answers or gives up *before* doing anything that counts, so nothing is ever done
twice: a wrong password is verified once, a maildrop locked once.  Every defence below sits
on that one path, so no shortcut can skip it.

Brute force (:class:`FailureDelays`), as Dovecot's auth penalty but enforced:

* Every password verdict from an address waits its penalty before it is answered: a
  refusal is sent at the moment the credentials arrived plus the delay (doubling per
  recent failure of the address, up to ``max_failure_delay``), whatever the verification
  cost; a right password from a penalised address waits as long, so it learns nothing
  sooner.  An address without recent failures gets a success at once.
* At most :data:`limits.MAX_AUTH_IN_FLIGHT_PER_ADDRESS` authentications of one address
  are in progress at once (verifying or serving their penalty); more wait their turn (a
  success answered at once, on the loop, is never in progress: it takes no slot).  A
  slot is held until the reply is due even when the client hangs up, so parallel
  connections that reset after PASS gain nothing: from one address, verdicts come at
  most that many per penalty.
* A failure is counted, logged (:func:`pop3d.audit.auth_failed`) and reported to the
  metrics when the verdict is reached, whatever the client does next.
* A success forgets only that user's own failures, never the address's penalty for the
  other names it tried.  IPv6 addresses are grouped by a prefix (``/64`` by default:
  one host usually owns a whole /64).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from pop3d import audit, logsetup, metrics
from pop3d.auth import schemes
from pop3d.auth.base import Authenticator, ScramSaltKey
from pop3d.auth.verdict import InlineVerify, Unfinished
from pop3d.errors import (
    MaildropLocked,
    MessageVanished,
    PermanentBackendError,
    TemporaryBackendError,
    WouldWait,
)
from pop3d.login_delay import LoginDelay
from pop3d.protocol import limits
from pop3d.protocol.events import ApopAuthenticate, PasswordAuthenticate, SaslOutcome
from pop3d.protocol.replies import RespCode
from pop3d.protocol.values import Principal, quick_init
from pop3d.storage.base import Fenced, InlineCommit, InlineOpen, Maildrop, MailStore

log = logsetup.get_logger("pop3d.session")

_T = TypeVar("_T")


class Later(Generic[_T]):
    """The unfinished rest of a request, already running: the connection awaits :attr:`task`.

    The task starts at once, so the work goes on (and cleans up after itself) even if the
    connection is gone before its own task runs; the connection cancels it when it is
    over (except an authentication's verdict and penalty, which no cancel cuts short,
    and an UPDATE, which is never cancelled).
    """

    __slots__ = ("task",)

    def __init__(self, work: Coroutine[Any, Any, _T]) -> None:
        self.task: asyncio.Task[_T] = asyncio.get_running_loop().create_task(work)


async def resolve(answer: _T | Later[_T]) -> _T:
    """Await ``answer`` if it is unfinished (for callers without their own task)."""
    if isinstance(answer, Later):
        return await answer.task
    return answer


#: What an authentication answers: the user, or the code to refuse with.
AuthAnswer = Principal | RespCode
AuthEvent = PasswordAuthenticate | ApopAuthenticate | SaslOutcome


@quick_init
@dataclass(frozen=True, slots=True)
class AuthRequest:
    """An authentication to judge, with what the log line needs about its connection."""

    event: AuthEvent
    #: The client's address (the penalty and the audit line's ``rip``).
    address: str
    #: The TLS version of the connection, or None (the audit line's ``tls``).
    tls: str | None = None


def _mechanism(event: AuthEvent) -> str:
    if isinstance(event, ApopAuthenticate):
        return "APOP"
    return event.mechanism


class _Address:
    """One address's (or IPv6 prefix's) recent failures and authentications in flight."""

    __slots__ = ("by_user", "in_flight", "last", "total", "waiters")

    def __init__(self) -> None:
        #: Recent failures per user name tried (bounded; the rest count under "").
        self.by_user: dict[str, int] = {}
        self.total = 0
        self.last = 0.0
        self.in_flight = 0
        self.waiters: deque[asyncio.Future[None]] = deque()


def _backend_failed(exc: Exception) -> None:
    """Log an authentication backend failure: one line when expected (a database down)."""
    if isinstance(exc, TemporaryBackendError):
        log.warning("authentication backend unavailable: %s", exc)
    else:
        log.error("authentication backend failed", exc_info=exc)


@dataclass
class FailureDelays:
    """The brute-force penalty per source address (see the module head).

    ``base`` is the delay of a first failure; each recent failure of the address doubles
    it, up to ``cap``.  ``base = 0`` turns delays off (the concurrency limit stays).
    """

    base: float
    cap: float
    #: Failures of an address are forgotten after this long without a new one.
    forget_after: float = limits.AUTH_PENALTY_EXPIRY
    #: The clock (monotonic seconds); tests pass their own.
    clock: Callable[[], float] = time.monotonic
    #: IPv6 addresses in one prefix of this length share one penalty.
    ipv6_prefix: int = limits.DEFAULT_IPV6_PENALTY_PREFIX
    #: Authentications of one address in progress at once.
    max_in_flight: int = limits.MAX_AUTH_IN_FLIGHT_PER_ADDRESS
    _table: dict[str, _Address] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- addresses

    def key_of(self, address: str) -> str:
        """The penalty's key for ``address``: itself (IPv4), or its IPv6 prefix."""
        if ":" not in address:
            return address
        try:
            ip = ipaddress.IPv6Address(address.partition("%")[0])
        except ValueError:
            return address
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        net = ipaddress.IPv6Network((ip, self.ipv6_prefix), strict=False)
        return str(net)

    def _entry(self, key: str) -> _Address:
        entry = self._table.get(key)
        if entry is None:
            if len(self._table) >= limits.MAX_PENALTY_ADDRESSES:  # bounded memory
                self._table = {k: e for k, e in self._table.items() if e.in_flight}
            entry = self._table[key] = _Address()
        elif entry.total and self.clock() - entry.last > self.forget_after:
            entry.by_user.clear()
            entry.total = 0
        return entry

    def _drop_if_unused(self, key: str, entry: _Address) -> None:
        if not entry.total and not entry.in_flight and self._table.get(key) is entry:
            del self._table[key]

    # ---------------------------------------------------------------- penalty

    def penalty(self, key: str) -> float:
        """How long a verdict for ``key`` waits now if it is a refusal."""
        entry = self._table.get(key)
        n = self._entry(key).total if entry is not None else 0
        if self.base <= 0:
            return 0.0
        # Cap the exponent before computing: 2**n for a long-running attacker would
        # overflow a float long after the delay has reached its cap.
        return min(self.base * 2.0 ** min(n, 64), self.cap)

    def penalised(self, key: str) -> bool:
        """Whether ``key`` has recent failures (its successes wait, too)."""
        entry = self._table.get(key)
        return entry is not None and self._entry(key).total > 0

    def failed(self, key: str, username: str) -> None:
        """Count a refused authentication of ``username`` from ``key``."""
        entry = self._entry(key)
        if username not in entry.by_user and len(entry.by_user) >= limits.MAX_PENALTY_NAMES:
            username = ""  # past the bound, failures count but no success forgets them
        entry.by_user[username] = entry.by_user.get(username, 0) + 1
        entry.total += 1
        entry.last = self.clock()

    def succeeded(self, key: str, username: str) -> None:
        """Forget ``username``'s own failures from ``key`` (not the other names')."""
        entry = self._table.get(key)
        if entry is None:
            return
        entry.total -= entry.by_user.pop(username, 0)
        self._drop_if_unused(key, entry)

    # ---------------------------------------------------------------- slots

    def in_flight(self, key: str) -> int:
        """Authentications of ``key`` in progress (holding a slot or waiting for one)."""
        entry = self._table.get(key)
        return 0 if entry is None else entry.in_flight + len(entry.waiters)

    def try_acquire(self, key: str) -> bool:
        """Take one of ``key``'s authentication slots if one is free now."""
        entry = self._entry(key)
        if entry.in_flight >= self.max_in_flight or entry.waiters:
            return False
        entry.in_flight += 1
        return True

    async def acquire(self, key: str) -> None:
        """Wait for one of ``key``'s authentication slots (in arrival order)."""
        if self.try_acquire(key):
            return
        entry = self._entry(key)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(key)  # the slot was handed over as we were cancelled
            else:
                entry.waiters.remove(waiter)
            raise

    def release(self, key: str) -> None:
        """Give a slot back: to the next waiter, or free."""
        entry = self._table.get(key)
        if entry is None:
            return
        while entry.waiters:
            waiter = entry.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; in_flight is unchanged
                return
        entry.in_flight -= 1
        self._drop_if_unused(key, entry)

    # ---------------------------------------------------------------- compatibility

    def delay_for(self, address: str) -> float:
        """Record a failure from ``address`` (no user) and return the delay it waits."""
        key = self.key_of(address)
        delay = self.penalty(key)
        self.failed(key, "")
        return delay


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
    #: The authentications still serving their penalty (their references).
    _holding: set[asyncio.Task[AuthAnswer]] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        # The fast capabilities, checked once (isinstance on a Protocol is not free).
        self._verify_now = (
            self.authenticator if isinstance(self.authenticator, InlineVerify) else None
        )
        self._open_now = self.store if isinstance(self.store, InlineOpen) else None
        self._commit_now: dict[type, bool] = {}
        self._fenced: dict[type, bool] = {}

    # ---------------------------------------------------------------- authenticate

    def authenticate(self, request: AuthRequest) -> AuthAnswer | Later[AuthAnswer]:
        """Judge credentials; return the user, or the code to refuse with.

        At once when the address has no recent failures and the authenticator can verify
        without waiting and says yes: such a success takes no slot (nothing of it runs
        after this call), so it never queues behind the address's other authentications.
        Anything that goes on (an unfinished check, a refusal's delay) holds one of the
        address's slots, waiting for one if none is free; the rest is :class:`Later`.
        """
        delays = self.delays
        key = delays.key_of(request.address)
        verify_now = self._verify_now
        event = request.event
        if verify_now is None or type(event) is not PasswordAuthenticate or delays.penalised(key):
            return Later(self._authenticate_later(request, key))
        start = delays.clock()
        try:
            verdict = verify_now.begin(event.username, event.password)
        except Exception as exc:
            _backend_failed(exc)
            return self._verdict(request, key, RespCode.SYS_TEMP, start)
        if isinstance(verdict, Principal):
            return self._verdict(request, key, verdict, start)
        if isinstance(verdict, Unfinished):  # the task finishes it: nothing is redone
            if not delays.try_acquire(key):
                return Later(self._authenticate_later(request, key, verdict))
            work = self._judge(request, key, verdict)
            return Later(self._shielded(work, (key, event.username)))
        # A refusal: judged now, answered after the delay, holding a slot until then.
        wait = delays.penalty(key)
        answer = self._verdict(request, key, None, start)
        slot = delays.try_acquire(key)
        return Later(self._shielded(self._hold(key, start + wait, answer, slot=slot)))

    async def _authenticate_later(
        self, request: AuthRequest, key: str, unfinished: Unfinished | None = None
    ) -> AuthAnswer:
        await self.delays.acquire(key)  # cancelled while waiting: nothing was judged
        work = self._judge(request, key, unfinished)
        return await self._shielded(work, (key, request.event.username))

    def _shielded(
        self, work: Coroutine[Any, Any, AuthAnswer], credit: tuple[str, str] | None = None
    ) -> Coroutine[Any, Any, AuthAnswer]:
        """Start ``work`` now, in a task that the client hanging up does not cancel.

        It holds an authentication slot: the verdict is recorded and the slot kept until
        the reply is due, whatever the connection does meanwhile.  With ``credit`` (the
        address's key and the user name), a success the connection receives forgets
        that user's failures; a connection
        cancelled meanwhile (a client that hung up) receives nothing, so nothing is
        forgotten.
        """
        task = asyncio.get_running_loop().create_task(work)
        self._holding.add(task)
        task.add_done_callback(self._holding.discard)
        if credit is None:
            return _await_shielded(task)
        return _await_credited(task, self.delays, *credit)

    async def _judge(
        self, request: AuthRequest, key: str, unfinished: Unfinished | None = None
    ) -> AuthAnswer:
        """Verify (or finish ``unfinished``), record the verdict, wait for the reply's time.

        Holds an authentication slot throughout.
        """
        delays = self.delays
        start = delays.clock()
        wait = delays.penalty(key)
        penalised = delays.penalised(key)
        try:
            if unfinished is None:
                found = await self._check(request.event)
            else:
                done = await unfinished.result()
                found = done if isinstance(done, Principal) else None
        except asyncio.CancelledError:  # the server is stopping
            delays.release(key)
            raise
        except Exception as exc:
            _backend_failed(exc)
            found = RespCode.SYS_TEMP
        # A success from a penalised address forgets the user's failures only once its
        # reply is due to a client still there (_delivered): one that hangs up at once,
        # as a guesser does, must not see the penalty vanish after a right guess.
        answer = self._verdict(request, key, found, start, credit=not penalised)
        if isinstance(answer, Principal) and not penalised:
            wait = 0.0
        return await self._hold(key, start + wait, answer)

    async def _hold(
        self, key: str, until: float, answer: AuthAnswer, *, slot: bool = True
    ) -> AuthAnswer:
        """Keep ``key``'s slot until ``until``, then give it back and return ``answer``.

        ``slot`` False: none was free when the verdict was reached; wait for one first.
        """
        if not slot:
            await self.delays.acquire(key)
        try:
            delay = until - self.delays.clock()
            if delay > 0:
                await asyncio.sleep(delay)
        finally:
            self.delays.release(key)
        return answer

    async def _check(self, event: AuthEvent) -> Principal | RespCode | None:
        """The verification itself, by whatever means the event needs."""
        match event:
            case PasswordAuthenticate(username, password):
                return await self.authenticator.verify_password(username, password)
            case ApopAuthenticate():
                return await self._apop(event)
            case SaslOutcome(username, _, success):
                if not success:
                    return None
                return await self.authenticator.lookup(username)
        return None  # pragma: no cover (the match is exhaustive)

    def _verdict(
        self,
        request: AuthRequest,
        key: str,
        found: Principal | RespCode | None,
        start: float,
        *,
        credit: bool = True,
    ) -> AuthAnswer:
        """Record a verdict where it is reached: penalty, audit line, metrics."""
        event = request.event
        mechanism = _mechanism(event)
        seconds = self.delays.clock() - start
        if isinstance(found, Principal):
            if credit:
                self.delays.succeeded(key, event.username)
            metrics.login(mechanism, "ok", seconds)
            return found
        if found is RespCode.SYS_TEMP:
            audit.auth_failed(event.username, request.address, mechanism, "tempfail",
                              request.tls)
            metrics.login(mechanism, "tempfail", seconds)
            return RespCode.SYS_TEMP
        self.delays.failed(key, event.username)
        reason = "bad-password"
        if isinstance(event, SaslOutcome) and event.reason.startswith("malformed"):
            reason = "malformed"
        audit.auth_failed(event.username, request.address, mechanism, reason, request.tls)
        metrics.login(mechanism, "failed", seconds)
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
            authenticator = self.authenticator
            key = (
                authenticator.scram_salt_key
                if isinstance(authenticator, ScramSaltKey)
                else self._fake_salt_key
            )
            salt = schemes.scram_salt(key, username)
            fake = schemes.ScramSecret(schemes.SCRAM_ITERATIONS, salt, os.urandom(32),
                                       os.urandom(32))
            return fake.encode()
        return secret

    async def _apop(self, event: ApopAuthenticate) -> Principal | None:
        secret = await self.authenticator.secret_for(event.username, "PLAIN")
        if secret is None:
            # Same work for unknown users and users without a PLAIN secret.
            schemes.verify_apop(b"\x00" * 16, event.timestamp, event.digest)
            return None
        if not schemes.verify_apop(secret, event.timestamp, event.digest):
            return None
        return await self.authenticator.lookup(event.username)

    # ---------------------------------------------------------------- open

    def open(self, principal: Principal) -> Maildrop | RespCode | Later[Maildrop | RespCode]:
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
        open_now = self._open_now
        if open_now is None:
            return Later(self._open_later(principal))
        try:
            maildrop = open_now.open_now(principal)
        except WouldWait:  # nothing was locked: the task opens it, once
            return Later(self._open_later(principal))
        except Exception as exc:
            return self._open_failed(principal, exc)
        return self._opened(principal, maildrop)

    async def _open_later(self, principal: Principal) -> Maildrop | RespCode:
        try:
            maildrop = await self.store.open(principal)
        except Exception as exc:
            return self._open_failed(principal, exc)
        return self._opened(principal, maildrop)

    def _opened(self, principal: Principal, maildrop: Maildrop) -> Maildrop:
        if self.login_delay is not None:
            self.login_delay.record(principal.username)
        return maildrop

    @staticmethod
    def _open_failed(principal: Principal, exc: Exception) -> RespCode:
        if isinstance(exc, MaildropLocked):
            metrics.lock_conflict()
            return RespCode.IN_USE
        if isinstance(exc, (PermanentBackendError, TemporaryBackendError)):
            # Expected failures say what went wrong in one line; anything else keeps
            # its traceback.
            log.warning("maildrop of %s cannot be opened: %s", principal.username, exc)
            permanent = isinstance(exc, PermanentBackendError)
            return RespCode.SYS_PERM if permanent else RespCode.SYS_TEMP
        log.warning("maildrop of %s cannot be opened", principal.username, exc_info=exc)
        return RespCode.SYS_TEMP

    def fence(self, maildrop: Maildrop) -> Fenced | None:
        """The lock of ``maildrop`` that can be lost while it is open, or None.

        A cluster lease (``cluster_lock.py``) can expire or be taken under an open
        session; the connection asks :meth:`Fenced.still_held` before each batch of
        commands and, once it is False, tells the core (``maildrop_lost``): the next
        command is refused ``[SYS/TEMP]`` and the session ends without UPDATE.  A local
        lock cannot be lost: None, and nothing is asked.
        """
        kind = type(maildrop)
        known = self._fenced.get(kind)
        if known is None:
            known = self._fenced[kind] = isinstance(maildrop, Fenced)
        return cast("Fenced", maildrop) if known else None

    # ---------------------------------------------------------------- update

    def update(self, maildrop: Maildrop, deleted: Sequence[str]) -> bool | Later[bool]:
        """Apply the deletions of UPDATE and release the lock; True when all were done.

        The lock is released before the answer, so that a client logging in again the
        moment it reads the sign-off does not find its maildrop still locked.
        """
        fast = self._inline_commit(maildrop)
        if fast is not None:
            try:
                fast.commit_now(deleted)
            except WouldWait:  # nothing was removed: the task does it, once
                return Later(self._update_later(maildrop, deleted))
            except Exception:
                log.exception("UPDATE failed")
                done = False
            else:
                done = True
            fast.release()
            if done:
                metrics.deleted(len(deleted))
            return done
        return Later(self._update_later(maildrop, deleted))

    def _inline_commit(self, maildrop: Maildrop) -> InlineCommit | None:
        kind = type(maildrop)
        known = self._commit_now.get(kind)
        if known is None:
            known = self._commit_now[kind] = isinstance(maildrop, InlineCommit)
        return cast("InlineCommit", maildrop) if known else None

    @staticmethod
    async def _update_later(maildrop: Maildrop, deleted: Sequence[str]) -> bool:
        try:
            await maildrop.commit(deleted)
        except Exception:
            log.exception("UPDATE failed")
            done = False
        else:
            done = True
        try:
            await maildrop.close()
        except Exception:
            log.exception("closing a maildrop failed")
        if done:
            metrics.deleted(len(deleted))
        return done


async def _await_shielded(task: asyncio.Task[_T]) -> _T:
    return await asyncio.shield(task)


async def _await_credited(
    task: asyncio.Task[AuthAnswer], delays: FailureDelays, key: str, username: str
) -> AuthAnswer:
    answer = await asyncio.shield(task)
    if isinstance(answer, Principal):
        delays.succeeded(key, username)
    return answer


def read_failed(uid: str, username: str, exc: Exception) -> bool:
    """Whether a message that could not be read vanished (else it is broken: logged)."""
    if isinstance(exc, MessageVanished):
        return True
    log.warning("cannot read message %s for %s", uid, username, exc_info=exc)
    return False
