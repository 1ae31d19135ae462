"""The mbox scan cache in a real ``pop3d serve``: a login to an unchanged mbox skips the
scan (and so the mbox lock), and every change is seen at the next login: an append by
``pop3d deliver``, a rewrite in place of the same size by another program (mtime set
back), and our own UPDATE.

A remembered login is observed from outside: while the test holds the mbox's dotlock
(a live process's: never stale), a login that had to scan would wait for it; one that
uses the remembered scan does not.  Three users are prepared at once, so the test waits
for the racy window (2 s) only once.
"""

from __future__ import annotations

import os
import poplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pop3d.storage import mbox
from pop3d.testing import Pop3ServeProcess

pytestmark = pytest.mark.timeout(90)

FROM = b"From sender@example.org Thu Nov 14 22:13:20 2023\n"
USERS = {"alice": "pw-a", "bob": "pw-b", "carol": "pw-c"}


def _mbox(*bodies: bytes) -> bytes:
    return b"".join(FROM + b"Subject: %d\n\n" % i + body + b"\n\n" for i, body in enumerate(bodies))


@contextmanager
def _pop(proc: Pop3ServeProcess, name: str, timeout: float = 10.0) -> Iterator[poplib.POP3]:
    client = poplib.POP3(proc.host, proc.port, timeout=timeout)
    try:
        client.user(name)
        client.pass_(USERS[name])
        yield client
    finally:
        client.quit()


def _messages(proc: Pop3ServeProcess, name: str, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    """(UIDL, body) of every message, in one session."""
    with _pop(proc, name, timeout) as c:
        uids = [line.split()[1].decode() for line in c.uidl()[1]]
        return [(uid, b"\n".join(c.retr(i + 1)[1])) for i, uid in enumerate(uids)]


@contextmanager
def _dotlock_held(path: Path) -> Iterator[None]:
    """Hold the mbox's dotlock as a live MDA would (our pid on this host)."""
    lock = path.with_name(path.name + ".lock")
    lock.write_text(f"{os.getpid()}:{socket.gethostname()}\n")
    try:
        yield
    finally:
        lock.unlink()


def test_remembered_scans_see_every_change(tmp_path: Path) -> None:
    proc = Pop3ServeProcess(tmp_path / "srv", users=USERS, workers=1)
    proc._sections["storage"] = {"mbox": "mbox/%u"}
    spool = proc.root / "mbox"
    spool.mkdir()
    paths = {name: spool / name for name in USERS}
    for name, path in paths.items():
        path.write_bytes(_mbox(b"hello " + name.encode(), b"second"))
    changed = max(max(p.stat().st_ctime_ns, p.stat().st_mtime_ns) for p in paths.values())
    with proc:
        # Past the racy window: the next scan of each is remembered.
        while time.time_ns() < changed + (mbox._RACY_SECONDS + 0.2) * 1e9:
            time.sleep(0.05)
        before = {name: _messages(proc, name) for name in USERS}
        for name, path in paths.items():
            with _dotlock_held(path):
                # Remembered: served although another program holds the mbox lock.
                assert _messages(proc, name, timeout=5) == before[name]

        # alice: an append by `pop3d deliver` between sessions.
        done = subprocess.run(
            [sys.executable, "-m", "pop3d", "deliver", "--config", str(proc.config_path),
             "alice"],
            input=b"Subject: late\n\nthird\n", capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        got = _messages(proc, "alice")
        assert got[:2] == before["alice"]
        assert [body for _, body in got[2:]] == [b"Subject: late\n\nthird"]

        # bob: another program rewrites a message in place, same size, mtime set back.
        path = paths["bob"]
        s = path.stat()
        data = path.read_bytes()
        with path.open("r+b") as f:
            f.write(data.replace(b"hello bob", b"HELLO BOB"))
        os.utime(path, ns=(s.st_atime_ns, s.st_mtime_ns))
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (s.st_size, s.st_mtime_ns)
        got = _messages(proc, "bob")
        assert got[0][1] == b"Subject: 0\n\nHELLO BOB"
        assert got[0][0] != before["bob"][0][0]  # its UIDL is of the new content
        assert got[1] == before["bob"][1]

        # carol: our own UPDATE.
        with _pop(proc, "carol") as c:
            c.dele(1)
        assert _messages(proc, "carol") == before["carol"][1:]
    assert "Traceback" not in proc.log_text()
