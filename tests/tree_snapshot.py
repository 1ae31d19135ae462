"""A snapshot of a folder tree, to show that nothing outside a mail root changed."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path


def snapshot(tree: Path) -> dict[str, tuple[int, int, str]]:
    """(mode, mtime_ns, sha256) of everything under ``tree``, links not followed."""
    out: dict[str, tuple[int, int, str]] = {}
    for path in sorted([tree, *tree.rglob("*")]):
        s = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(s.st_mode) else ""
        out[str(path)] = (s.st_mode, s.st_mtime_ns, digest)
    return out
