"""``pop3d user`` and ``pop3d mailbox stat``, driven in-process through ``pop3d.cli.main``."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pop3d.auth.passwd_file import PasswdFileAuthenticator
from pop3d.cli import main

HEADER = "# users of the test site\n"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A config with a passwd-file holding a comment and bob (with a quota field)."""
    (tmp_path / "users").write_text(
        HEADER + "bob:{PLAIN}hunter2::::::userdb_quota_rule=*:storage=1M\n"
    )
    (tmp_path / "pop3d.toml").write_text(
        '[auth]\npasswd_file = "users"\n[storage]\nmaildir = "mail/%u/Maildir"\n'
    )
    return tmp_path


def cli(site: Path, *args: str, stdin: bytes = b"", monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    command, rest = args[0], args[1:]
    if command in ("user", "mailbox"):
        action, tail = rest[0], rest[1:]
        return main([command, action, "--config", str(site / "pop3d.toml"), *tail])
    raise AssertionError(command)


def verify(site: Path, name: str, password: bytes) -> bool:
    auth = PasswdFileAuthenticator(site / "users", check_interval=0)
    try:
        return asyncio.run(auth.verify_password(name, password)) is not None
    finally:
        auth.close()


def test_add_with_password_stdin_hashes_with_argon2id(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """user add --password-stdin stores an ARGON2ID hash that verifies; others are kept."""
    assert cli(site, "user", "add", "alice", "--password-stdin",
               stdin=b"s3cret pass\n", monkeypatch=monkeypatch) == 0  # fmt: skip
    text = (site / "users").read_text()
    assert text.startswith(HEADER + "bob:{PLAIN}hunter2::::::userdb_quota_rule=*:storage=1M\n")
    assert "alice:{ARGON2ID}$argon2id$" in text
    assert "s3cret" not in text
    assert verify(site, "alice", b"s3cret pass")
    assert not verify(site, "alice", b"s3cret pass\n")


def test_add_from_prompt_asks_twice(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --password-stdin the password comes from getpass, twice, and must match."""
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert cli(site, "user", "add", "alice", monkeypatch=monkeypatch) == 1
    assert "alice" not in (site / "users").read_text()
    answers = iter(["same", "same"])
    assert cli(site, "user", "add", "alice", monkeypatch=monkeypatch) == 0
    assert verify(site, "alice", b"same")


def test_password_is_never_an_argument(site: Path) -> None:
    """A password given on the command line is a usage error (ps would show it)."""
    with pytest.raises(SystemExit) as exc:
        main(["user", "add", "--config", str(site / "pop3d.toml"), "alice", "secret"])
    assert exc.value.code == 2
    assert "alice" not in (site / "users").read_text()


def test_default_scheme_from_config(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[auth] default_scheme chooses the hash (SHA512-CRYPT here)."""
    (site / "pop3d.toml").write_text(
        '[auth]\npasswd_file = "users"\ndefault_scheme = "SHA512-CRYPT"\n'
        '[storage]\nmaildir = "mail/%u/Maildir"\n'
    )
    assert cli(site, "user", "add", "carol", "--password-stdin",
               stdin=b"pw\n", monkeypatch=monkeypatch) == 0  # fmt: skip
    assert "carol:{SHA512-CRYPT}$6$" in (site / "users").read_text()
    assert verify(site, "carol", b"pw")


def test_add_existing_or_empty_is_refused(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding an existing user, an empty password or a bad name changes nothing."""
    before = (site / "users").read_bytes()
    assert cli(site, "user", "add", "bob", "--password-stdin",
               stdin=b"x\n", monkeypatch=monkeypatch) == 1  # fmt: skip
    assert cli(site, "user", "add", "eve", "--password-stdin",
               stdin=b"\n", monkeypatch=monkeypatch) == 1  # fmt: skip
    for bad in ("../x", "a:b", ".hidden", "a b"):
        assert cli(site, "user", "add", bad, "--password-stdin",
                   stdin=b"x\n", monkeypatch=monkeypatch) == 1  # fmt: skip
    assert (site / "users").read_bytes() == before


def test_passwd_changes_only_the_password(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """user passwd replaces the hash and keeps the rest of the line (quota field)."""
    assert cli(site, "user", "passwd", "bob", "--password-stdin",
               stdin=b"new one\n", monkeypatch=monkeypatch) == 0  # fmt: skip
    line = (site / "users").read_text().splitlines()[1]
    assert line.startswith("bob:{ARGON2ID}")
    assert line.endswith("::::::userdb_quota_rule=*:storage=1M")
    assert verify(site, "bob", b"new one")
    assert not verify(site, "bob", b"hunter2")
    assert cli(site, "user", "passwd", "nobody", "--password-stdin",
               stdin=b"x\n", monkeypatch=monkeypatch) == 67  # fmt: skip


def test_del_removes_the_line_and_keeps_the_mail(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """user del removes the user's line only; the mailbox stays; unknown users are 67."""
    maildir = site / "mail/bob/Maildir/new"
    maildir.mkdir(parents=True)
    (maildir / "1.M1.x").write_bytes(b"keep me\n")
    assert cli(site, "user", "del", "bob", monkeypatch=monkeypatch) == 0
    assert (site / "users").read_text() == HEADER
    assert (maildir / "1.M1.x").read_bytes() == b"keep me\n"
    assert cli(site, "user", "del", "bob", monkeypatch=monkeypatch) == 67


def test_rewrite_is_atomic_and_keeps_the_mode(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The passwd-file is replaced by rename (new inode), keeping its permissions."""
    users = site / "users"
    users.chmod(0o640)
    inode = users.stat().st_ino
    assert cli(site, "user", "add", "dan", "--password-stdin",
               stdin=b"pw\n", monkeypatch=monkeypatch) == 0  # fmt: skip
    assert users.stat().st_ino != inode
    assert users.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in site.iterdir() if p.name.startswith(".users")] == []


def test_list_shows_schemes_never_hashes(
    site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """user list prints name, scheme and quota field, and no password or hash."""
    cli(site, "user", "add", "alice", "--password-stdin", stdin=b"pw\n", monkeypatch=monkeypatch)
    capsys.readouterr()
    assert cli(site, "user", "list", monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["bob\tPLAIN\tquota_rule=*:storage=1M", "alice\tARGON2ID"]
    assert "hunter2" not in out
    assert "$argon2id$" not in out


def test_subprocess_add_then_login_hash_verifies(site: Path) -> None:
    """`python -m pop3d user add` from a pipe works end to end (the MTA-side tool)."""
    done = subprocess.run(
        [sys.executable, "-m", "pop3d", "user", "add", "--config", str(site / "pop3d.toml"),
         "erin", "--password-stdin"],
        input=b"piped\n", capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"piped" not in done.stdout + done.stderr
    assert verify(site, "erin", b"piped")


# ---------------------------------------------------------------------------- mailbox stat


def deliver(site: Path, name: str, data: bytes) -> None:
    path = site / "m.eml"
    path.write_bytes(data)
    assert main(["deliver", "--config", str(site / "pop3d.toml"), name, str(path)]) == 0


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_stat_reports_count_size_oldest_and_quota(
    site: Path, kind: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """mailbox stat gives count, wire size, oldest date and quota use against the limit."""
    template = "mail/%u/Maildir" if kind == "maildir" else "mbox/%u"
    (site / "pop3d.toml").write_text(
        f'[auth]\npasswd_file = "users"\n[storage]\n{kind} = "{template}"\n'
    )
    deliver(site, "bob", b"Subject: a\n\nx\n")  # 17 wire octets
    deliver(site, "bob", b"Subject: b\n\n")  # 14
    capsys.readouterr()
    assert cli(site, "mailbox", "stat", "bob", "--json", monkeypatch=monkeypatch) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["messages"] == 2
    assert report["size"] == report["quota_used"] == 31
    assert report["quota_limit"] == 1 << 20
    assert report["oldest"] is not None
    assert cli(site, "mailbox", "stat", "bob", monkeypatch=monkeypatch) == 0
    text = capsys.readouterr().out
    assert "messages: 2" in text
    assert "size:     31 octets" in text
    assert "of 1.0 MiB" in text


def test_stat_of_user_without_mail_and_unknown_user(
    site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user who never got mail has an empty report; an unknown user is 67."""
    assert cli(site, "mailbox", "stat", "bob", monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert "no maildrop yet" in out
    assert "messages: 0" in out
    assert cli(site, "mailbox", "stat", "nobody", monkeypatch=monkeypatch) == 67
