"""A throwaway PostgreSQL server for tests: ``initdb`` in a temporary folder, unix socket only.

Debian's ``postgresql`` package (installed by scripts/setup.sh) ships the server binaries
in ``/usr/lib/postgresql/<version>/bin``.  PostgreSQL refuses to run as root, so when the
tests run as root (CI, sessions) ``initdb`` and ``postgres`` run as the ``postgres``
system user through ``runuser``; the data folder and the socket folder are made theirs.
The server listens on no TCP address at all (``listen_addresses = ''``), only on a unix
socket in its own temporary folder, with ``trust`` authentication for local users; the
port number only names the socket file.  fsync is off: the data is thrown away.

pytest-postgresql was considered: it runs ``pg_ctl`` as the current user and so fails as
root, which is how CI runs; this module is the 100 lines it would have saved.

Used by tests/pg (unit tests of the PostgreSQL backends) and tests/cluster (the
multi-node suite), each through a session-scoped fixture.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pop3d.testing import free_port

#: Where Debian puts the server binaries, newest version first.
_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``, or ``None`` when not installed."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


class PgServer:
    """One PostgreSQL cluster in a temporary folder: start, stop, destroy."""

    def __init__(self, bindir: Path, *, preload: tuple[str, ...] = ()) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="pop3d-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.port = free_port()
        self.user = "postgres"
        self._as_root = os.geteuid() == 0
        self._proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "postgres.log"
        os.chmod(self.root, 0o755)  # noqa: PTH101
        self.socket_dir.mkdir(mode=0o755)
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.socket_dir, pw.pw_uid, pw.pw_gid)
            self.log.touch()
            os.chown(self.log, pw.pw_uid, pw.pw_gid)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        self._run(
            [str(bindir / "initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
        )  # fmt: skip
        settings = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "port": str(self.port),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
        }
        if preload:
            settings["shared_preload_libraries"] = "'" + ",".join(preload) + "'"
        with (self.data / "postgresql.conf").open("a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def _command(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if self._as_root else argv

    def _run(self, argv: list[str]) -> None:
        subprocess.run(
            self._command(argv), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=self.root,
        )  # fmt: skip

    @property
    def url(self) -> str:
        """A libpq URL of the cluster's ``postgres`` database."""
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        """A libpq URL of database ``dbname`` on this cluster (through the unix socket)."""
        return f"postgresql://{self.user}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts connections."""
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                self._command([str(self.bindir / "postgres"), "-D", str(self.data)]),
                stdout=log, stderr=log, cwd=self.root, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", str(self.socket_dir),
                 "-p", str(self.port), "-U", self.user],
                check=False,
            )  # fmt: skip
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("postgres did not start")
            time.sleep(0.1)

    def stop(self, *, immediate: bool = False) -> None:
        """Stop the server (fast shutdown, or immediate: a crash without a checkpoint)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        import signal  # noqa: PLC0415

        # runuser forwards the signal to postgres.
        os.killpg(proc.pid, signal.SIGQUIT if immediate else signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def create_database(self, name: str) -> str:
        """Create database ``name``; return its URL."""
        import psycopg  # noqa: PLC0415

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # names come from the tests
        return self.url_for(name)

    def destroy(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)


def start_or_skip(*, preload: tuple[str, ...] = ()) -> PgServer:
    """Start a throwaway server, or skip the test when PostgreSQL is not installed."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup.sh installs it)")
    try:
        import psycopg  # noqa: F401, PLC0415
    except ImportError:
        pytest.skip("psycopg is not installed")
    server = PgServer(bindir, preload=preload)
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server
