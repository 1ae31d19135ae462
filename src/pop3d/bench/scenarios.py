"""The sessions the load generator runs, and what each checks on every byte it receives.

Every scenario is a coroutine ``session(ctx, user)`` that raises on any failure;
:class:`VerifyError` means the server sent something wrong (a size that disagrees with LIST,
a checksum that disagrees with the manifest, a malformed listing), any other exception means
the session could not be carried out (refused, closed, ``-ERR``).
"""

from __future__ import annotations

import asyncio
import base64
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pop3d.bench.client import Body, Pop3Client, ResumingContext, unstuff
from pop3d.bench.manifest import Manifest

#: Scenario names, in the order the runner and the help list them.
SCENARIOS = ("login", "fetch", "retr-large", "idle", "storm")

#: Errors kept by their text, per process; past this they are only counted.
_MAX_ERROR_KINDS = 20


class VerifyError(Exception):
    """The server's data disagrees with LIST/STAT or with the manifest."""


@dataclass
class Stats:
    """Counters of one load generator process (plain ints: the hot path stays cheap)."""

    sessions: int = 0
    failures: int = 0
    messages: int = 0
    octets: int = 0
    verified: int = 0
    verify_failures: int = 0
    held: int = 0
    #: POP3S sessions whose handshake resumed a TLS session.
    resumed: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))
    probe: array[float] = field(default_factory=lambda: array("d"))
    errors: Counter[str] = field(default_factory=Counter)

    def error(self, exc: BaseException) -> None:
        """Count a failed session, keeping the first kinds of error by their text."""
        self.failures += 1
        if isinstance(exc, VerifyError):
            self.verify_failures += 1
        text = f"{type(exc).__name__}: {exc}"[:120]
        if text in self.errors or len(self.errors) < _MAX_ERROR_KINDS:
            self.errors[text] += 1
        else:
            self.errors["(other errors)"] += 1


@dataclass
class Context:
    """What a session needs: where to connect, how to log in, what to expect."""

    host: str
    port: int
    password: str
    stats: Stats
    manifest: Manifest | None = None
    auth: str = "user"
    #: RETRs of the first message per retr-large session.
    repeat: int = 1
    #: POP3S (implicit TLS) when set; offers the last session when made for resumption.
    tls: ResumingContext | None = None

    def password_for(self, user: str) -> bytes:
        """The password of ``user``: ``%u`` in the pattern stands for the user name."""
        return self.password.replace("%u", user).encode()


Session = Callable[[Context, str], Awaitable[None]]


async def open_session(ctx: Context, user: str) -> tuple[Pop3Client, int, int]:
    """Connect, authenticate, STAT; return the client and STAT's count and size."""
    client, _ = await Pop3Client.connect(ctx.host, ctx.port, tls=ctx.tls)
    ctx.stats.resumed += client.resumed
    async with client:
        name = user.encode()
        if ctx.auth == "plain":
            token = base64.b64encode(b"\0" + name + b"\0" + ctx.password_for(user))
            await client.ok(b"AUTH PLAIN " + token + b"\r\n")
        else:
            await client.ok(b"USER " + name + b"\r\n")
            await client.ok(b"PASS " + ctx.password_for(user) + b"\r\n")
        reply = await client.ok(b"STAT\r\n")
        count, size = _stat(reply)
        expected = ctx.manifest.expected(user) if ctx.manifest else None
        if expected is not None:
            want = (expected.total(), sum(s * k for (s, _), k in expected.items()))
            if (count, size) != want:
                raise VerifyError(f"STAT {count} {size} for {user}, expected {want[0]} {want[1]}")
    return client, count, size


def _stat(reply: bytes) -> tuple[int, int]:
    parts = reply.split()
    if len(parts) < 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise VerifyError(f"malformed STAT reply {reply[:60]!r}")
    return int(parts[1]), int(parts[2])


def _listing(body: Body, what: str) -> list[tuple[int, bytes]]:
    assert body.data is not None
    rows = []
    for line in unstuff(body.data).split(b"\r\n")[:-1]:
        parts = line.split(b" ")
        if len(parts) != 2 or not parts[0].isdigit():
            raise VerifyError(f"malformed {what} line {line[:60]!r}")
        rows.append((int(parts[0]), parts[1]))
    return rows


def _check_uidl(rows: list[tuple[int, bytes]], count: int) -> None:
    if [n for n, _ in rows] != list(range(1, count + 1)):
        raise VerifyError(f"UIDL lists {len(rows)} messages, STAT said {count}")
    uids = [u for _, u in rows]
    if len(set(uids)) != len(uids):
        raise VerifyError("UIDL values are not unique")
    for u in uids:
        if not 1 <= len(u) <= 70 or any(b < 0x21 or b > 0x7E for b in u):
            raise VerifyError(f"UIDL value out of RFC 1939 range {u[:80]!r}")


def _check_list(rows: list[tuple[int, bytes]], count: int, size: int) -> list[int]:
    if [n for n, _ in rows] != list(range(1, count + 1)):
        raise VerifyError(f"LIST shows {len(rows)} messages, STAT said {count}")
    if not all(s.isdigit() for _, s in rows):
        raise VerifyError("LIST size is not a number")
    sizes = [int(s) for _, s in rows]
    if sum(sizes) != size:
        raise VerifyError(f"LIST sizes add up to {sum(sizes)}, STAT said {size}")
    return sizes


def _check_message(
    body: Body, size: int, expected: Counter[tuple[int, int]] | None, consume: bool
) -> None:
    if body.octets != size:
        raise VerifyError(f"RETR sent {body.octets} octets, LIST said {size}")
    if expected is not None:
        key = (size, body.crc)
        if expected[key] <= 0:
            raise VerifyError(f"RETR message of {size} octets matches no expected message")
        if consume:
            expected[key] -= 1


async def login(ctx: Context, user: str) -> None:
    """Connect, greeting, USER, PASS, STAT, QUIT."""
    client, _, _ = await open_session(ctx, user)
    async with client:
        await client.quit()


async def fetch(ctx: Context, user: str) -> None:
    """Log in, UIDL, LIST, RETR every message, QUIT; every message checked."""
    client, count, size = await open_session(ctx, user)
    async with client:
        _check_uidl(_listing(await client.multi(b"UIDL\r\n", keep=True), "UIDL"), count)
        sizes = _check_list(_listing(await client.multi(b"LIST\r\n", keep=True), "LIST"),
                            count, size)
        box = ctx.manifest.expected(user) if ctx.manifest else None
        expected = Counter(box) if box is not None else None
        stats = ctx.stats
        for n, msg_size in enumerate(sizes, 1):
            body = await client.multi(b"RETR %d\r\n" % n)
            _check_message(body, msg_size, expected, consume=True)
            stats.messages += 1
            stats.octets += msg_size
            stats.verified += expected is not None
        if expected is not None and expected.total():
            raise VerifyError(f"{expected.total()} expected messages were not listed")
        await client.quit()


async def retr_large(ctx: Context, user: str) -> None:
    """Log in, LIST, RETR message 1 ``ctx.repeat`` times, QUIT."""
    client, count, size = await open_session(ctx, user)
    async with client:
        sizes = _check_list(_listing(await client.multi(b"LIST\r\n", keep=True), "LIST"),
                            count, size)
        if not sizes:
            raise VerifyError(f"maildrop of {user} is empty")
        box = ctx.manifest.expected(user) if ctx.manifest else None
        stats = ctx.stats
        for _ in range(ctx.repeat):
            body = await client.multi(b"RETR 1\r\n")
            _check_message(body, sizes[0], box, consume=False)
            stats.messages += 1
            stats.octets += sizes[0]
            stats.verified += box is not None
        await client.quit()


SESSIONS: dict[str, Session] = {
    "login": login,
    "fetch": fetch,
    "retr-large": retr_large,
    "storm": login,
}


async def probe(ctx: Context, user: str, interval: float, stop: asyncio.Event) -> None:
    """Hold one session and time a NOOP every ``interval`` seconds until ``stop`` is set."""
    client, _, _ = await open_session(ctx, user)
    async with client:
        samples = ctx.stats.probe
        clock = time.perf_counter
        while not stop.is_set():
            t0 = clock()
            reply = await client.command(b"NOOP\r\n")
            samples.append(clock() - t0)
            if not reply.startswith(b"+OK"):
                raise VerifyError(f"NOOP answered {reply[:60]!r}")
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
        await client.quit()
