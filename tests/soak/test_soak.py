"""The no-loss soak at CI length: about 30 s a store (``make soak`` runs 10 minutes each).

``SOAK_SECONDS`` and ``SOAK_SEED`` in the environment change the length and fix the seed;
the seed of a failing run is in the assertion message.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.soak.run import run_soak

#: Seconds of load per store in CI (the final restart and check come on top).
CI_SECONDS = float(os.environ.get("SOAK_SECONDS", "25"))


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
        kill_gap=(1.0, 5.0),
        workers=1 if store == "maildir" else 2,
        log=lambda _: None,
    )
    print(report.text())
    assert report.ok, report.text()
    assert report.counts["delivered"] > 0
    assert report.counts["kills"] > 0
