"""A raw POP3 line client for tests that must control every byte sent."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from pop3d.testing import Pop3ServeProcess, Pop3TestServer

#: The ``pop3_server_factory`` fixture: start an in-process server with config overrides.
ServerFactory = Callable[..., Pop3TestServer]

#: The ``serve`` fixture: start a ``pop3d serve`` subprocess.
ServeFactory = Callable[..., Pop3ServeProcess]

#: Seconds any single wait for the server may take before the test fails.
WAIT = 10.0


class RawClient:
    """A blocking socket with POP3 line helpers; every read is bounded by ``timeout``."""

    def __init__(self, host: str, port: int, timeout: float = WAIT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.greeting = self.line()

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def abort(self) -> None:
        """Close with a TCP reset (SO_LINGER 0): the rudest way a client can vanish."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def has_data(self) -> bool:
        """Whether something was received and not read yet (without waiting)."""
        return bool(self.buf) or bool(select.select([self.sock], [], [], 0)[0])

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def line(self) -> bytes:
        """Return the next line with its CRLF (b"" at EOF)."""
        while b"\r\n" not in self.buf:
            if not self._fill():
                rest, self.buf = self.buf, b""
                return rest
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def multiline(self) -> list[bytes]:
        """Return the lines of a multi-line body after its status line, un-stuffed."""
        out: list[bytes] = []
        while True:
            line = self.line()
            if not line:
                raise ConnectionError("EOF inside a multi-line response")
            if line == b".\r\n":
                return out
            out.append(line[1:-2] if line.startswith(b".") else line[:-2])

    def raw_multiline(self) -> bytes:
        """Return a multi-line body exactly as sent (stuffed), with its ``.CRLF`` terminator."""
        while True:
            if self.buf.startswith(b".\r\n"):
                cut = 3
            else:
                end = self.buf.find(b"\r\n.\r\n")
                cut = end + 5 if end >= 0 else 0
            if cut:
                body, self.buf = self.buf[:cut], self.buf[cut:]
                return body
            if not self._fill():
                raise ConnectionError("EOF inside a multi-line response")

    def cmd(self, command: bytes) -> bytes:
        """Send one command line (CRLF added) and return the status line."""
        self.send(command + b"\r\n")
        return self.line()

    def login(self, user: bytes, password: bytes) -> bytes:
        """USER + PASS; return the PASS status line (asserting USER's +OK)."""
        assert self.cmd(b"USER " + user).startswith(b"+OK")
        return self.cmd(b"PASS " + password)

    def wait_eof(self, timeout: float = WAIT) -> bytes:
        """Read until the server closes; return what it sent meanwhile.

        Raises:
            TimeoutError: the server did not close within ``timeout``.

        """
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self._fill():
                    break
            except ConnectionResetError:
                break
        rest, self.buf = self.buf, b""
        return rest


@contextlib.contextmanager
def cpu_affinity(cpus: set[int]) -> Iterator[None]:
    """Run the block (and what it starts: children inherit it) on ``cpus`` only."""
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def children(pid: int) -> set[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # the command may contain spaces: the fields after the last ")" are fixed
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(entry.name))
    return kids


def wait_until(cond: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``cond`` every 50 ms (at most ``timeout`` s) until it is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def need(tool: str) -> str:
    """The path of the program ``tool``; the test is skipped where it is not installed."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")
    return path


def greets(srv: Pop3TestServer) -> bool:
    """Whether a new connection is greeted ``+OK`` (a connection slot is free)."""
    with RawClient(srv.host, srv.port) as client:
        return client.greeting.startswith(b"+OK")


def server_send_queue(port: int, client: socket.socket) -> int:
    """Octets the kernel holds for ``client`` on the server's side (``ss``'s Send-Q) of an
    established connection to ``port``; -1 if there is none (the server closed it)."""
    peer = client.getsockname()[1]
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( sport = :{port} and dport = :{peer} )"],
        capture_output=True, text=True, check=False,
    ).stdout.split()
    return int(out[1]) if len(out) > 1 else -1


def stalled_send_queue(port: int, sock: socket.socket) -> int:
    """Wait until the server's kernel queue for ``sock`` stops growing; return its size."""
    last = -1
    for _ in range(100):
        time.sleep(0.05)
        queued = server_send_queue(port, sock)
        if queued == last and queued > 0:
            return queued
        last = queued
    pytest.fail("the server's kernel queue never filled")
