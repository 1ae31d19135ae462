"""Several worker processes: shared sockets, a supervisor that replaces and reaps them."""

from __future__ import annotations

import os
import poplib
import re
import resource
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pop3d.testing import Pop3ServeProcess, wait_for_port

from .helpers import RawClient, children, cpu_affinity, wait_until


def _login_ok(proc: Pop3ServeProcess) -> bool:
    client = poplib.POP3(proc.host, proc.port, timeout=5)
    try:
        client.user("alice")
        return client.pass_("secret").startswith(b"+OK")
    finally:
        client.quit()


def test_crashed_worker_is_replaced(serve: Callable[..., Pop3ServeProcess]) -> None:
    """A worker killed under the server is replaced and the server keeps serving."""
    proc = serve(workers=2)
    assert wait_until(lambda: len(children(proc.pid)) == 2)
    victim = min(children(proc.pid))
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(children(proc.pid) - {victim}) == 2)
    for _ in range(6):
        assert _login_ok(proc)
    assert proc.stop() == 0
    assert "died" in proc.log_text()


def test_auto_workers_are_one_per_usable_cpu(serve: Callable[..., Pop3ServeProcess]) -> None:
    """workers = "auto" under a one-CPU mask runs one worker; under two, two workers.

    The supervisor is always there (it binds, reads keys, reloads; it serves no client).
    """
    mine = sorted(os.sched_getaffinity(0))
    with cpu_affinity({mine[0]}):
        single = serve()
    assert _login_ok(single)
    assert wait_until(lambda: len(children(single.pid)) == 1)
    if len(mine) > 1:
        with cpu_affinity(set(mine[:2])):
            pair = serve()
        assert wait_until(lambda: len(children(pair.pid)) == 2)
        assert _login_ok(pair)


def test_kill_9_of_supervisor_ends_every_worker(serve: Callable[..., Pop3ServeProcess]) -> None:
    """kill -9 of the server's PID leaves no worker holding the port or a lock."""
    proc = serve(workers=2)
    assert wait_until(lambda: len(children(proc.pid)) == 2)
    workers = children(proc.pid)
    proc.kill()
    assert wait_until(lambda: not any(Path(f"/proc/{w}").exists() for w in workers))
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((proc.host, proc.port)) != 0


def test_sigterm_with_workers_exits_zero(serve: Callable[..., Pop3ServeProcess]) -> None:
    """SIGTERM stops every worker and the server exits 0."""
    proc = serve(workers=2)
    assert _login_ok(proc)
    assert proc.stop(signal.SIGTERM) == 0


def test_relogin_right_after_quit_is_never_locked(
    serve: Callable[..., Pop3ServeProcess],
) -> None:
    """The lock is released before the sign-off: an immediate new session is not IN-USE."""
    proc = serve(workers=2)
    for _ in range(40):  # back to back, spread over both workers by the kernel
        assert _login_ok(proc)


def _fd_targets(pid: int) -> list[str]:
    """What each descriptor of process ``pid`` names (``socket:[inode]``, a path...)."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.append(str(fd.readlink()))
        except OSError:  # closed meanwhile
            continue
    return out


def _worker_of(proc: Pop3ServeProcess, client: RawClient) -> int:
    """The worker process holding the server side of ``client``'s connection."""
    client_port = client.sock.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)) == (
            proc.port, client_port
        ):
            inode = fields[9]
    assert inode is not None, "the server side of the connection was not found"
    [worker] = [w for w in children(proc.pid) if f"socket:[{inode}]" in _fd_targets(w)]
    return worker


def test_a_session_locks_the_maildrop_on_every_worker(
    serve: Callable[..., Pop3ServeProcess],
) -> None:
    """Each worker locks through its own descriptors of the lock table: a session held
    by one worker gets [IN-USE] on the other, and the maildrop is free once it ends."""
    proc = serve(workers=2)
    assert wait_until(lambda: len(children(proc.pid)) == 2)
    holder = RawClient(proc.host, proc.port)
    assert holder.login(b"alice", b"secret").startswith(b"+OK")
    held_by = _worker_of(proc, holder)
    for _ in range(200):  # the kernel decides which worker accepts
        other = RawClient(proc.host, proc.port)
        if _worker_of(proc, other) != held_by:
            break
        other.close()
    else:
        pytest.fail("every connection went to the same worker")
    with holder, other:
        assert other.login(b"alice", b"secret").startswith(b"-ERR [IN-USE]")
        assert holder.cmd(b"QUIT").startswith(b"+OK")
        assert other.login(b"alice", b"secret").startswith(b"+OK")
        # alice's byte lives in one file of the table: each worker opened it once
        table = str(proc.root / "mail" / ".pop3d-locks") + "/"
        for worker in children(proc.pid):
            files = [t for t in _fd_targets(worker) if t.startswith(table)]
            assert len(files) == 1
        assert not any(t.startswith(table) for t in _fd_targets(proc.pid))  # never locks
        assert other.cmd(b"QUIT").startswith(b"+OK")


def test_serve_raises_its_open_files_limit(tmp_path: Path) -> None:
    """A soft limit of 1,024 descriptors is raised to the hard limit (about 1 per session)."""
    proc = Pop3ServeProcess(tmp_path / "srv", {"alice": "secret"}, workers=1)
    proc.write_config()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard > 1024, "this test needs a hard limit above 1024"

    def lower_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    with (tmp_path / "log").open("wb") as log:
        server = subprocess.Popen(
            proc.command(), stdout=log, stderr=log, cwd=proc.root,
            preexec_fn=lower_soft_limit,  # noqa: PLW1509 (no threads run in the child yet)
        )
    try:
        wait_for_port(proc.host, proc.port, 15, process=server)
        limits = Path(f"/proc/{server.pid}/limits").read_text()
        [line] = [ln for ln in limits.splitlines() if ln.startswith("Max open files")]
        assert line.split()[3] == str(hard)
    finally:
        server.terminate()
        assert server.wait(10) == 0


def test_worker_stopped_alone_is_replaced_without_an_error(
    serve: Callable[..., Pop3ServeProcess],
) -> None:
    """SIGTERM to one worker (not the server) stops it cleanly; the supervisor replaces it
    and says so as a warning, not as a crash."""
    proc = serve(workers=2)
    assert wait_until(lambda: len(children(proc.pid)) == 2)
    victim = min(children(proc.pid))
    os.kill(victim, signal.SIGTERM)
    assert wait_until(lambda: len(children(proc.pid) - {victim}) == 2)
    assert _login_ok(proc)
    assert proc.stop() == 0
    log = proc.log_text()
    assert f"worker {victim} stopped without the supervisor" in log
    assert "died" not in log


def test_session_lines_name_the_worker_that_served(
    serve: Callable[..., Pop3ServeProcess],
) -> None:
    """Each log line carries its own process's pid: kept by pop3d, renewed in forked workers."""
    proc = serve(workers=2)
    assert wait_until(lambda: len(children(proc.pid)) == 2)
    workers = children(proc.pid)
    for _ in range(10):
        assert _login_ok(proc)
    assert proc.stop() == 0
    log = proc.log_text()
    session_pids = {int(p) for p in re.findall(r"pop3d\.session\[(\d+)\]", log)}
    assert session_pids
    assert session_pids <= workers
    assert f"[{proc.pid}]:" in log  # the supervisor's own lines name the supervisor
