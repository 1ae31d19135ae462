"""What ``pop3d serve`` writes to its log: one line a session, naming the process."""

from __future__ import annotations

import poplib
import re
from collections.abc import Callable
from pathlib import Path

from pop3d.testing import Pop3ServeProcess


def _children(pid: int) -> set[int]:
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


def test_session_lines_name_the_worker_that_served(
    serve: Callable[..., Pop3ServeProcess],
) -> None:
    """Each line carries its own process's pid: kept by pop3d, renewed in forked workers."""
    proc = serve(workers=2)
    for _ in range(10):
        client = poplib.POP3(proc.host, proc.port, timeout=5)
        client.user("alice")
        assert client.pass_("secret").startswith(b"+OK")
        client.quit()
    workers = _children(proc.pid)
    assert len(workers) == 2
    assert proc.stop() == 0
    log = proc.log_text()
    session_pids = {int(p) for p in re.findall(r"pop3d\.session\[(\d+)\]", log)}
    assert session_pids
    assert session_pids <= workers
    assert f"[{proc.pid}]:" in log  # the supervisor's own lines name the supervisor
