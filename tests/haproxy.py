"""Start a real HAProxy for a test or the cluster bench: one way, used by all of them.

:func:`start_haproxy` checks the configuration (``haproxy -c``), starts ``haproxy -db``
with the environment the configuration reads, its output in a log file, and waits until
it accepts on every port named (bounded; a HAProxy that exits fails with its log).
Given a ``stats`` path, it adds a stats socket there (a second configuration file, so the
configuration under test stays as shipped); :func:`wait_servers_up` then waits until
HAProxy's own health checks have found every server up -- the event to wait for after a
node starts, instead of a sleep of a few check intervals.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from pop3d.testing import wait_for_port

#: How long HAProxy may take to listen.
START_TIMEOUT = 20.0


def haproxy_binary() -> str | None:
    """The ``haproxy`` program, or ``None`` when it is not installed."""
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    return found if Path(found).exists() else None


def start_haproxy(
    config: Path, env: Mapping[str, str], log: Path, ports: Iterable[int],
    stats: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start HAProxy with ``config`` once ``haproxy -c`` accepts it; wait for ``ports``.

    ``env`` is added to this process's environment (the configuration reads it).
    ``stats``: where HAProxy opens a stats socket (read by :func:`wait_servers_up`).

    Raises:
        RuntimeError: HAProxy is not installed, refuses the configuration, or exits (or
            does not listen) before every port accepts; the message holds its output.

    """
    binary = haproxy_binary()
    if binary is None:
        raise RuntimeError("haproxy is not installed (scripts/setup.sh installs it)")
    full_env = os.environ | dict(env)
    files = ["-f", str(config)]
    if stats is not None:
        extra = stats.with_name(stats.name + ".cfg")
        extra.write_text(f'global\n    stats socket "{stats}" mode 600 level user\n')
        files += ["-f", str(extra)]
    check = subprocess.run(
        [binary, "-c", *files], env=full_env, capture_output=True, check=False, timeout=30,
    )
    if check.returncode != 0:
        raise RuntimeError(f"haproxy -c refused {config}: {check.stderr.decode(errors='replace')}")
    with log.open("ab") as out:
        process = subprocess.Popen(
            [binary, "-db", *files], env=full_env, stdin=subprocess.DEVNULL,
            stdout=out, stderr=out,
        )
    try:
        for port in ports:
            wait_for_port("127.0.0.1", port, START_TIMEOUT, process=process, expect=b"")
    except (RuntimeError, TimeoutError):
        process.kill()
        process.wait(10)
        raise RuntimeError(f"haproxy did not start: {log.read_text(errors='replace')}") from None
    return process


def server_states(stats: Path) -> dict[str, tuple[str, str]]:
    """Every backend server's ``(status, check_status)``, by ``backend/server``, from
    HAProxy's ``show stat`` on the stats socket ``stats``."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    rows = csv.DictReader(data.decode().removeprefix("# ").splitlines())
    return {f"{r['pxname']}/{r['svname']}": (r["status"], r["check_status"]) for r in rows
            if r["svname"] not in ("FRONTEND", "BACKEND")}


def wait_servers_up(stats: Path, bound: float = 30.0) -> None:
    """Wait until HAProxy's health checks have found every server up (bounded).

    Up means the state ``UP`` (not ``UP 1/2``, going down) and a last check that passed
    (``L4OK``/``L7OK``, not ``INI`` before the first check).
    """
    deadline = time.monotonic() + bound
    while True:
        states = server_states(stats)
        if states and all(s == "UP" and c.endswith("OK") for s, c in states.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"HAProxy's servers not all up within {bound} s: {states}")
        time.sleep(0.05)
