"""Print the quota overshoot: ten parallel 90 KB deliveries into a 100 KB quota.

``python -m tests.lmtp.quota_race [FOLDER]`` runs, for Maildir and mbox, a real
``pop3d serve`` (two workers) taking ten LMTP deliveries at once (``smtplib.LMTP``, one
thread each), then ten ``pop3d deliver`` processes released at the same moment, and prints
how much each stored.  With ``PYTHONPATH=OTHER/src`` it measures another checkout (the
"before" of a change).  ``tests/lmtp/test_defences.py`` asserts the same races.
"""

from __future__ import annotations

import platform
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pop3d.testing import free_port, wait_for_port

#: A 90 KiB message.
BIG = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * (90 * 1024 // 80)


def stored(root: Path, kind: str) -> int:
    """Octets of alice's mail as stored under ``root`` (Maildir files, or the mbox)."""
    if kind == "maildir":
        folder = root / "mail/alice/Maildir"
        return sum(p.stat().st_size for p in folder.glob("*/*") if p.parent.name in {"new", "cur"})
    path = root / "mbox/alice"
    return path.stat().st_size if path.exists() else 0


def lmtp_race(port: int) -> list[int]:
    """Ten LMTP clients send BIG to alice at once; their reply codes after DATA."""
    codes: list[int] = []
    start = threading.Barrier(10)

    def one() -> None:
        with smtplib.LMTP("127.0.0.1", port, timeout=60) as client:
            start.wait(30)
            try:
                client.sendmail("bob@example.org", ["alice"], BIG)
                codes.append(250)
            except smtplib.SMTPDataError as exc:
                codes.append(exc.smtp_code)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return codes


#: The ``read`` system call's number, by machine (``/proc/PID/syscall`` names it so).
_READ_SYSCALL = {"x86_64": 0, "aarch64": 63, "riscv64": 63, "ppc64le": 3, "s390x": 3}


def reading_stdin(pid: int) -> bool:
    """Whether process ``pid`` is blocked in ``read`` on its file descriptor 0 (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:  # gone, or not Linux
        return False
    number = _READ_SYSCALL.get(platform.machine())
    return len(fields) > 1 and fields[0] == str(number) and int(fields[1], 16) == 0


def deliver_race(config: Path, bound: float = 60.0) -> list[int]:
    """Ten ``pop3d deliver`` processes get BIG at the same moment; their exit statuses.

    The message is written once every process waits in its first ``read`` of standard
    input (it has looked the user up and is ready to deliver), however long a loaded
    machine takes to start ten Pythons (bounded by ``bound`` seconds).
    """
    command = [sys.executable, "-m", "pop3d", "deliver", "--config", str(config), "alice"]
    procs = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for _ in range(10)
    ]
    deadline = time.monotonic() + bound
    waiting = list(procs)
    while waiting := [p for p in waiting if not reading_stdin(p.pid)]:
        if any(p.poll() is not None for p in waiting) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
                p.wait()
            raise AssertionError(f"{len(waiting)} of 10 `pop3d deliver` never read stdin")
        time.sleep(0.01)
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(BIG)
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
    return [p.wait(90) for p in procs]


def measure(root: Path, kind: str) -> None:
    """Run both races for one store kind under ``root`` and print what was stored."""
    root.mkdir(parents=True)
    (root / "users").write_text("alice:{PLAIN}secret\n")
    pop, lmtp = free_port(), free_port()
    template = "mail/%u/Maildir" if kind == "maildir" else "mbox/%u"
    config = root / "pop3d.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{pop}"]\nworkers = 2\n[auth]\npasswd_file = "users"\n'
        f'[storage]\n{kind} = "{template}"\nquota = "100K"\n'
        f'[lmtp]\nlisten = ["127.0.0.1:{lmtp}"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pop3d", "serve", "--config", str(config)],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", lmtp, process=proc, expect=b"220")
        codes = lmtp_race(lmtp)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    print(
        f"{kind} LMTP x10: {codes.count(250)} accepted, "
        f"{stored(root, kind) / 1024:.0f} KiB stored (quota 100 KiB)"
    )
    shutil.rmtree(root / ("mail" if kind == "maildir" else "mbox"))
    statuses = deliver_race(config)
    print(
        f"{kind} pop3d deliver x10: {statuses.count(0)} exit 0, "
        f"{stored(root, kind) / 1024:.0f} KiB stored (quota 100 KiB)"
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        for store in ("maildir", "mbox"):
            measure(Path(sys.argv[1] if len(sys.argv) > 1 else folder) / store, store)
