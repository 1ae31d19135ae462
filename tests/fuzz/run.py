"""``python -m tests.fuzz.run``: run fuzz targets with atheris, one after another.

Each target runs as ``python -m tests.fuzz.fuzz_NAME`` for ``--seconds``, reading its
committed seeds (``tests/fuzz/corpus/NAME/``) and writing what it discovers to a scratch
corpus (``--work``, default ``.fuzz/``: ``corpus/NAME/`` and crash artifacts
``artifacts/NAME-crash-*``).  The summary gives, per target, the runs, the coverage and
the crashes found.  Exit status 1 when any target found a crash.

``FUZZ_TOLERATE=name,...`` in the environment lets a long run go past bugs already
reported (see ``harness.tolerated``).  ``--merge`` afterwards shrinks the scratch corpus
into new committed seeds (``-merge=1``: only inputs that add coverage are kept).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.fuzz.harness import CORPUS, TARGETS

_STATS = re.compile(rb"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+)")


def fuzz(target: str, seconds: float, work: Path, extra: list[str]) -> tuple[int, str]:
    """Run one target; return (libFuzzer's exit status, a one-line summary)."""
    scratch = work / "corpus" / target
    scratch.mkdir(parents=True, exist_ok=True)
    artifacts = work / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", f"tests.fuzz.fuzz_{target}",
        str(scratch), str(CORPUS / target),
        f"-max_total_time={int(seconds)}",
        f"-artifact_prefix={artifacts}/{target}-",
        "-timeout=20", "-rss_limit_mb=2048", "-max_len=8192", "-print_final_stats=1",
        *extra,
    ]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, check=False)
    elapsed = time.monotonic() - started
    log = work / f"{target}.log"
    log.write_bytes(result.stderr + result.stdout)
    stats = _STATS.search(result.stderr)
    runs, cov = (stats.group(1).decode(), stats.group(2).decode()) if stats else ("?", "?")
    crashes = sorted(p.name for p in artifacts.glob(f"{target}-*"))
    verdict = "ok" if result.returncode == 0 else f"exit {result.returncode}"
    summary = (f"{target}: {elapsed:.0f} s, {runs} runs, cov {cov}, {verdict}"
               + (f", artifacts: {' '.join(crashes)}" if crashes else "") + f" (log {log})")
    return result.returncode, summary


def merge(target: str, work: Path) -> None:
    """Add to the committed seeds the scratch inputs that bring new coverage."""
    subprocess.run(
        [sys.executable, "-m", f"tests.fuzz.fuzz_{target}", "-merge=1",
         str(CORPUS / target), str(work / "corpus" / target)],
        capture_output=True, check=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Fuzz the targets given (default: all) for ``--seconds`` each."""
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help=f"some of: {' '.join(TARGETS)}")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    parser.add_argument("--work", type=Path, default=Path(".fuzz"), help="scratch folder")
    parser.add_argument("--merge", action="store_true", help="merge new coverage into seeds")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {' '.join(sorted(unknown))}")
    extra: list[str] = []
    status = 0
    for target in args.targets or TARGETS:
        code, summary = fuzz(target, args.seconds, args.work, extra)
        print(summary, flush=True)
        if code != 0:
            status = 1
        if args.merge:
            merge(target, args.work)
    return status


if __name__ == "__main__":
    sys.exit(main())
