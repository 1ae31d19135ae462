"""Fixtures shared by the storage tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

#: Start ``python -c SCRIPT ARGS...`` with text pipes on stdin and stdout.
PythonSpawner = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn_python() -> Iterator[PythonSpawner]:
    """Start Python helper processes (a lock holder, a committer); killed at the end if
    still running, their pipes closed."""
    procs: list[subprocess.Popen[str]] = []

    def start(script: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
