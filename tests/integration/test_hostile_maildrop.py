"""A hostile maildrop over real POP3: a real ``pop3d serve`` (as root in CI) and a raw client.

The user owns their Maildir (or mbox) and fills it with traps: ``cur/`` or ``new/`` as a
symbolic link to a folder with a root-only secret, messages that are links to it, FIFOs
(at message names and at every name the size index's temp file once had), sockets and
devices.  For each: the secret never leaves over POP3, nothing outside the mail root
changes (checksums and mtimes, before and after DELE + QUIT), and another user of the
same worker is served meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3d.storage.maildir import INDEX_NAME
from pop3d.testing import Pop3ServeProcess
from tests.tree_snapshot import snapshot

from .helpers import WAIT, RawClient, ServeFactory

pytestmark = pytest.mark.timeout(90)

SECRET = b"root:TOPSECRET-HASH:19000:0:99999:7:::"
OLD = 1_600_000_000


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A folder outside any mail root: a root-only secret and files named like messages."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "shadow").write_bytes(SECRET + b"\n")
    (out / "shadow").chmod(0o600)
    (out / "1600000000.M1P1.etc:2,").write_bytes(b"Subject: x\n\n" + SECRET + b"\n")
    (out / "1600000001.M2P1.etc").write_bytes(b"Subject: y\n\n" + SECRET + b"\n")
    before = snapshot(out)
    yield out
    assert snapshot(out) == before, "something outside the mail root changed"


def session(port: int, user: bytes, password: bytes) -> bytes:
    """A whole fetching session: login, UIDL, RETR all, DELE all, QUIT; every octet received."""
    seen = b""
    with RawClient("127.0.0.1", port) as c:
        assert c.cmd(b"USER " + user).startswith(b"+OK")
        answer = c.cmd(b"PASS " + password)
        seen += answer
        if not answer.startswith(b"+OK"):
            seen += c.cmd(b"QUIT")
            return seen
        count = int(answer.split(b" has ")[1].split()[0]) if b" has " in answer else 0
        status = c.cmd(b"UIDL")
        seen += status + b"".join(c.multiline())
        for n in range(1, count + 1):
            status = c.cmd(b"RETR %d" % n)
            seen += status
            if status.startswith(b"+OK"):
                seen += b"\n".join(c.multiline())
            seen += c.cmd(b"DELE %d" % n)
        seen += c.cmd(b"QUIT")
    return seen


def plant_specials(folder: Path, outside: Path, tag: str) -> None:
    """Symlinks to the secret, a FIFO, a socket and (as root) a device, named like mail."""
    (folder / f"1600000100.M1P1.{tag}a:2,").symlink_to(outside / "shadow")
    (folder / f"1600000101.M1P1.{tag}b").symlink_to(outside / "1600000001.M2P1.etc")
    os.mkfifo(folder / f"1600000102.M1P1.{tag}fifo")
    short = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))  # sun_path is 108 octets
    try:
        with contextlib.closing(socket.socket(socket.AF_UNIX)) as sock:
            sock.bind(os.fspath(short / "s"))
            (short / "s").rename(folder / f"1600000103.M1P1.{tag}sock")
    finally:
        shutil.rmtree(short)
    if os.geteuid() == 0:
        os.mknod(folder / f"1600000104.M1P1.{tag}dev", 0o600 | stat.S_IFCHR, os.makedev(1, 5))


def old_message(proc: Pop3ServeProcess, user: str, data: bytes) -> None:
    """Deliver ``data`` and age it, so that the size index will be (re)written at login."""
    path = proc.add_message(user, data)
    os.utime(path, (OLD, OLD))


@pytest.mark.parametrize("folder", ["cur", "new", "Maildir"])
def test_a_symlinked_folder_refuses_the_login_and_leaks_nothing(
    serve: ServeFactory, outside: Path, folder: str
) -> None:
    """cur/, new/ or the Maildir itself -> a folder holding a secret: [SYS/PERM], nothing
    listed, served, moved or unlinked; bob is served as usual."""
    proc = serve(workers=1)
    md = proc.maildir("alice")
    if folder == "Maildir":
        shutil.rmtree(md)
        fake = outside.parent / "fake"
        for sub in ("cur", "new", "tmp"):
            (fake / sub).mkdir(parents=True)
        (fake / "cur" / "1600000000.M1P1.x:2,").symlink_to(outside / "shadow")
        md.symlink_to(fake)
    else:
        (md / folder).rmdir()
        (md / folder).symlink_to(outside)
    seen = session(proc.port, b"alice", b"secret")
    assert seen.startswith(b"-ERR [SYS/PERM]"), seen
    assert SECRET not in seen
    proc.add_message("bob", b"Subject: for bob\n\nhello bob\n")
    assert b"hello bob" in session(proc.port, b"bob", b"hunter2")
    assert SECRET not in proc.log_text().encode()


def test_links_fifos_sockets_and_devices_are_never_served_or_removed(
    serve: ServeFactory, outside: Path
) -> None:
    """Only regular files are mail: the traps are skipped (and logged), DELE + QUIT of
    everything listed removes the real message only, and the secret never leaves."""
    proc = serve(workers=1)
    md = proc.maildir("alice")
    old_message(proc, "alice", b"Subject: real\n\nreal mail\n")
    plant_specials(md / "cur", outside, "c")
    plant_specials(md / "new", outside, "n")
    os.mkfifo(md / INDEX_NAME)
    planted = sorted(p.name for sub in ("cur", "new") for p in (md / sub).iterdir()
                     if not p.is_file() or p.is_symlink())  # fmt: skip
    seen = session(proc.port, b"alice", b"secret")
    assert b"has 1 message" in seen, seen
    assert b"real mail" in seen
    assert SECRET not in seen
    after = sorted(p.name for sub in ("cur", "new") for p in (md / sub).iterdir())
    assert after == planted  # the real message is gone, every trap untouched
    assert "not regular files" in proc.log_text()


def test_other_clients_are_served_while_a_hostile_maildrop_logs_in(
    serve: ServeFactory, outside: Path
) -> None:
    """FIFOs at every name the index's temp file once had (and at message names) block
    nothing: bob's whole session completes while alice's hostile one runs, in one worker."""
    proc = serve(workers=1)
    md = proc.maildir("alice")
    for i in range(20):
        old_message(proc, "alice", b"Subject: %d\n\nbody %d\n" % (i, i))
    for n in range(1, 50):
        os.mkfifo(md / f".{INDEX_NAME}.{proc.pid}.{n}.tmp")
    for i in range(100):
        os.mkfifo(md / "new" / f"1600000200.M{i}P1.fifo")
    (md / "cur" / "1600000300.M1P1.link:2,").symlink_to(outside / "shadow")
    proc.add_message("bob", b"Subject: for bob\n\nhello bob\n")
    results: dict[str, bytes] = {}
    started = threading.Event()

    def hostile() -> None:
        started.set()
        results["alice"] = session(proc.port, b"alice", b"secret")

    thread = threading.Thread(target=hostile)
    thread.start()
    started.wait(WAIT)
    results["bob"] = session(proc.port, b"bob", b"hunter2")
    thread.join(WAIT)
    assert not thread.is_alive()
    assert b"hello bob" in results["bob"]
    assert b"has 20 messages" in results["alice"], results["alice"][:200]
    assert SECRET not in results["alice"]
    # The index was written under a fresh random name, not into any planted FIFO.
    assert stat.S_ISREG((md / INDEX_NAME).lstat().st_mode)
    fifos = [p for p in md.iterdir() if p.name.endswith(".tmp")]
    assert len(fifos) == 49
    assert all(stat.S_ISFIFO(p.lstat().st_mode) for p in fifos)


def test_a_message_with_a_lying_w_size_is_served_after_one_refusal(serve: ServeFactory) -> None:
    """S= right, W= wrong: the first RETR is refused, the index is corrected from the file,
    and the next session lists and serves the real size under the same UIDL."""
    proc = serve(workers=1)
    md = proc.maildir("alice")
    body = b"Subject: w\n\nline\n"
    (md / "cur" / f"1600000000.M1P1.h,S={len(body)},W={len(body) + 10}:2,").write_bytes(body)
    answers = []
    for attempt in range(2):
        if attempt:  # the correction runs in a thread after the refusal: wait for it
            deadline = time.monotonic() + WAIT
            while "size index corrected" not in proc.log_text():
                assert time.monotonic() < deadline
                time.sleep(0.02)
        with RawClient(proc.host, proc.port) as c:
            assert c.login(b"alice", b"secret").startswith(b"+OK")
            uidl = c.cmd(b"UIDL 1")
            retr = c.cmd(b"RETR 1")
            data = b"\r\n".join(c.multiline()) if retr.startswith(b"+OK") else b""
            answers.append((uidl, retr, data))
            assert c.cmd(b"QUIT").startswith(b"+OK")
    (uidl1, retr1, _), (uidl2, retr2, data2) = answers
    assert retr1.startswith(b"-ERR [SYS/TEMP]")
    assert retr2 == b"+OK 20 octets\r\n"
    assert data2 == b"Subject: w\r\n\r\nline"
    assert uidl1 == uidl2
    assert "size index corrected" in proc.log_text()


@pytest.mark.parametrize("template", ["shared/Maildir", "mail/%d/Maildir", "mail/%u/../x"])
def test_a_template_that_would_share_mail_stops_the_server(tmp_path: Path, template: str) -> None:
    """A storage template without a per-user variable (or with '..') is refused at start:
    exit status 78, and the message names the file and the key."""
    proc = Pop3ServeProcess(tmp_path / "srv", users={"alice": "secret", "bob": "hunter2"},
                            sections={"storage": {"maildir": template}})  # fmt: skip
    with pytest.raises(RuntimeError, match="status 78") as info:
        proc.start()
    assert "pop3d.toml: [storage] maildir" in str(info.value)


def test_a_symlinked_mbox_refuses_the_login_and_leaks_nothing(
    tmp_path: Path, outside: Path
) -> None:
    """An mbox that is a link to the secret: [SYS/PERM] at login, the secret never sent,
    and a delivery to it does not write through the link."""
    proc = Pop3ServeProcess(tmp_path / "srv", users={"alice": "secret", "bob": "hunter2"},
                            workers=1)  # fmt: skip
    proc._sections["storage"] = {"mbox": "mbox/%u"}  # no maildir key at all
    (proc.root / "mbox").mkdir()
    (proc.root / "mbox" / "alice").symlink_to(outside / "shadow")
    with proc:
        seen = session(proc.port, b"alice", b"secret")
        assert seen.startswith(b"-ERR [SYS/PERM]"), seen
        assert SECRET not in seen
        # The refusal's warning is in the log before the log is searched for the secret.
        deadline = time.monotonic() + WAIT
        while "cannot be opened" not in proc.log_text():
            assert time.monotonic() < deadline, proc.log_text()
            time.sleep(0.05)
    assert SECRET not in proc.log_text().encode()
