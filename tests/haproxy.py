"""Start a real HAProxy for a test or the cluster bench: one way, used by all of them.

:func:`start_haproxy` checks the configuration (``haproxy -c``), starts ``haproxy -db``
with the environment the configuration reads, its output in a log file, and waits until
it accepts on every port named (bounded; a HAProxy that exits fails with its log).
"""

from __future__ import annotations

import os
import shutil
import subprocess
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
    config: Path, env: Mapping[str, str], log: Path, ports: Iterable[int]
) -> subprocess.Popen[bytes]:
    """Start HAProxy with ``config`` once ``haproxy -c`` accepts it; wait for ``ports``.

    ``env`` is added to this process's environment (the configuration reads it).

    Raises:
        RuntimeError: HAProxy is not installed, refuses the configuration, or exits (or
            does not listen) before every port accepts; the message holds its output.

    """
    binary = haproxy_binary()
    if binary is None:
        raise RuntimeError("haproxy is not installed (scripts/setup.sh installs it)")
    full_env = os.environ | dict(env)
    check = subprocess.run(
        [binary, "-c", "-f", str(config)], env=full_env, capture_output=True, check=False,
        timeout=30,
    )
    if check.returncode != 0:
        raise RuntimeError(f"haproxy -c refused {config}: {check.stderr.decode(errors='replace')}")
    with log.open("ab") as out:
        process = subprocess.Popen(
            [binary, "-db", "-f", str(config)], env=full_env, stdin=subprocess.DEVNULL,
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
