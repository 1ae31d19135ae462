"""``%h``: the user's home from the user database as the start of the storage template.

Unit checks of the template rules, then a real ``pop3d serve`` with passwd-file users who
have homes (Maildir and mbox): mail delivered by LMTP lands in each user's home and comes
out of POP3; a user without a home is refused with ``-ERR [SYS/PERM]`` and a log line, no
traceback; ``pop3d check-config`` accepts the template.
"""

from __future__ import annotations

import poplib
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3d.errors import ConfigError, NoHome, PermanentBackendError
from pop3d.storage.template import check_template, mail_path, mail_rel
from pop3d.testing import free_port, wait_for_port

BASE = Path("/srv/pop3d")


@pytest.mark.parametrize(
    ("template", "home", "path", "rel"),
    [
        ("%h/Maildir", "/home/alice", "/home/alice/Maildir", "Maildir"),
        ("%h/Maildir", "/home/alice/", "/home/alice/Maildir", "Maildir"),
        ("%h/mail/%u", "/home/alice", "/home/alice/mail/alice", "mail/alice"),
        ("%h/mbox", "/var/homes/a l", "/var/homes/a l/mbox", "mbox"),
    ],
)
def test_home_expands(template: str, home: str, path: str, rel: str) -> None:
    """``%h`` is the home, the root of what follows it."""
    check_template(template)
    assert mail_path(template, "alice", BASE, home) == Path(path)
    assert mail_rel(template, "alice", home) == rel


@pytest.mark.parametrize("template", ["mail/%h", "%h", "%h/", "%hx/Maildir", "%h/%h/x"])
def test_home_only_starts_a_template(template: str) -> None:
    """``%h`` only as the whole first component, with a path after it."""
    with pytest.raises(ConfigError, match=r"%h|per-user|escape"):
        check_template(template)


@pytest.mark.parametrize("home", [None, "", "home/alice", "/", "/home/../etc", "/home/./a",
                                  "/home/a\nb"])  # fmt: skip
def test_a_user_without_a_usable_home_is_refused(home: str | None) -> None:
    """No home, a relative one, ``/``, one with ``.``/``..``: :class:`NoHome`, permanent."""
    with pytest.raises(NoHome):
        mail_path("%h/Maildir", "alice", BASE, home)
    assert issubclass(NoHome, PermanentBackendError)


# ------------------------------------------------------------------ a real server


USERS = (
    "alice:{{PLAIN}}secret:::Alice:{home}/alice::\n"
    "bob:{{PLAIN}}hunter2:::Bob:{home}/bob/::\n"
    "homeless:{{PLAIN}}x::::::\n"
)


class Served:
    """``pop3d serve`` with POP3 and LMTP, a ``%h`` template and passwd-file homes."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root = root
        self.homes = root / "homes"
        for user in ("alice", "bob"):
            (self.homes / user).mkdir(parents=True)
        (root / "users").write_text(USERS.format(home=self.homes))
        self.port, self.lmtp_port = free_port(), free_port()
        template = "%h/Maildir" if kind == "maildir" else "%h/mail/inbox"
        self.config = root / "pop3d.toml"
        self.config.write_text(
            f'[server]\nlisten = ["127.0.0.1:{self.port}"]\n'
            f'[auth]\npasswd_file = "users"\nfailure_delay = 0\n'
            f'[storage]\n{kind} = "{template}"\n'
            f'[lmtp]\nlisten = ["127.0.0.1:{self.lmtp_port}"]\n'
        )
        self.log = root / "serve.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pop3d", "serve", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_for_port("127.0.0.1", self.port, process=self.proc)
            wait_for_port("127.0.0.1", self.lmtp_port, process=self.proc, expect=b"220")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module", params=["maildir", "mbox"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:  # fmt: skip
    s = Served(tmp_path_factory.mktemp(f"home-{request.param}"), request.param)
    try:
        yield s
    finally:
        s.stop()
        assert "Traceback" not in s.log_text()


def test_mail_lands_in_each_users_home(served: Served) -> None:
    """LMTP delivers into ``<home>/...``; POP3 serves it from there, each user their own."""
    with smtplib.LMTP("127.0.0.1", served.lmtp_port, timeout=10) as lmtp:
        for user in ("alice", "bob"):
            lmtp.sendmail("x@example.org", [user], f"Subject: for {user}\r\n\r\nhi\r\n")
    for user, password in (("alice", "secret"), ("bob", "hunter2")):
        files = [p for p in (served.homes / user).rglob("*") if p.is_file()]
        assert files, f"nothing under {user}'s home"
        assert all(f"for {user}".encode() in p.read_bytes() for p in files
                   if b"Subject" in p.read_bytes())  # fmt: skip
        client = poplib.POP3("127.0.0.1", served.port, timeout=10)
        try:
            client.user(user)
            client.pass_(password)
            _, lines, _ = client.retr(1)
            assert f"Subject: for {user}".encode() in lines
            client.quit()
        finally:
            client.close()


def test_a_user_without_a_home_gets_sys_perm(served: Served) -> None:
    """No home in the user database: ``-ERR [SYS/PERM]`` for that user, and a log line."""
    client = poplib.POP3("127.0.0.1", served.port, timeout=10)
    try:
        client.user("homeless")
        with pytest.raises(poplib.error_proto) as info:
            client.pass_("x")
        assert info.value.args[0].startswith(b"-ERR [SYS/PERM]")
    finally:
        client.close()
    deadline = time.monotonic() + 10
    while "uses %h and the user database gives no home" not in served.log_text():
        assert time.monotonic() < deadline, served.log_text()
        time.sleep(0.05)
    line = next(ln for ln in served.log_text().splitlines() if "gives no home" in ln)
    assert "homeless" in line


def test_delivery_to_a_user_without_a_home_is_retried(served: Served) -> None:
    """LMTP answers ``451 4.3.0`` (the MTA retries once the home is set), not a bounce."""
    with smtplib.LMTP("127.0.0.1", served.lmtp_port, timeout=10) as lmtp:
        with pytest.raises(smtplib.SMTPDataError) as info:
            lmtp.sendmail("x@example.org", ["homeless"], "Subject: x\r\n\r\nx\r\n")
        assert info.value.smtp_code == 451
    done = subprocess.run(
        [sys.executable, "-m", "pop3d", "deliver", "--config", str(served.config), "homeless"],
        input=b"Subject: x\n\nx\n", capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 75, done.stderr


def test_check_config_accepts_home(served: Served, tmp_path: Path) -> None:
    """``pop3d check-config`` takes ``%h`` as the per-user variable."""
    config = tmp_path / "pop3d.toml"  # the served one's ports are taken
    config.write_text(
        served.config.read_text()
        .replace(str(served.port), str(free_port()))
        .replace(str(served.lmtp_port), str(free_port()))
        .replace('"users"', f'"{served.root / "users"}"')
    )
    done = subprocess.run(
        [sys.executable, "-m", "pop3d", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
