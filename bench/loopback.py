"""The raw loopback ceiling: how fast one process can push bytes to another over 127.0.0.1.

A sender pinned to the server's CPUs writes a 4 MiB buffer over and over; a receiver pinned
to the load generator's CPUs reads into a 1 MiB buffer and counts.  No protocol, no
checks: what retr-large could reach if a server cost nothing.  ``python bench/loopback.py``
prints MB/s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time
from typing import Any


def _cpus(spec: str) -> set[int]:  # same as servers.parse_cpus, kept standalone
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _send(cpus: str, seconds: float, port_out: Any) -> None:
    os.sched_setaffinity(0, _cpus(cpus))
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port_out.send(srv.getsockname()[1])
        srv.settimeout(10)
        conn, _ = srv.accept()
        with conn:
            block = b"x" * (4 << 20)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                conn.sendall(block)


def _recv(cpus: str, port: int, result: Any) -> None:
    os.sched_setaffinity(0, _cpus(cpus))
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    total = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        t0 = time.perf_counter()
        while n := s.recv_into(view):
            total += n
        elapsed = time.perf_counter() - t0
    result.send(total / elapsed / 1e6)


def measure(seconds: float = 2.0, server_cpus: str = "0", client_cpus: str = "1") -> float:
    """Return the loopback throughput in MB/s (10^6 octets per second)."""
    ctx = mp.get_context("spawn")
    port_r, port_w = ctx.Pipe(duplex=False)
    res_r, res_w = ctx.Pipe(duplex=False)
    sender = ctx.Process(target=_send, args=(server_cpus, seconds, port_w), daemon=True)
    sender.start()
    if not port_r.poll(10):
        sender.kill()
        raise RuntimeError("loopback sender did not start")
    port = port_r.recv()
    receiver = ctx.Process(target=_recv, args=(client_cpus, port, res_w), daemon=True)
    receiver.start()
    rate = float(res_r.recv()) if res_r.poll(seconds + 30) else 0.0
    for p in (sender, receiver):
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    return rate


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--server-cpus", default="0")
    ap.add_argument("--client-cpus", default="1")
    a = ap.parse_args()
    print(f"{measure(a.seconds, a.server_cpus, a.client_cpus):,.0f} MB/s")
