"""Real mail fetchers (mpop, fetchmail, getmail6) download whole mailboxes from pop3d.

Each client saves messages with its own trace headers (Received, Return-Path, ...) and
LF line ends; we strip the leading trace headers and compare the rest, byte for byte,
with what was stored.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pop3d.testing import Pop3TestServer

from .messages import TRICKY, wire

pytestmark = [pytest.mark.client, pytest.mark.timeout(60)]

#: Headers that fetchers prepend to what they save.
TRACE = re.compile(
    rb"(?:Received|Return-Path|Delivered-To|X-[A-Za-z-]+):[^\n]*\n(?:[ \t][^\n]*\n)*"
)


def needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed")


def original(saved: bytes) -> bytes:
    """``saved`` without the trace headers a fetcher put in front of it."""
    while match := TRACE.match(saved):
        saved = saved[match.end() :]
    return saved


def as_saved(stored: bytes) -> bytes:
    """What a Unix fetcher saves: the wire form with LF line ends."""
    return wire(stored).replace(b"\r\n", b"\n")


def expected_saves() -> list[bytes]:
    return sorted(as_saved(m) for m in TRICKY.values())


def make_maildir(path: Path, owner: str | None = None) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    if owner is not None:
        for p in (path, *(path / s for s in ("tmp", "new", "cur"))):
            shutil.chown(p, owner, owner)
    return path


def saved_messages(maildir: Path) -> list[bytes]:
    return sorted(
        original(f.read_bytes()) for sub in ("new", "cur") for f in (maildir / sub).iterdir()
    )


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, capture_output=True, timeout=45, env=env, check=False)


@pytest.fixture
def loaded(pop3_server: Pop3TestServer) -> Pop3TestServer:
    for data in TRICKY.values():
        pop3_server.add_message("alice", data)
    return pop3_server


# ------------------------------------------------------------------------------- mpop


def mpop(srv: Pop3TestServer, folder: Path, maildir: Path, *, keep: bool) -> None:
    rc = folder / "mpoprc"
    rc.write_text(
        f"account test\nhost {srv.host}\nport {srv.port}\nuser alice\npassword secret\n"
        f"tls off\nauth user\ndelivery maildir {maildir}\nkeep {'on' if keep else 'off'}\n"
        f"uidls_file {folder / 'uidls'}\n"
    )
    rc.chmod(0o600)
    done = run(["mpop", "-C", str(rc), "-a", "-q"])
    assert done.returncode == 0, done.stderr


@needs("mpop")
def test_mpop_fetches_mailbox_and_deletes(loaded: Pop3TestServer, tmp_path: Path) -> None:
    """mpop (keep off) saves every message intact and the server's Maildir is then empty."""
    maildir = make_maildir(tmp_path / "mpop" / "Maildir")
    mpop(loaded, tmp_path / "mpop", maildir, keep=False)
    assert saved_messages(maildir) == expected_saves()
    assert loaded.messages("alice") == []


@needs("mpop")
def test_mpop_keep_on_uses_uidl(loaded: Pop3TestServer, tmp_path: Path) -> None:
    """mpop (keep on) leaves mail on the server and, by stable UIDLs, fetches nothing twice."""
    maildir = make_maildir(tmp_path / "mpop" / "Maildir")
    mpop(loaded, tmp_path / "mpop", maildir, keep=True)
    assert saved_messages(maildir) == expected_saves()
    assert loaded.messages("alice") == list(TRICKY.values())
    loaded.add_message("alice", b"Subject: later\n\nnew one\n")
    mpop(loaded, tmp_path / "mpop", maildir, keep=True)
    assert saved_messages(maildir) == sorted([*expected_saves(), b"Subject: later\n\nnew one\n"])


# ------------------------------------------------------------------------------- fetchmail


def fetchmail(srv: Pop3TestServer, folder: Path, out: Path, *, keep: bool) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    mda = folder / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "{out}/msg.$$"\n')
    mda.chmod(0o700)
    rc = folder / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll {srv.host} protocol pop3 port {srv.port} uidl\n"
        '  user "alice" password "secret" is "alice" here\n'
        f"  {'keep' if keep else 'nokeep'} fetchall sslproto \"\"\n"
        f'  mda "{mda}"\n'
    )
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(folder)}
    done = run(
        ["fetchmail", "-f", str(rc), "--nodetach", "--idfile", str(folder / "ids"),
         "--pidfile", str(folder / "pid")],
        env,
    )
    assert done.returncode in (0, 1), done.stderr  # 1: no mail
    return done.returncode


@needs("fetchmail")
def test_fetchmail_fetches_mailbox_and_deletes(loaded: Pop3TestServer, tmp_path: Path) -> None:
    """fetchmail (nokeep) delivers every message intact and UPDATE empties the Maildir."""
    out = tmp_path / "fetched"
    assert fetchmail(loaded, tmp_path / "fm", out, keep=False) == 0
    assert sorted(original(f.read_bytes()) for f in out.iterdir()) == expected_saves()
    assert loaded.messages("alice") == []
    assert fetchmail(loaded, tmp_path / "fm", out, keep=False) == 1  # nothing left


@needs("fetchmail")
def test_fetchmail_keep(loaded: Pop3TestServer, tmp_path: Path) -> None:
    """fetchmail (keep) leaves every message on the server."""
    out = tmp_path / "fetched"
    assert fetchmail(loaded, tmp_path / "fm", out, keep=True) == 0
    assert len(list(out.iterdir())) == len(TRICKY)
    assert loaded.messages("alice") == list(TRICKY.values())


# ------------------------------------------------------------------------------- getmail6


@needs("getmail")
@pytest.mark.skipif(os.geteuid() != 0, reason="the test hands the Maildir to user mail")
def test_getmail_fetches_mailbox_and_deletes(
    loaded: Pop3TestServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """getmail6 (delete = true) saves every message intact; the server's Maildir is emptied."""
    # pytest's tmp folders are root-only (0700): user mail must reach its Maildir.
    public = Path(tempfile.mkdtemp(prefix="pop3d-getmail-"))
    request.addfinalizer(lambda: shutil.rmtree(public))
    public.chmod(0o755)
    maildir = make_maildir(public / "Maildir", owner="mail")
    state = tmp_path / "gm-state"
    state.mkdir()
    rc = tmp_path / "getmailrc"
    rc.write_text(
        "[retriever]\ntype = SimplePOP3Retriever\n"
        f"server = {loaded.host}\nport = {loaded.port}\nusername = alice\npassword = secret\n"
        f"[destination]\ntype = Maildir\npath = {maildir}/\nuser = mail\n"
        "[options]\nread_all = true\ndelete = true\nverbose = 0\n"
    )
    done = run(["getmail", f"--getmaildir={state}", f"--rcfile={rc}"])
    assert done.returncode == 0, done.stderr
    assert saved_messages(maildir) == expected_saves()
    assert loaded.messages("alice") == []
