"""A canned POP3 server: every reply precomputed, RETR is one ``sendall``.

It serves one message (a file) to any user and password, so that retr-large run against it
shows what the load generator itself can take in, checks included: if a real server comes
near this figure, the generator, not the server, is what is measured.  127.0.0.1 only;
stops after ``--seconds``.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

from pop3d.bench.manifest import stuff, to_wire


def serve(conn: socket.socket, retr: bytes, size: int) -> None:
    with conn, conn.makefile("rb") as rfile:
        conn.sendall(b"+OK canned\r\n")
        for line in rfile:
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"RETR":
                conn.sendall(retr)
            elif verb == b"STAT":
                conn.sendall(b"+OK 1 %d\r\n" % size)
            elif verb == b"LIST":
                conn.sendall(b"+OK\r\n1 %d\r\n.\r\n" % size)
            elif verb == b"QUIT":
                conn.sendall(b"+OK bye\r\n")
                return
            else:
                conn.sendall(b"+OK\r\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--message", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=120)
    a = ap.parse_args()
    wire = to_wire(a.message.read_bytes())
    retr = b"+OK\r\n" + stuff(wire) + b".\r\n"
    end = time.monotonic() + a.seconds
    with socket.create_server(("127.0.0.1", a.port), backlog=128) as srv:
        srv.settimeout(0.5)
        while time.monotonic() < end:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve, args=(conn, retr, len(wire)), daemon=True).start()


if __name__ == "__main__":
    main()
