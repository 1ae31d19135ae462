"""A transport for driving ``Pop3Protocol`` without a socket (unit tests of the server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pop3d.app import build_authenticator, build_store
from pop3d.config import from_mapping
from pop3d.server.context import ServerContext
from pop3d.session import Backends, FailureDelays


def maildir_server(tmp_path: Path) -> ServerContext:
    """A server over ``tmp_path``'s ``users`` file and ``mail/%u/Maildir``, no delays."""
    cfg = from_mapping(
        {"auth": {"passwd_file": "users", "failure_delay": 0},
         "storage": {"maildir": "mail/%u/Maildir"}},
        tmp_path,
    )
    backends = Backends(build_authenticator(cfg), build_store(cfg), FailureDelays(0, 0))
    return ServerContext(cfg, backends, None)


class RecordingTransport:
    """Takes every write at once and records it; flow control changes nothing here."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if key == "peername" else default

    def write(self, data: bytes) -> None:
        self.writelines([data])

    def writelines(self, pieces: list[bytes]) -> None:
        self.out.extend(pieces)

    def get_write_buffer_size(self) -> int:
        return 0  # everything written was taken

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def lines(self) -> list[bytes]:
        """What was written, line by line."""
        return b"".join(self.out).splitlines()
