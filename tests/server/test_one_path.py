"""One path per request (``session.Backends``): nothing done twice, every defence on it.

Fakes of the authenticator and the store count their calls: a fast path that answers is
not followed by its async twin, one that gives up (an ``Unfinished``, or ``WouldWait``
before any work) is followed by it exactly once; the brute-force slots and penalties
hold whatever the client does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence

import pytest

from pop3d.auth.verdict import InlineVerify, Refused, Unfinished, Verdict
from pop3d.errors import MaildropLocked
from pop3d.protocol.events import PasswordAuthenticate
from pop3d.protocol.replies import RespCode
from pop3d.protocol.values import MessageInfo, Principal
from pop3d.session import AuthRequest, Backends, FailureDelays, Later, resolve
from pop3d.storage.base import InlineCommit, InlineOpen


class Auth:
    """A PLAIN-like authenticator: alice/secret; counts every verification."""

    def __init__(self, *, fast: bool = True, concurrency: list[int] | None = None) -> None:
        self.fast = fast
        self.now_calls = 0
        self.async_calls = 0
        self.running = 0
        self.concurrency = concurrency if concurrency is not None else []

    def begin(self, username: str, password: bytes) -> Verdict:
        if not self.fast:
            return Unfinished(lambda: self._finish(username, password))
        self.now_calls += 1
        if (username, password) == ("alice", b"secret"):
            return Principal(username)
        return Refused.BAD_PASSWORD

    async def _finish(self, username: str, password: bytes) -> Principal | Refused:
        found = await self.verify_password(username, password)
        return Refused.BAD_PASSWORD if found is None else found

    async def verify_password(self, username: str, password: bytes) -> Principal | None:
        self.async_calls += 1
        self.running += 1
        self.concurrency.append(self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        return Principal(username) if (username, password) == ("alice", b"secret") else None

    async def lookup(self, username: str) -> Principal | None:
        return Principal(username)

    async def secret_for(self, username: str, scheme: str) -> bytes | None:
        return None


class Drop:
    def listing(self) -> Sequence[MessageInfo]:
        return ()

    def read(self, uid: str) -> object:  # pragma: no cover (not used here)
        raise NotImplementedError(uid)

    async def commit(self, deleted: Collection[str]) -> None:  # pragma: no cover
        raise NotImplementedError(deleted)

    async def close(self) -> None:
        pass


class Store:
    """Locked maildrops; counts every open."""

    def __init__(self) -> None:
        self.now_calls = 0
        self.async_calls = 0

    def open_now(self, principal: Principal) -> Drop:
        self.now_calls += 1
        raise MaildropLocked(principal.username)

    async def open(self, principal: Principal) -> Drop:
        self.async_calls += 1
        raise MaildropLocked(principal.username)


def backends(auth: Auth, *, base: float = 0.0, cap: float = 0.0) -> Backends:
    return Backends(auth, Store(), FailureDelays(base, cap))  # type: ignore[arg-type]


def request(password: bytes, address: str = "192.0.2.7", user: str = "alice") -> AuthRequest:
    return AuthRequest(PasswordAuthenticate(user, password), address)


def test_the_fast_capabilities_are_typed_protocols() -> None:
    """mypy checks the fast paths: they are Protocols, recognised by isinstance."""
    assert isinstance(Auth(), InlineVerify)
    assert isinstance(Store(), InlineOpen)
    assert not isinstance(Drop(), InlineCommit)


def test_a_wrong_password_is_verified_once() -> None:
    """The inline verdict stands: the refusal waits its delay, the async verify never runs."""
    auth = Auth()

    async def main() -> object:
        answer = backends(auth).authenticate(request(b"wrong"))
        assert isinstance(answer, Later)  # a refusal waits its delay in the task
        return await resolve(answer)

    assert asyncio.run(main()) is RespCode.AUTH
    assert (auth.now_calls, auth.async_calls) == (1, 0)


def test_a_right_password_is_answered_at_once() -> None:
    auth = Auth()

    async def main() -> object:
        return backends(auth).authenticate(request(b"secret"))

    assert asyncio.run(main()) == Principal("alice")
    assert (auth.now_calls, auth.async_calls) == (1, 0)


def test_a_fast_path_that_gives_up_is_followed_by_the_task_once() -> None:
    auth = Auth(fast=False)

    async def main() -> object:
        return await resolve(backends(auth).authenticate(request(b"wrong")))

    assert asyncio.run(main()) is RespCode.AUTH
    assert (auth.now_calls, auth.async_calls) == (0, 1)


def test_a_locked_maildrop_is_locked_once() -> None:
    """MaildropLocked from the fast path is the answer; the store is not asked again."""
    auth = Auth()
    b = backends(auth)
    store = b.store
    assert isinstance(store, Store)
    assert b.open(Principal("alice")) is RespCode.IN_USE
    assert (store.now_calls, store.async_calls) == (1, 0)


def test_parallel_attempts_of_one_address_take_two_slots(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever its parallelism, an address has two authentications in progress at once,
    each logged at its verdict, even when its client has hung up."""
    caplog.set_level(logging.WARNING, logger="pop3d.auth")
    concurrency: list[int] = []
    auth = Auth(fast=False, concurrency=concurrency)

    async def main() -> list[object]:
        b = backends(auth, base=0.01, cap=0.02)
        answers = [b.authenticate(request(b"wrong%d" % i)) for i in range(10)]
        laters = [a for a in answers if isinstance(a, Later)]
        assert len(laters) == 10
        for later in laters[::2]:  # half the clients hang up at once
            later.task.cancel()
        done: list[object] = await asyncio.gather(
            *(later.task for later in laters), return_exceptions=True
        )
        for _ in range(500):  # the slots of the clients that left are given back in time
            if not b.delays.in_flight("192.0.2.7"):
                break
            await asyncio.sleep(0.01)
        assert b.delays.in_flight("192.0.2.7") == 0
        return done

    done = asyncio.run(main())
    assert max(concurrency) <= 2
    # The clients that stayed got their refusal; the ones that left before their turn
    # were never judged (nothing to log), the others were judged and logged.
    assert [d for d in done if not isinstance(d, BaseException)] == [RespCode.AUTH] * 5
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == auth.async_calls
    assert all("reason=bad-password" in line for line in lines)


def test_a_penalised_address_waits_even_with_the_right_password() -> None:
    auth = Auth()

    async def main() -> tuple[object, object]:
        b = backends(auth, base=0.01, cap=0.02)
        await resolve(b.authenticate(request(b"wrong")))
        penalised = b.authenticate(request(b"secret"))
        assert isinstance(penalised, Later)  # not answered at once any more
        right = await penalised.task
        # Her own failure is forgotten: the next right password is answered at once.
        return right, b.authenticate(request(b"secret"))

    right, again = asyncio.run(main())
    assert right == again == Principal("alice")


def test_a_success_forgets_only_the_users_own_failures() -> None:
    delays = FailureDelays(base=1.0, cap=100.0)
    for user in ("alice", "bob", "bob"):
        delays.failed("a", user)
    assert delays.penalty("a") == 8.0
    delays.succeeded("a", "alice")
    assert delays.penalty("a") == 4.0  # bob's failures still count for the address
    delays.succeeded("a", "bob")
    assert not delays.penalised("a")


def test_a_success_goes_out_at_once_while_the_addresss_slots_are_busy() -> None:
    """A right password from an address without failures takes no slot: it never queues
    behind that address's other authentications (a NAT, a load generator)."""
    auth = Auth()

    async def main() -> tuple[object, int]:
        b = backends(auth, base=0.01, cap=0.02)
        assert b.delays.try_acquire("192.0.2.7")
        assert b.delays.try_acquire("192.0.2.7")  # both slots busy (slow hashes in the pool, say)
        answer = b.authenticate(request(b"secret"))
        return answer, b.delays.in_flight("192.0.2.7")

    answer, in_flight = asyncio.run(main())
    assert answer == Principal("alice")
    assert in_flight == 2  # none taken
    assert (auth.now_calls, auth.async_calls) == (1, 0)


def test_a_refusal_waits_for_a_free_slot_and_is_counted_at_once() -> None:
    """A wrong password reached inline while the slots are busy is counted (and penalises
    the address) at once, but answered only once a slot is its own and its delay over."""
    auth = Auth()

    async def main() -> None:
        b = backends(auth, base=0.01, cap=0.02)
        delays = b.delays
        assert delays.try_acquire("192.0.2.7")
        assert delays.try_acquire("192.0.2.7")
        answer = b.authenticate(request(b"wrong"))
        assert isinstance(answer, Later)
        assert delays.penalised("192.0.2.7")  # the failure counts now
        # The next attempt of the address, right or wrong, is no longer answered inline.
        second = b.authenticate(request(b"secret"))
        assert isinstance(second, Later)
        await asyncio.sleep(0.05)  # past its delay: it still has no slot
        assert not answer.task.done()
        delays.release("192.0.2.7")  # a slot passes to it (it came first)
        assert await answer.task is RespCode.AUTH
        assert not second.task.done()
        delays.release("192.0.2.7")  # and the next one to the second attempt
        assert await second.task == Principal("alice")
        assert delays.in_flight("192.0.2.7") == 0

    asyncio.run(main())
    assert (auth.now_calls, auth.async_calls) == (1, 1)  # the refusal judged once, inline


def test_an_unfinished_check_waits_for_a_slot_before_it_runs() -> None:
    """A check that must go on (a slow hash) holds a slot: with none free it waits, and
    its work starts only then, once (it is not started over)."""
    concurrency: list[int] = []
    auth = Auth(fast=False, concurrency=concurrency)

    async def main() -> None:
        b = backends(auth)
        delays = b.delays
        assert delays.try_acquire("192.0.2.7")
        assert delays.try_acquire("192.0.2.7")
        answer = b.authenticate(request(b"secret"))
        assert isinstance(answer, Later)
        await asyncio.sleep(0.02)
        assert auth.async_calls == 0  # not started while no slot is free
        delays.release("192.0.2.7")
        assert await answer.task == Principal("alice")
        delays.release("192.0.2.7")
        assert delays.in_flight("192.0.2.7") == 0

    asyncio.run(main())
    assert auth.async_calls == 1


def test_ipv6_addresses_are_grouped_by_prefix() -> None:
    delays = FailureDelays(base=1.0, cap=10.0, ipv6_prefix=64)
    assert delays.key_of("2001:db8:1:2::1") == delays.key_of("2001:db8:1:2:ffff::9")
    assert delays.key_of("2001:db8:1:2::1") != delays.key_of("2001:db8:1:3::1")
    assert delays.key_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert delays.key_of("192.0.2.7") == "192.0.2.7"
    assert FailureDelays(1.0, 1.0, ipv6_prefix=128).key_of("2001:db8::1") == "2001:db8::1/128"
