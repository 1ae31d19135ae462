"""Start, watch and stop the servers under test; every one listens on 127.0.0.1 only.

Each server is pinned with ``taskset`` to the server CPUs.  Only processes this module
started are stopped, by PID: pop3d by the PID of the process it spawned, Dovecot by the
master PID from its pid file (the master takes its children down with it).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_greeting(port: int, timeout: float, tls: bool = False,
                  proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Wait until a POP3 greeting comes from 127.0.0.1:port (POP3S with ``tls``; bounded
    by ``timeout``, and by ``proc``'s exit when given)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, (
                context.wrap_socket(raw) if tls else contextlib.nullcontext(raw)
            ) as s:
                if s.recv(512).startswith(b"+OK"):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is as good as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(") ", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def memory_kib(pid: int) -> tuple[int, int, int]:
    """(VmRSS, Pss, process count) in KiB summed over ``pid`` and its descendants."""
    rss = pss = n = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                    n += 1
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss, n


def cpu_by_process(pid: int) -> dict[int, float]:
    """User+system CPU seconds of ``pid`` and each live descendant, by PID."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for p in descendants(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        out[p] = (int(f[11]) + int(f[12])) / tick
    return out


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its live descendants (plus reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / tick


def make_cert(folder: Path, kind: str = "ec") -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost``: ECDSA P-256 (``ec``, certbot's default
    key type) or RSA 2048 (``rsa``, the older default, still common)."""
    cert, key = folder / f"cert-{kind}.pem", folder / f"key-{kind}.pem"
    key_opts = (["-newkey", "rsa:2048"] if kind == "rsa" else
                ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", *key_opts, "-nodes", "-days", "2",
             "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60)
        key.chmod(0o644)  # Dovecot's login processes read it as dovenull
    return cert, key


class Server:
    """A server under test: ``start()``, ``pid`` (the root of its process tree), ``stop()``.

    ``tls`` (certificate, key) opens a POP3S (implicit TLS) listener on ``tls_port`` too;
    ``store`` is ``"maildir"`` (``mail/<user>/Maildir``) or ``"mbox"`` (``mail/<user>/mbox``).
    """

    name = "server"

    def __init__(self, work: Path, port: int, cpus: str, *,
                 tls: tuple[Path, Path] | None = None, store: str = "maildir") -> None:
        self.work = work
        self.port = port
        self.cpus = cpus
        self.tls = tls
        self.tls_port = free_port() if tls else 0
        self.store = store
        self.pid: int | None = None
        self.error = ""

    def start(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _kill(self, pid: int, timeout: float = 15.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class _ProcessServer(Server):
    """A server that is one foreground process pinned with taskset, logging to a file."""

    def __init__(self, work: Path, port: int, cpus: str, *,
                 tls: tuple[Path, Path] | None = None, store: str = "maildir") -> None:
        super().__init__(work, port, cpus, tls=tls, store=store)
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, command: list[str], log_name: str,
               env: dict[str, str] | None = None) -> bool:
        """Start ``command`` on our CPUs (with ``env``, else ours); True once the port greets."""
        log = (self.work / log_name).open("wb")
        self.proc = subprocess.Popen(
            ["taskset", "-c", self.cpus, *command],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.work, env=env,
        )
        log.close()
        self.pid = self.proc.pid
        if wait_greeting(self.port, 20, proc=self.proc):
            return True
        tail = (self.work / log_name).read_text(errors="replace")[-600:]
        self.error = f"{self.name} did not answer on port {self.port}: {tail.strip()}"
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self._kill(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None


class Pop3d(_ProcessServer):
    """``pop3d serve``, failure delay 0: from this checkout, or from the source folder
    ``src`` (another tree's ``src/``, see :func:`checkout`), then named ``pop3d@label``.

    ``workers`` is a number or ``"auto"`` (one per CPU it is pinned to).
    """

    name = "pop3d"

    def __init__(self, work: Path, port: int, cpus: str, workers: int | str = 1, *,
                 tls: tuple[Path, Path] | None = None, store: str = "maildir",
                 src: Path | None = None, label: str = "") -> None:
        super().__init__(work, port, cpus, tls=tls, store=store)
        self.workers = workers
        self.src = src
        if label:
            self.name = f"pop3d@{label}"

    def _env(self) -> dict[str, str] | None:
        """The environment that makes ``python -m pop3d`` import from ``src`` (None: ours)."""
        if self.src is None:
            return None
        return {**os.environ, "PYTHONPATH": str(self.src)}

    def _imports_from_src(self) -> bool:
        """With ``src``: check that its ``pop3d`` package is the one imported, not ours."""
        if self.src is None:
            return True
        res = subprocess.run([sys.executable, "-c", "import pop3d; print(pop3d.__file__)"],
                             capture_output=True, text=True, env=self._env(), timeout=60,
                             check=False)
        found = Path(res.stdout.strip() or "?").resolve()
        if res.returncode == 0 and found.is_relative_to(self.src.resolve()):
            return True
        self.error = (f"{self.name}: python imports pop3d from {found}, not from {self.src}"
                      f" {res.stderr.strip()[-300:]}")
        return False

    def start(self) -> bool:
        if not self._imports_from_src():
            return False
        cfg = self.work / "pop3d.toml"
        tls_listen = f'tls_listen = ["127.0.0.1:{self.tls_port}"]\n' if self.tls else ""
        tls = f'[tls]\ncert = "{self.tls[0]}"\nkey = "{self.tls[1]}"\n' if self.tls else ""
        storage = ('mbox = "mail/%u/mbox"\n' if self.store == "mbox"
                   else 'maildir = "mail/%u/Maildir"\n')
        workers = f'"{self.workers}"' if isinstance(self.workers, str) else str(self.workers)
        cfg.write_text(
            "[server]\n"
            f'listen = ["127.0.0.1:{self.port}"]\n'
            + tls_listen
            + f"workers = {workers}\n"
            "idle_timeout = 600\n"
            "max_connections = 30000\n"
            "max_connections_per_ip = 30000\n"
            + tls
            + "[auth]\n"
            'passwd_file = "users"\n'
            "failure_delay = 0\n"
            "[storage]\n"
            + storage,
            encoding="utf-8",
        )
        return self._spawn(
            [sys.executable, "-m", "pop3d", "serve", "--config", str(cfg)], "pop3d.log",
            env=self._env(),
        )

    def without_tls(self) -> Pop3d:
        """The same server without its POP3S listener (for a tree that cannot serve one)."""
        plain = copy.copy(self)
        plain.tls, plain.tls_port, plain.proc, plain.pid, plain.error = None, 0, None, None, ""
        return plain


@contextlib.contextmanager
def checkout(rev: str, into: Path) -> Iterator[Path]:
    """This repository's ``rev`` checked out at ``into`` (a temporary detached git
    worktree, removed on exit); yields its ``src`` folder."""
    git = ["git", "-C", str(ROOT)]
    added = subprocess.run([*git, "worktree", "add", "--detach", "--quiet", str(into), rev],
                           capture_output=True, text=True, timeout=300, check=False)
    if added.returncode != 0:
        raise CheckoutError(f"git worktree add {rev}: {added.stderr.strip()}")
    try:
        yield into / "src"
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(into)],
                       capture_output=True, timeout=300, check=False)
        if into.exists():  # not a worktree any more, or git failed: our folder all the same
            shutil.rmtree(into, ignore_errors=True)
            subprocess.run([*git, "worktree", "prune"], capture_output=True, timeout=60,
                           check=False)


def resolve_rev(rev: str) -> str:
    """The commit ``rev`` names in this repository (raises :class:`CheckoutError`)."""
    res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                          f"{rev}^{{commit}}"], capture_output=True, text=True, timeout=60,
                         check=False)
    if res.returncode != 0:
        raise CheckoutError(f"{rev!r} names no commit of {ROOT}")
    return res.stdout.strip()


class CheckoutError(Exception):
    """A revision that cannot be checked out."""


class Dovecot(Server):
    """Dovecot 2.3 from the distribution, config from ``bench/dovecot.conf``."""

    name = "dovecot"

    def start(self) -> bool:
        binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
        if not Path(binary).exists():
            self.error = "dovecot is not installed (scripts/setup.sh installs it)"
            return False
        for sub in ("run", "state"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        conf = (BENCH / "dovecot.conf").read_text(encoding="utf-8")
        ssl = (f"yes\nssl_cert = <{self.tls[0]}\nssl_key = <{self.tls[1]}" if self.tls
               else "no")
        location = ("mbox:@ROOT@/mail/%u/folders:INBOX=@ROOT@/mail/%u/mbox"
                    if self.store == "mbox" else "maildir:@ROOT@/mail/%u/Maildir")
        conf = (conf.replace("@SSL@", ssl).replace("@MAIL_LOCATION@", location)
                .replace("@TLSPORT@", str(self.tls_port)))
        conf = conf.replace("@ROOT@", str(self.work)).replace("@PORT@", str(self.port))
        path = self.work / "dovecot.conf"
        path.write_text(conf, encoding="utf-8")
        subprocess.run(["chown", "-R", "dovecot:dovecot", str(self.work / "mail")], check=True)
        # Dovecot daemonizes and its children keep stdout/stderr: give them a file, not a pipe.
        with (self.work / "dovecot.start.log").open("w+") as out:
            subprocess.run(["taskset", "-c", self.cpus, binary, "-c", str(path)],
                           stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=False)
            out.seek(0)
            started = out.read()
        pidfile = self.work / "run" / "master.pid"
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pidfile.exists():
            self.pid = int(pidfile.read_text().split()[0])
        if self.pid is not None and wait_greeting(self.port, 20):
            return True
        log = self.work / "dovecot.log"
        tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
        self.error = f"dovecot did not start: {started.strip()} {tail.strip()}"
        self.stop()
        return False

    def stop(self) -> None:
        if self.pid is None:
            return
        # Children outlive a master killed mid-way (and keep the listening socket): note
        # them first, then stop the stragglers among them by PID.
        tree = descendants(self.pid)
        self._kill(self.pid)
        for pid in tree[1:]:
            if _alive(pid) and "dovecot" in _cmdline(pid):
                self._kill(pid, timeout=2)
        self.pid = None


def parse_cpus(spec: str) -> set[int]:
    """``0``, ``0,2`` or ``0-3`` as a set of CPU numbers."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


class Twisted(_ProcessServer):
    """Twisted's POP3 server (twisted.mail) over the same Maildirs, from bench/.venv, as
    deployed: Twisted's FilePasswordDB (the passwd-file read at every login) and Twisted's
    log, to ``twisted.events.log`` in the work folder, as twistd writes twistd.log."""

    name = "twisted"

    def options(self) -> list[str]:
        """The peer's password checker and logging (see bench/twisted_pop3.py)."""
        return ["--checker", "twisted", "--log", str(self.work / "twisted.events.log")]

    def start(self) -> bool:
        py = BENCH / ".venv" / "bin" / "python"
        if not py.exists():
            self.error = "bench/.venv is missing (make bench-venv installs twisted there)"
            return False
        return self._spawn(
            [str(py), str(BENCH / "twisted_pop3.py"), "--port", str(self.port),
             "--users", str(self.work / "users"), "--mail", str(self.work / "mail"),
             *self.options()],
            "twisted.log",
        )


class TwistedTuned(Twisted):
    """Twisted's best case: our passwd-file checker, parsed once at start, and no log."""

    name = "twisted-tuned"

    def options(self) -> list[str]:
        return ["--checker", "cached"]
