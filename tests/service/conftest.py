"""Helpers of the service tests: folders another user can reach, process trees from /proc."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A fresh folder under /tmp that every user may traverse (pytest's are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="pop3d-service-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def children(pid: int) -> set[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(entry.name))
    return kids


def wait_until(cond: Callable[[], object], timeout: float = 15.0) -> bool:
    """Poll ``cond`` (bounded) until it is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def is_root() -> bool:
    return os.geteuid() == 0
