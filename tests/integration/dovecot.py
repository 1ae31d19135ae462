"""Start a real Dovecot 2.3 (as root, on loopback) over a Maildir tree, for comparisons.

Adapted from shared/peers/dovecot/dovecot.conf: every path under one short folder (unix
socket paths are limited to 108 octets), POP3 only on one loopback port, passwd-file
PLAIN users, Maildir owned by the packaged ``dovecot`` user, and the RFC 1939 session
lock on.  Stopped with SIGTERM to its master PID, then the folder is removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from pop3d.testing import free_port, wait_for_port

CONF = """\
protocols = pop3
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
instance_name = pop3d-test-{port}
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
default_internal_user = root
default_internal_group = root
default_login_user = dovenull
first_valid_uid = 0
first_valid_gid = 0
auth_failure_delay = 0
disable_plaintext_auth = no
auth_mechanisms = plain login
ssl = no
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={root}/mail/%u
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
mail_location = maildir:{root}/mail/%u/Maildir
pop3_uidl_format = %08Xu%08Xv
pop3_lock_session = yes
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


class Dovecot:
    """A Dovecot POP3 server with the given users; add mail before :meth:`start`."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pd-dc-", dir="/tmp"))
        self.root.chmod(0o755)
        self.host = "127.0.0.1"
        self.port = free_port()
        (self.root / "run").mkdir()
        (self.root / "state").mkdir()
        (self.root / "users").write_text(
            "".join(f"{u}:{{PLAIN}}{p}\n" for u, p in users.items())
        )
        for user in users:
            for sub in ("tmp", "new", "cur"):
                (self.maildir(user) / sub).mkdir(parents=True)
        self.conf = self.root / "dovecot.conf"
        self.conf.write_text(CONF.format(root=self.root, port=self.port))

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user / "Maildir"

    def add_message(self, user: str, name: str, data: bytes) -> None:
        (self.maildir(user) / "new" / name).write_bytes(data)

    def start(self) -> Self:
        subprocess.run(["chown", "-R", "dovecot:dovecot", str(self.root / "mail")], check=True)
        # Dovecot daemonizes: its children would hold a pipe open, so errors go to a file.
        errors = self.root / "start.err"
        with errors.open("wb") as err:
            done = subprocess.run(
                ["dovecot", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=30, check=False,
            )
        if done.returncode != 0:
            text = errors.read_text(errors="replace")
            self.cleanup()
            raise RuntimeError(f"dovecot did not start: {text}")
        try:
            wait_for_port(self.host, self.port, 15)
        except TimeoutError:
            self.stop()
            raise
        return self

    def log(self) -> str:
        try:
            return (self.root / "dovecot.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        pid_file = self.root / "run" / "master.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            pid = 0
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pid = 0
        deadline = time.monotonic() + 15
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)  # waiting for another process to exit: no event to wait on
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
