"""Helpers of the service tests: folders another user can reach, process trees from /proc."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration import helpers
from tests.integration.helpers import children

__all__ = ["children", "is_root", "wait_until"]


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A fresh folder under /tmp that every user may traverse (pytest's are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="pop3d-service-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def wait_until(cond: Callable[[], object], timeout: float = 15.0) -> bool:
    """Poll ``cond`` (bounded) until it is true."""
    return helpers.wait_until(cond, timeout)


def is_root() -> bool:
    return os.geteuid() == 0
