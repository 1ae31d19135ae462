"""bench/run.py's table: the per-server-CPU rows beside the wall-clock rates."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).parents[2] / "bench"


def _result(sessions: int, elapsed: float, server_cpu: float, loadgen_cpu: float) -> dict[str, Any]:
    return {"sessions": sessions, "elapsed_s": elapsed, "sessions_per_s": sessions / elapsed,
            "server_cpu_s": server_cpu, "server_cpu_util": server_cpu / elapsed,
            "loadgen_cpu": {"run_s": loadgen_cpu, "utilization": loadgen_cpu / elapsed},
            "failures": 0, "verify_failures": 0}


def test_per_server_cpu_rate_and_its_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions per server CPU-second do not depend on which side saturated: a server at
    a third of its core that spent 1 ms a session shows 1,000, one at full core that
    spent 5 ms shows 200, a ratio of 5 where the wall-clock rates give 1.5."""
    monkeypatch.syspath_prepend(str(BENCH))
    run = importlib.import_module("run")  # bench/ is not a package

    results = {"pop3d": {"login-tls": _result(300, 1.0, 0.3, 0.99)},
               "dovecot": {"login-tls": _result(200, 1.0, 1.0, 0.5)}}
    text = run.table(results, ["pop3d", "dovecot"], 0.0, ["login-tls"], {})
    cells = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]
    rows = {c[1]: c[2:] for c in cells if c[0] == "login-tls"}
    assert rows["sessions/s (full handshake)"] == ["300", "200", "1.50"]
    assert rows["sessions per server CPU-s"] == ["1,000", "200", "5.00"]
    assert rows["loadgen CPU µs/session"] == ["3,300", "2,500", "-"]
    assert "per server CPU-s" in run.TABLE_NOTE
