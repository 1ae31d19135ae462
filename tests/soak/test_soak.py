"""The no-loss soak at CI length: about 10 s a store (``make soak`` runs 10 minutes each).

Short, but every part of the run takes place in it: kills come every 0.5-3 s (the first
one within the load's 8 s), and the test asserts that both delivery paths were accepted
and every session kind ran, so a shorter run cannot quietly exercise less.

``SOAK_SECONDS`` and ``SOAK_SEED`` in the environment change the length and fix the seed;
the seed of a failing run is in the assertion message.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.soak.run import SESSION_KINDS, run_soak

#: Seconds of load per store in CI (the final restart and check come on top).
CI_SECONDS = float(os.environ.get("SOAK_SECONDS", "8"))


@pytest.mark.parametrize("store", ["maildir", "mbox"])
@pytest.mark.timeout(CI_SECONDS + 90)
def test_no_mail_lost_through_kills(store: str, tmp_path: Path) -> None:
    """Every accepted delivery is retrieved and removed by QUIT +OK, or still there, whole."""
    seed = int(os.environ["SOAK_SEED"]) if "SOAK_SEED" in os.environ else None
    report = run_soak(
        store,
        CI_SECONDS,
        tmp_path,
        seed=seed,
        kill_gap=(0.5, 3.0),
        workers=1 if store == "maildir" else 2,
        log=lambda _: None,
    )
    print(report.text())
    assert report.ok, report.text()
    counts = report.counts
    assert counts["kills"] > 0
    assert counts["lmtp accepted"] > 0, "no LMTP delivery was accepted"
    assert counts["deliver accepted"] > 0, "no `pop3d deliver` succeeded"
    assert counts["removed"] > 0, "no message was retrieved and removed"
    idle = [kind for kind in SESSION_KINDS if not counts[f"session {kind}"]]
    assert not idle, f"session kinds that never ran: {idle}"
