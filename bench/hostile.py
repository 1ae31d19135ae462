"""Measure issue 14's hostile-client attacks against a real ``pop3d serve`` (one worker).

    .venv/bin/python bench/hostile.py [uvloop,asyncio] [retr,capa,trickle,stall,stallmem,guess]

Figures, not timings: server RSS growth under a flood, seconds until a trickling, chatty or
stalled client is let go, verdicts (audit lines) under parallel guessing.  Every loop is
bounded in time; servers listen on 127.0.0.1 only and are killed by PID at the end.  To
measure another tree (main, before a change), put its ``src`` first on ``PYTHONPATH`` (and
set ``PYTHONDONTWRITEBYTECODE=1`` so that tree is left untouched).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pop3d.testing import Pop3ServeProcess

USERS = {"alice": "secret", "bob": "pw"}
CAPA_LINE = b"CAPA\r\n"
MESSAGE = (b"Subject: x\r\n\r\n" + (b"y" * 70 + b"\r\n") * 850)[:60000] + b"\r\n"


class AsyncioServe(Pop3ServeProcess):
    """``pop3d serve`` on the standard asyncio loop, even where uvloop is installed."""

    def command(self) -> list[str]:
        """Serve with uvloop's installer switched off."""
        code = (
            "import sys, pop3d.serve as s; s._install_uvloop = lambda: None; "
            "from pop3d.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        return [sys.executable, "-c", code, "serve", "--config", str(self.config_path)]


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in octets."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def server(loop: str, root: Path, **keys: Any) -> Pop3ServeProcess:
    """A server (not started yet) with alice and bob."""
    cls = AsyncioServe if loop == "asyncio" else Pop3ServeProcess
    return cls(root, users=USERS, workers=1, **keys)


def flood(proc: Pop3ServeProcess, payload: bytes, *, login: bool, seconds: float = 6.0) -> str:
    """Send ``payload`` again and again without reading; report the RSS growth."""
    sock = socket.create_connection((proc.host, proc.port), timeout=5)
    reader = sock.makefile("rb")
    reader.readline()
    if login:
        sock.sendall(b"USER alice\r\nPASS secret\r\n")
        reader.readline()
        reader.readline()
    base = peak = rss(proc.pid)
    sock.settimeout(0.2)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and peak - base < 1500 << 20:
        with contextlib.suppress(TimeoutError):
            sent += sock.send(payload)
        peak = max(peak, rss(proc.pid))
    time.sleep(0.5)
    peak = max(peak, rss(proc.pid))
    sock.close()
    return f"client sent {sent >> 10} KiB, server RSS +{(peak - base) >> 20} MiB"


def survival(proc: Pop3ServeProcess, every: float, data: bytes, limit: float = 25.0) -> str:
    """Send ``data`` every ``every`` seconds; report how long until the server closes."""
    sock = socket.create_connection((proc.host, proc.port), timeout=5)
    sock.recv(100)
    sock.settimeout(0.1)
    start = due = time.monotonic()
    try:
        while time.monotonic() - start < limit:
            if time.monotonic() >= due:
                sock.sendall(data)
                due += every
            with contextlib.suppress(TimeoutError):
                if not sock.recv(4096):
                    return f"closed after {time.monotonic() - start:.1f} s"
    except OSError:
        return f"closed after {time.monotonic() - start:.1f} s"
    finally:
        sock.close()
    return f"alive at {limit:.0f} s"


def stalled_reader(proc: Pop3ServeProcess) -> str:
    """RETR of 20 MB never read: when is the lock free again, is the connection kept?"""
    sock = socket.create_connection((proc.host, proc.port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(b"USER alice\r\nPASS secret\r\nRETR 1\r\n")
    reader.readline()
    reader.readline()
    start = time.monotonic()
    freed = "still locked at 30 s"
    while time.monotonic() - start < 30:
        time.sleep(0.5)
        with socket.create_connection((proc.host, proc.port), timeout=5) as other:
            lines = other.makefile("rb")
            lines.readline()
            other.sendall(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
            lines.readline()
            if lines.readline().startswith(b"+OK"):
                freed = f"lock freed after {time.monotonic() - start:.1f} s"
                break
    time.sleep(7)
    port = sock.getsockname()[1]
    query = f"( sport = :{proc.port} and dport = :{port} )"
    out = subprocess.run(
        ["ss", "-tn", "state", "all", query],
        capture_output=True, text=True, check=False,
    ).stdout.splitlines()[1:]
    sock.close()
    kept = out[0].split()[0] if out else "gone"
    return f"{freed}; server side 7 s later: {kept}"


STALLERS = 16
#: A 20 MiB message stored with LF line ends, as an MTA writes it (so it is converted).
BIG = (b"x" * 998 + b"\n") * 21_000


def tree_rss(pid: int) -> int:
    """RSS of ``pid`` and its children (the supervisor and its worker), in octets."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(k) for k in children.read_text().split()] if children.exists() else []
    return rss(pid) + sum(rss(k) for k in kids)


def stalled_memory(proc: Pop3ServeProcess) -> str:
    """``STALLERS`` clients RETR a 20 MiB message and never read: server memory each."""
    base = tree_rss(proc.pid)
    socks = []
    try:
        for i in range(1, STALLERS + 1):
            sock = socket.create_connection((proc.host, proc.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.recv(100)
            sock.sendall(b"USER stall%d\r\nPASS pw\r\nRETR 1\r\n" % i)
            socks.append(sock)
            # one at a time: what a stalled client frees, the next one's RETR can reuse
            # (freed heap is not given back to the kernel, so RSS shows only what is kept)
            time.sleep(0.5)
        time.sleep(2)
        held = tree_rss(proc.pid)
    finally:
        for sock in socks:
            sock.close()
    return (f"{STALLERS} stalled RETRs of 20 MiB: server RSS "
            f"+{(held - base) / STALLERS / (1 << 20):.2f} MiB each (kernel buffers not included)")


def guessers(
    proc: Pop3ServeProcess, parallel: int, seconds: float, right_every: int = 0, wait: float = 0.05
) -> list[int]:
    """Guess alice's password from ``parallel`` connections that reset after PASS.

    Every ``right_every``-th guess of a connection is the right password (0: never).
    Returns [attempts sent, right-password confirmations seen].  Each guesser waits only
    ``wait`` seconds for an answer before it resets, as a client that does not wait for
    -ERR would.  Bounded by ``seconds``.
    """
    stop = time.monotonic() + seconds
    counts = [0, 0]
    lock = threading.Lock()

    def guess() -> None:
        n = 0
        while time.monotonic() < stop:
            n += 1
            right = right_every and n % right_every == 0
            password = b"secret" if right else b"wrong%d" % n
            try:
                sock = socket.create_connection((proc.host, proc.port), timeout=2)
                sock.recv(200)
                sock.sendall(b"USER alice\r\nPASS " + password + b"\r\n")
                sock.settimeout(wait)
                got = b""
                with contextlib.suppress(OSError):
                    while got.count(b"\r\n") < 2:
                        more = sock.recv(200)
                        if not more:
                            break
                        got += more
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                continue
            with lock:
                counts[0] += 1
                counts[1] += b"maildrop has" in got

    threads = [threading.Thread(target=guess) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def guessing(proc: Pop3ServeProcess, seconds: float = 6.0, parallel: int = 50) -> str:
    """Parallel guessers that reset after PASS (the right one every 25th)."""
    counts = guessers(proc, parallel, seconds, right_every=25)
    time.sleep(1)
    verdicts = proc.log_text().count("auth failed")
    return (
        f"{counts[0]} guesses sent in {seconds:.0f} s, {verdicts} audit lines, "
        f"right password confirmed {counts[1]} times"
    )


def main() -> None:
    """Run the attacks named on the command line against each loop named."""
    loops = sys.argv[1].split(",") if len(sys.argv) > 1 else ["uvloop", "asyncio"]
    attacks = sys.argv[2].split(",") if len(sys.argv) > 2 else [
        "retr", "capa", "trickle", "stall", "guess",
    ]
    tmp = Path(tempfile.mkdtemp(prefix="pop3d-hostile-"))
    for loop in loops:
        for attack in attacks:
            keys: dict[str, object] = {}
            if attack in ("trickle", "stall"):
                keys["idle_timeout"] = 5
            if attack == "guess":
                keys.update(failure_delay=2, max_failure_delay=15)
            if attack == "stallmem":
                cls = AsyncioServe if loop == "asyncio" else Pop3ServeProcess
                proc = cls(tmp / f"{loop}-{attack}", workers=1,
                           users={f"stall{i}": "pw" for i in range(1, STALLERS + 1)})
                for i in range(1, STALLERS + 1):
                    proc.add_message(f"stall{i}", BIG)
            else:
                proc = server(loop, tmp / f"{loop}-{attack}", **keys)
            if attack == "retr":
                proc.add_message("alice", MESSAGE)
            if attack == "stall":
                proc.add_message("alice", (b"x" * 998 + b"\r\n") * 20_000)
            proc.start()
            try:
                if attack == "retr":
                    result = flood(proc, b"RETR 1\r\n" * 1000, login=True)
                elif attack == "capa":
                    result = flood(proc, b"CAPA\r\n" * 1000, login=False)
                elif attack == "trickle":
                    result = (
                        f"a byte every 3 s: {survival(proc, 3.0, b'N')}; "
                        f"CAPA every 4 s: {survival(proc, 4.0, CAPA_LINE)}"
                    )
                elif attack == "stall":
                    result = stalled_reader(proc)
                elif attack == "stallmem":
                    result = stalled_memory(proc)
                else:
                    result = guessing(proc)
            finally:
                proc.kill()
            print(f"{loop:8} {attack:8} {result}", flush=True)


if __name__ == "__main__":
    main()
