"""Turn the children's results into one summary (a dict, also the ``--json`` output) and a table.

Rates are over the run phase (after setup), MB are 10^6 octets of message data (what LIST
counts), latencies are in milliseconds, percentiles by nearest rank.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pop3d.bench.options import Options

#: Load generator utilisation (of the cores it may run on) above which it may be the bottleneck.
BUSY = 0.9


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _latency(raw: list[bytes]) -> dict[str, float] | None:
    values: array[float] = array("d")
    for chunk in raw:
        values.frombytes(chunk)
    if not values:
        return None
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 50) * 1e3,
        "p90_ms": percentile(ordered, 90) * 1e3,
        "p99_ms": percentile(ordered, 99) * 1e3,
        "max_ms": ordered[-1] * 1e3,
    }


def summarize(opts: Options, results: list[dict[str, Any]], *, setup_time: float,
              cpu_parent: float, cores: int) -> dict[str, Any]:
    """Add up the children's results into the summary dict."""
    ok = [r for r in results if "fatal" not in r]

    def total(key: str) -> int:
        return sum(int(r.get(key, 0)) for r in ok)

    elapsed = max((float(r["elapsed"]) for r in ok), default=0.0)
    per_s = 1 / elapsed if elapsed > 0 else 0.0
    sessions, octets = total("sessions"), total("octets")
    cpu_total = cpu_parent + sum(r.get("cpu_user", 0.0) + r.get("cpu_system", 0.0)
                                 for r in results)
    cpu_run = sum(float(r.get("cpu_run", 0.0)) for r in ok)
    busy = cpu_run / (elapsed * cores) if elapsed > 0 and cores else 0.0
    missing = opts.procs - len(ok)
    return {
        "scenario": opts.scenario,
        "server": f"{opts.host}:{opts.port}",
        "procs": opts.procs,
        "concurrency": opts.concurrency,
        "loop": ok[0]["loop"] if ok else None,
        "setup_s": setup_time,
        "elapsed_s": elapsed,
        "sessions": sessions,
        "failures": total("failures") + missing,
        "sessions_per_s": sessions * per_s,
        "latency": _latency([r["latencies"] for r in ok]),
        "messages": total("messages"),
        "messages_per_s": total("messages") * per_s,
        "octets": octets,
        "mb_per_s": octets * per_s / 1e6,
        "verified": total("verified"),
        "verify_failures": total("verify_failures"),
        "tls_resumed": total("resumed"),
        "idle": ({"requested": opts.idle_conns, "held": total("held")}
                 if opts.scenario == "idle" else None),
        "probe": _latency([r["probe"] for r in ok]),
        "errors": merge_errors(results),
        "loadgen_cpu": {
            "total_s": cpu_total,
            "run_s": cpu_run,
            "cores": cores,
            "utilization": busy,
            "bottleneck": busy > BUSY,
        },
    }


def _merge_latency(parts: list[dict[str, float] | None]) -> dict[str, float] | None:
    known = [p for p in parts if p]
    if not known:
        return None
    merged: dict[str, float] = {"count": sum(p["count"] for p in known)}
    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        merged[key] = max(p[key] for p in known)
    return merged


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of several runs of the same scenario against the same server.

    For runs taken in slices, interleaved with other servers' (``bench/run.py --rounds``).
    Counts and times add up and rates are recomputed over the summed run time.  A
    percentile is the largest of the parts' own: the whole run's can be no higher (if each
    part has p % of its values at or below its own, all of them together do at or below
    the largest), so the figure is an upper bound, never flattering.
    """
    if len(parts) == 1:
        return parts[0]
    out = dict(parts[0])

    def total(key: str) -> Any:
        return sum(p.get(key) or 0 for p in parts)

    for key in ("setup_s", "elapsed_s", "sessions", "failures", "messages", "octets",
                "verified", "verify_failures", "tls_resumed"):
        out[key] = total(key)
    per_s = 1 / out["elapsed_s"] if out["elapsed_s"] > 0 else 0.0
    out["sessions_per_s"] = out["sessions"] * per_s
    out["messages_per_s"] = out["messages"] * per_s
    out["mb_per_s"] = out["octets"] * per_s / 1e6
    out["latency"] = _merge_latency([p.get("latency") for p in parts])
    out["probe"] = _merge_latency([p.get("probe") for p in parts])
    errors: dict[str, int] = {}
    for p in parts:
        for text, n in (p.get("errors") or {}).items():
            errors[text] = errors.get(text, 0) + n
    out["errors"] = errors
    cpus = [p["loadgen_cpu"] for p in parts if p.get("loadgen_cpu")]
    if cpus:
        run_s = sum(c["run_s"] for c in cpus)
        cores = cpus[0]["cores"]
        busy = run_s / (out["elapsed_s"] * cores) if out["elapsed_s"] > 0 and cores else 0.0
        out["loadgen_cpu"] = {
            "total_s": sum(c["total_s"] for c in cpus),
            "run_s": run_s,
            "cores": cores,
            "utilization": busy,
            "bottleneck": busy > BUSY or any(c["bottleneck"] for c in cpus),
        }
    out["parts"] = len(parts)
    return out


def _ms(lat: dict[str, float] | None) -> str:
    if lat is None:
        return "-"
    return (f"p50 {lat['p50_ms']:.2f}  p90 {lat['p90_ms']:.2f}  p99 {lat['p99_ms']:.2f}  "
            f"max {lat['max_ms']:.2f} ms  (n={lat['count']})")


def table(summary: dict[str, Any]) -> str:
    """The human summary of one run."""
    s = summary
    load = (f"{s['procs']} process(es) x {s['concurrency']} sessions in parallel, "
            f"{s['loop']} loop, {s['elapsed_s']:.1f} s (setup {s['setup_s']:.1f} s)")
    sessions = f"{s['sessions']} ok, {s['failures']} failed, {s['sessions_per_s']:,.0f}/s"
    rows: list[tuple[str, str]] = [
        ("scenario", f"{s['scenario']} against {s['server']}"),
        ("load", load),
        ("sessions", sessions),
        ("session latency", _ms(s["latency"])),
    ]
    if s["messages"]:
        msgs = (f"{s['messages']} ({s['messages_per_s']:,.0f}/s), "
                f"{s['octets'] / 1e6:,.1f} MB ({s['mb_per_s']:,.1f} MB/s)")
        rows.append(("messages", msgs))
    if s["idle"] is not None:
        idle = f"{s['idle']['held']} of {s['idle']['requested']} connections held"
        rows.append(("idle", idle))
    if s["probe"] is not None:
        rows.append(("NOOP probe", _ms(s["probe"])))
    verdict = "OK" if not s["verify_failures"] else "FAILED"
    checked = (f"{verdict}: {s['verified']} messages checked against the manifest, "
               f"{s['verify_failures']} failures")
    rows.append(("verification", checked))
    cpu = s["loadgen_cpu"]
    note = "  << load generator may be the bottleneck" if cpu["bottleneck"] else ""
    use = (f"{cpu['run_s']:.2f} s in the run = {cpu['utilization']:.0%} of "
           f"{cpu['cores']} core(s){note}")
    rows.append(("load generator CPU", use))
    rows.extend((f"error x{n}", text) for text, n in list(s["errors"].items())[:10])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def merge_errors(results: list[dict[str, Any]]) -> dict[str, int]:
    """Add up the error texts of every child."""
    total: Counter[str] = Counter()
    for r in results:
        total.update(r.get("errors", {}))
        if "fatal" in r:
            total[f"load generator process failed: {r['fatal']}"] += 1
    return dict(total.most_common())
