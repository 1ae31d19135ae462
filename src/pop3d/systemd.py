"""systemd's two small protocols, without a dependency: socket activation and ``sd_notify``.

* **Socket activation** (``sd_listen_fds(3)``): with ``pop3d.socket``, systemd binds the
  ports and starts the service with the sockets as descriptors 3, 4, ... and the
  environment ``LISTEN_PID`` (our pid), ``LISTEN_FDS`` (how many) and ``LISTEN_FDNAMES``
  (``FileDescriptorName=`` of each, colon-separated).  :func:`listen_fds` takes them (and
  removes the variables, so a child does not take them again).
* **Readiness** (``sd_notify(3)``): with ``Type=notify`` systemd passes ``NOTIFY_SOCKET``
  (a path, or ``@name`` in the abstract namespace); :func:`notify` sends one datagram such
  as ``READY=1``, ``RELOADING=1``, ``STOPPING=1``.  Without the variable it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

__all__ = ["ListenedSocket", "listen_fds", "notify"]

#: The first passed descriptor (SD_LISTEN_FDS_START).
_FIRST_FD = 3


class ListenedSocket:
    """A socket passed by systemd, with its ``FileDescriptorName=``."""

    __slots__ = ("name", "sock")

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name


def listen_fds(environ: dict[str, str] | None = None) -> list[ListenedSocket]:
    """The sockets systemd passed to this process (none when not socket-activated).

    Only when ``LISTEN_PID`` is this process's pid: the variables are meant for the
    process systemd started, not for one it started in turn.
    """
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    out = []
    for i in range(count):
        fd = _FIRST_FD + i
        os.set_inheritable(fd, False)  # noqa: FBT003
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)  # noqa: FBT003
        name = names[i] if i < len(names) and names[i] else "unknown"
        out.append(ListenedSocket(sock, name))
    return out


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ...) to systemd's ``NOTIFY_SOCKET``; False without one.

    ``RELOADING=1`` is sent with ``MONOTONIC_USEC``, as ``Type=notify-reload`` requires.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if state.startswith("RELOADING=1"):
        state += f"\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    target = "\0" + address[1:] if address[0] == "@" else address
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
        contextlib.suppress(OSError),
    ):
        sock.sendto(state.encode(), target)
        return True
    return False
