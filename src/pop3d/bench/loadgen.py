"""Run a scenario from several processes, each with its own event loop, and add up.

Process layout: the parent spawns ``procs`` children and only watches: it draws the progress
line from counters the children publish in shared memory, opens the run once every child has
finished its setup (idle connections held, probe session open), and collects each child's
result at the end.  A child runs ``concurrency / procs`` workers on one event loop (uvloop
when importable); worker *g* (numbered across all processes) always uses the users
``pool[g::concurrency]``, so no two concurrent sessions share a maildrop (RFC 1939 locks
it: a second session would get ``-ERR [IN-USE]``).

Every loop here is bounded: the run by ``duration`` (or by ``count`` within ``timeout``),
the setup by ``ramp_timeout``, the wind-down by :data:`GRACE` after which sessions are
cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import sys
import time
from typing import Any

from pop3d.bench import report
from pop3d.bench.client import Pop3Client, client_context
from pop3d.bench.manifest import Manifest
from pop3d.bench.options import Options
from pop3d.bench.scenarios import SESSIONS, Context, Stats, open_session, probe

#: Seconds the wind-down may take before unfinished sessions are cancelled.
GRACE = 10.0

#: Seconds between two updates of the shared counters / the progress line.
TICK = 0.25

#: Shared counters a child publishes, in this order.
FIELDS = ("sessions", "failures", "messages", "octets", "verify_failures", "held", "probes")


def raise_nofile() -> int:
    """Raise the soft limit of open files to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def _new_loop(kind: str) -> tuple[asyncio.AbstractEventLoop, str]:
    if kind in ("auto", "uvloop"):
        try:
            import uvloop  # noqa: PLC0415 (optional)
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop(), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Child:
    """One load generator process: its workers, its held connections, its probe."""

    def __init__(self, index: int, opts: Options, shared: Any, ready: Any, go: Any) -> None:
        self.index = index
        self.opts = opts
        self.shared = shared
        self.ready = ready
        self.go = go
        self.stats = Stats()
        manifest = Manifest.load(opts.manifest) if opts.manifest else None
        tls = client_context(opts.tls_resume) if opts.tls or opts.tls_resume else None
        self.ctx = Context(opts.host, opts.port, opts.password, self.stats, manifest,
                           opts.auth, opts.repeat, tls)
        self.stop = asyncio.Event()
        self.remaining = self._my_share(opts.count) if opts.count is not None else None

    def _my_share(self, total: int) -> int:
        n, k = self.opts.procs, self.index
        return total // n + (1 if k < total % n else 0)

    def publish(self) -> None:
        s = self.stats
        base = self.index * len(FIELDS)
        values = (s.sessions, s.failures, s.messages, s.octets, s.verify_failures, s.held,
                  len(s.probe))
        for i, v in enumerate(values):
            self.shared[base + i] = v

    async def ticker(self) -> None:
        while True:
            self.publish()
            await asyncio.sleep(TICK)

    async def worker(self, users: tuple[str, ...], deadline: float) -> None:
        session = SESSIONS[self.opts.scenario]
        stats = self.stats
        clock = time.perf_counter
        i = 0
        while clock() < deadline and not self.stop.is_set():
            if self.remaining is not None:
                if self.remaining <= 0:
                    return
                self.remaining -= 1
            user = users[i % len(users)]
            i += 1
            t0 = clock()
            try:
                async with asyncio.timeout(self.opts.session_timeout):
                    await session(self.ctx, user)
            except Exception as exc:
                stats.error(exc)
                # A refused connection must not turn into a busy loop.
                await asyncio.sleep(0.01)
            else:
                stats.sessions += 1
                stats.latencies.append(clock() - t0)

    async def hold(self, users: tuple[str, ...], held: list[Pop3Client]) -> None:
        sem = asyncio.Semaphore(max(1, self.opts.concurrency // self.opts.procs))

        async def one(user: str) -> None:
            async with sem:
                try:
                    async with asyncio.timeout(self.opts.session_timeout):
                        client, _, _ = await open_session(self.ctx, user)
                except Exception as exc:
                    self.stats.error(exc)
                else:
                    held.append(client)
                    self.stats.held += 1

        await asyncio.gather(*(one(u) for u in users))

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        tick = asyncio.create_task(self.ticker())
        pool = opts.pool()
        conc = opts.concurrency
        held: list[Pop3Client] = []
        probe_task: asyncio.Task[None] | None = None
        setup_deadline = time.monotonic() + opts.ramp_timeout
        # --- setup: held connections, probe session ---
        if opts.scenario == "idle":
            mine = pool[self.index :: opts.procs][: self._my_share(opts.idle_conns)]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hold(mine, held), opts.ramp_timeout)
        probe_user = opts.probe_user_name()
        probe_stop = asyncio.Event()
        if probe_user is not None and self.index == 0:
            probe_task = asyncio.create_task(
                probe(self.ctx, probe_user, opts.probe_interval, probe_stop))
        with self.ready.get_lock():
            self.ready.value += 1
        # The go signal is a multiprocessing.Event, which asyncio cannot wait on: poll it.
        while not self.go.is_set() and time.monotonic() < setup_deadline + GRACE:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        # --- run ---
        cpu0, t0 = _cpu(), time.perf_counter()
        limit = opts.duration if opts.count is None else opts.timeout
        deadline = t0 + limit
        workers = []
        if opts.scenario != "idle":
            for g in range(self.index, conc, opts.procs):
                users = pool[g::conc] or (pool[g % len(pool)],)
                workers.append(asyncio.create_task(self.worker(users, deadline)))
        if workers:
            _, pending = await asyncio.wait(workers, timeout=limit + GRACE)
            for task in pending:
                task.cancel()
        else:
            await asyncio.sleep(limit)
        elapsed = time.perf_counter() - t0
        cpu_run = _cpu() - cpu0
        # --- wind down ---
        probe_stop.set()
        if probe_task is not None:
            try:
                await asyncio.wait_for(probe_task, GRACE)
            except Exception as exc:
                self.stats.error(exc)
        if held:
            await asyncio.wait(
                [asyncio.ensure_future(_quietly(c.quit())) for c in held], timeout=GRACE)
            for c in held:
                c.abort()
        tick.cancel()
        self.publish()
        s = self.stats
        return {
            "sessions": s.sessions, "failures": s.failures, "messages": s.messages,
            "octets": s.octets, "verified": s.verified, "verify_failures": s.verify_failures,
            "held": s.held, "resumed": s.resumed, "latencies": s.latencies.tobytes(),
            "probe": s.probe.tobytes(),
            "errors": dict(s.errors), "elapsed": elapsed, "cpu_run": cpu_run,
        }


async def _quietly(aw: Any) -> None:
    with contextlib.suppress(Exception):
        await aw


def _child_main(  # noqa: PLR0917 (a multiprocessing target takes positional arguments)
    index: int, opts: Options, shared: Any, ready: Any, go: Any, results: Any
) -> None:
    """Entry point of a child process."""
    raise_nofile()
    loop, kind = _new_loop(opts.loop)
    try:
        child = _Child(index, opts, shared, ready, go)
        result = loop.run_until_complete(child.run())
        # Let transports closed during the wind-down finish before the loop goes.
        loop.run_until_complete(asyncio.sleep(0.05))
    except BaseException as exc:
        result = {"fatal": f"{type(exc).__name__}: {exc}"}
    finally:
        loop.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result.update(index=index, loop=kind, cpu_user=ru.ru_utime, cpu_system=ru.ru_stime)
    results.put(result)


def _progress(opts: Options, shared: Any, t_start: float, last: list[float]) -> str:
    n = len(FIELDS)
    tot = [sum(shared[p * n + i] for p in range(opts.procs)) for i in range(n)]
    now = time.monotonic()
    dt = max(now - last[0], 1e-6)
    rate = (tot[0] - last[1]) / dt
    mbs = (tot[3] - last[2]) / dt / 1e6
    last[:] = [now, tot[0], tot[3]]
    line = (f"{opts.scenario} {opts.host}:{opts.port}  {now - t_start:6.1f}s  "
            f"sessions {int(tot[0])} ({rate:,.0f}/s)  failed {int(tot[1])}  "
            f"verify-errors {int(tot[4])}")
    if tot[2]:
        line += f"  msgs {int(tot[2])}  {mbs:,.1f} MB/s"
    if opts.scenario == "idle":
        line += f"  held {int(tot[5])}/{opts.idle_conns}"
    if tot[6]:
        line += f"  probes {int(tot[6])}"
    return line


def run(opts: Options) -> dict[str, Any]:
    """Run ``opts`` and return the summary (see :func:`pop3d.bench.report.summarize`)."""
    if not opts.users:
        raise ValueError("no users")
    pool = opts.pool()
    if not pool:
        raise ValueError("every user is taken by the probe session: give more users")
    raise_nofile()
    ctx = mp.get_context("spawn")
    shared = ctx.RawArray("d", opts.procs * len(FIELDS))
    ready = ctx.Value("i", 0)
    go = ctx.Event()
    results: Any = ctx.Queue()
    cpu_self0 = _cpu()
    procs = [
        ctx.Process(target=_child_main, args=(i, opts, shared, ready, go, results),
                    name=f"pop3d-bench-{i}", daemon=True)
        for i in range(opts.procs)
    ]
    t_start = time.monotonic()
    for p in procs:
        p.start()
    out = sys.stderr
    last = [t_start, 0.0, 0.0]
    next_draw = 0.0

    def draw(final: bool = False) -> None:
        nonlocal next_draw
        if opts.progress and (final or time.monotonic() >= next_draw):
            next_draw = time.monotonic() + TICK
            out.write("\r" + _progress(opts, shared, t_start, last) + "\x1b[K")
            if final:
                out.write("\n")
            out.flush()

    # --- setup: wait until every child is ready (bounded) ---
    setup_deadline = t_start + opts.ramp_timeout + GRACE
    while ready.value < opts.procs and time.monotonic() < setup_deadline:
        if not any(p.is_alive() for p in procs):
            break
        draw()
        time.sleep(0.01)
    go.set()
    setup_time = time.monotonic() - t_start
    if opts.ready_file is not None:
        opts.ready_file.write_text(f"{setup_time}\n", encoding="utf-8")
    # --- run: collect results (bounded) ---
    limit = (opts.duration if opts.count is None else opts.timeout) + 3 * GRACE
    collected: list[dict[str, Any]] = []
    run_deadline = time.monotonic() + limit
    while len(collected) < opts.procs and time.monotonic() < run_deadline:
        try:
            collected.append(results.get(timeout=TICK))
        except Exception:  # queue.Empty
            if not any(p.is_alive() for p in procs) and results.empty():
                break
        draw()
    draw(final=True)
    for p in procs:
        p.join(timeout=GRACE)
        if p.is_alive():
            p.kill()
            p.join(timeout=GRACE)
    cpu_parent = _cpu() - cpu_self0
    return report.summarize(opts, collected, setup_time=setup_time, cpu_parent=cpu_parent,
                            cores=len(os.sched_getaffinity(0)))
