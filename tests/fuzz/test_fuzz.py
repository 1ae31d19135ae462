"""The fuzz targets in CI: every committed corpus input, then a few seconds of atheris each.

``make fuzz`` runs them for longer (``FUZZ_SECONDS``, default 300 a target).  The replay
runs in this process, input by input, so a failure names the file; the short fuzzing run
is ``python -m tests.fuzz.fuzz_NAME`` under atheris, in a subprocess, with a scratch
corpus (``FUZZ_CI_SECONDS``, default 2 a target).
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.harness import CORPUS, TARGETS

#: Seconds of coverage-guided fuzzing per target in CI.
CI_SECONDS = int(os.environ.get("FUZZ_CI_SECONDS", "2"))

#: Inputs that reproduce a bug found by fuzzing in a file this branch does not own, one
#: folder per target.  They are kept out of the fuzzing corpus (atheris would stop at
#: once on them) and must still fail, as a strict xfail would: the day one passes, this
#: test says so, and the file moves to ``corpus/<target>/`` as a regression seed.
KNOWN_FAILURES = Path(__file__).parent / "known_failures"


def _inputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays(target: str) -> None:
    """Every committed input of a target passes its properties (regressions stay fixed)."""
    module = importlib.import_module(f"tests.fuzz.fuzz_{target}")
    inputs = _inputs(CORPUS / target)
    assert inputs, f"no seed corpus for {target}"
    failures = []
    for path in inputs:
        try:
            module.test_one_input(path.read_bytes())
        except Exception as exc:
            failures.append(f"{path.name}: {type(exc).__name__}: {exc}")
    for path in _inputs(KNOWN_FAILURES / target):
        try:
            module.test_one_input(path.read_bytes())
        except AssertionError:
            continue
        failures.append(f"known_failures/{target}/{path.name} passes now: move it to corpus/")
    assert not failures, "\n".join(failures)


def test_lmtp_replies_echo_nothing() -> None:
    """An LMTP reply never carries the client's control octets, nor its unknown command or
    VRFY argument (house rule: no echo)."""
    fuzz_lmtp = importlib.import_module("tests.fuzz.fuzz_lmtp")
    listener = fuzz_lmtp._get_listener()
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
        sock.sendall(b"\x00\x1b[2J\r\nVRFY \x1b]0;x\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        replies = b""
        while chunk := sock.recv(65536):
            replies += chunk
    assert b"\x1b" not in replies
    assert b"\x00" not in replies
    assert b"2J" not in replies
    assert b"0;x" not in replies


#: Bugs found by fuzzing and reported, each reproduced by a file of ``known_failures/``:
#: the short fuzzing run steps over them (``harness.tolerated``), so that it looks for
#: new ones.  Remove a name when its bug is fixed.
KNOWN_BUGS: tuple[str, ...] = ()


@pytest.mark.timeout(CI_SECONDS + 100)
def test_fuzz_briefly(tmp_path: Path) -> None:
    """A few seconds of atheris on every target, all at once, find no crash."""
    pytest.importorskip("atheris", reason="atheris is in the test dependency group")
    runs = {}
    for target in TARGETS:
        scratch = tmp_path / target
        scratch.mkdir()
        runs[target] = subprocess.Popen(
            [
                sys.executable, "-m", f"tests.fuzz.fuzz_{target}",
                str(scratch), str(CORPUS / target),
                f"-max_total_time={CI_SECONDS}", f"-artifact_prefix={scratch}/",
                "-timeout=20", "-rss_limit_mb=2048", "-max_len=8192",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "FUZZ_TOLERATE": ",".join(KNOWN_BUGS)},
        )
    failures = []
    for target, proc in runs.items():
        try:
            _, err = proc.communicate(timeout=CI_SECONDS + 90)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            failures.append(f"{target}: did not finish")
            continue
        if proc.returncode != 0:
            failures.append(f"{target}: exit {proc.returncode}\n"
                            + err.decode(errors="replace")[-3000:])
    assert not failures, "\n".join(failures)
