"""Timing distributions per class of user, compared robustly (no single-operation bound).

Samples of every class are taken *interleaved*, in a shuffled order, so that whatever
else the machine does slows every class alike; classes are then compared by their
medians and by the probability of superiority (the Mann-Whitney U statistic over n*m:
the chance that a sample of one class is slower than one of the other, 0.5 when the two
distributions are the same).  Neither grows with the sample count the way a p-value
does, so a test bound on them neither flakes on a loaded machine nor misses a real gap.

``python -m tests.auth.timing`` prints the figures of the report (in-process, the
authenticator of ``src/``): median milliseconds per class for a wrong password, a SCRAM
first step and a CRAM-MD5 secret.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import argon2
from passlib.hash import sha512_crypt

from pop3d.auth import schemes

#: Argon2id and SHA512-CRYPT at low cost, so that hundreds of samples take seconds; the
#: code paths are those of production hashes (libsodium verifies this Argon2 shape).
CHEAP_ARGON2ID = "{ARGON2ID}" + argon2.PasswordHasher(
    time_cost=1, memory_cost=1024, parallelism=1, hash_len=32, salt_len=16,
    type=argon2.Type.ID,
).hash(b"argon pw")
CHEAP_SHA512_CRYPT = "{SHA512-CRYPT}" + sha512_crypt.using(rounds=1000).hash(b"crypt pw")


def users_file(folder: Path, plain_users: int = 20) -> Path:
    """A passwd-file of mostly PLAIN users, one Argon2id, one SHA512-CRYPT, one SCRAM."""
    lines = [f"p{i}:{{PLAIN}}pw{i}" for i in range(plain_users)]
    lines += [f"argon:{CHEAP_ARGON2ID}", f"sha512:{CHEAP_SHA512_CRYPT}",
              "scram:" + schemes.hash_password("SCRAM-SHA-256", b"scram pw")]
    path = folder / "users"
    path.write_text("\n".join(lines) + "\n")
    return path


#: The user of each class in :func:`users_file`.
CLASSES: Mapping[str, str] = {
    "unknown": "nobody",
    "known-PLAIN": "p3",
    "known-ARGON2ID": "argon",
    "known-SHA512-CRYPT": "sha512",
}


async def interleaved(
    probes: Mapping[str, Callable[[], Awaitable[object]]], samples: int
) -> dict[str, list[float]]:
    """Time ``samples`` awaits of each probe, all classes shuffled together (seconds)."""
    order = [name for name in probes for _ in range(samples)]
    random.Random(1939).shuffle(order)
    out: dict[str, list[float]] = {name: [] for name in probes}
    for name in order:
        start = time.perf_counter()
        await probes[name]()
        out[name].append(time.perf_counter() - start)
    return out


def superiority(a: list[float], b: list[float]) -> float:
    """P(a sample of ``a`` is slower than one of ``b``), ties counting half."""
    ordered = sorted(b)
    wins = 0.0
    for x in a:
        below = bisect.bisect_left(ordered, x)
        ties = bisect.bisect_right(ordered, x) - below
        wins += below + ties / 2
    return wins / (len(a) * len(b))


def median_ms(values: list[float]) -> float:
    """The median in milliseconds."""
    return statistics.median(values) * 1000


def summary(times: Mapping[str, list[float]]) -> str:
    """``class median ms`` for each class, one line."""
    return ", ".join(f"{name} {median_ms(v):.3f} ms" for name, v in times.items())


def spread(times: Mapping[str, list[float]]) -> tuple[float, float]:
    """(largest / smallest median, the superiority farthest from 0.5 over all pairs)."""
    medians = [statistics.median(v) for v in times.values()]
    names = list(times)
    worst = 0.5
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            p = superiority(times[x], times[y])
            if abs(p - 0.5) > abs(worst - 0.5):
                worst = p
    return max(medians) / min(medians), worst


async def _main(samples: int) -> None:
    import tempfile  # noqa: PLC0415

    from pop3d.auth.passwd_file import PasswdFileAuthenticator  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as folder:
        auth = PasswdFileAuthenticator(users_file(Path(folder)), check_interval=3600)
        ops: dict[str, Callable[[str], Awaitable[object]]] = {
            "PASS wrong": lambda u: auth.verify_password(u, b"wrong"),
            "SCRAM first step": lambda u: auth.secret_for(u, "SCRAM-SHA-256"),
            "CRAM-MD5 secret": lambda u: auth.secret_for(u, "CRAM-MD5"),
        }
        for op, call in ops.items():
            probes = {c: functools.partial(call, u) for c, u in CLASSES.items()}
            times = await interleaved(probes, samples)
            ratio, p = spread(times)
            print(f"{op}: {summary(times)}; median ratio {ratio:.2f}, superiority {p:.2f}")
        auth.close()


if __name__ == "__main__":
    import sys

    asyncio.run(_main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
