"""Hostile maildrops: a user who owns their mail folder must not reach outside it, or stall us.

Each test builds what a local user can build in a folder they own (symbolic links to a
secret outside the mail root, FIFOs, sockets, devices), then checks that the secret is
never read, nothing outside the mail root changes, and nothing blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pop3d.errors import PermanentBackendError, TemporaryBackendError
from pop3d.protocol.values import Principal
from pop3d.storage import beneath, blocking, maildir
from pop3d.storage.beneath import MailRoot, open_beneath
from pop3d.storage.maildir import INDEX_NAME, MaildirStore
from pop3d.storage.mbox import MboxStore
from tests.tree_snapshot import snapshot

from .contract import chunks_of, read_all, run, user

T = TypeVar("T")
SECRET = b"root:TOPSECRET-HASH:19000::::::\n"
#: Bound on any single store call here: a FIFO opened for reading would block forever.
BOUND = 10.0


def bounded(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` with a time bound: a blocked open fails the test instead of hanging."""

    async def go() -> T:
        return await asyncio.wait_for(coro, BOUND)

    return run(go())


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A folder outside the mail root with a root-only secret and a message-looking file."""
    out = tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "shadow").write_bytes(SECRET)
    (out / "shadow").chmod(0o600)
    (out / "1700000000.M1P1.host:2,").write_bytes(b"Subject: " + SECRET)
    (out / "sub" / "1700000001.M2P1.host").write_bytes(SECRET)
    before = snapshot(out)
    yield out
    assert snapshot(out) == before, "something outside the mail root changed"


def maildir_of(base: Path, name: str = "alice") -> Path:
    root = base / "mail" / name / "Maildir"
    for folder in ("tmp", "new", "cur"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    return root


def store(base: Path) -> MaildirStore:
    return MaildirStore("mail/%u/Maildir", base, hostname="test")


def retrieve_all(s: MaildirStore | MboxStore) -> list[bytes]:
    """Open, read every message, delete them all, commit: what a fetching client does."""

    async def go() -> list[bytes]:
        md = await s.open(user())
        try:
            bodies = [await read_all(md, info.uid) for info in md.listing()]
            await md.commit([info.uid for info in md.listing()])
        finally:
            await md.close()
        return bodies

    return bounded(go())


# ------------------------------------------------------------------ symlinked folders


@pytest.mark.parametrize("folder", ["cur", "new"])
def test_a_symlinked_cur_or_new_refuses_the_login(
    tmp_path: Path, outside: Path, folder: str
) -> None:
    """cur/ or new/ -> /etc: [SYS/PERM]; nothing listed, served, moved or unlinked there."""
    root = maildir_of(tmp_path)
    (root / folder).rmdir()
    (root / folder).symlink_to(outside)
    s = store(tmp_path)
    with pytest.raises(PermanentBackendError):
        bounded(s.open(user()))
    with pytest.raises(PermanentBackendError):
        s.open_now(user())
    with pytest.raises(TemporaryBackendError, match="symbolic link"):
        bounded(s.stat(user()))


@pytest.mark.parametrize("level", ["user", "maildir"])
def test_a_symlinked_maildrop_folder_refuses_the_login(
    tmp_path: Path, outside: Path, level: str
) -> None:
    """mail/alice -> elsewhere, or mail/alice/Maildir -> elsewhere: refused, never followed."""
    fake = tmp_path / "fakeuser" / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (fake / sub).mkdir(parents=True)
    (fake / "cur" / "1.M1P1.h:2,").write_bytes(SECRET)
    if level == "user":
        (tmp_path / "mail").mkdir()
        (tmp_path / "mail" / "alice").symlink_to(tmp_path / "fakeuser")
    else:
        (tmp_path / "mail" / "alice").mkdir(parents=True)
        (tmp_path / "mail" / "alice" / "Maildir").symlink_to(fake)
    assert outside.is_dir()
    s = store(tmp_path)
    with pytest.raises(PermanentBackendError):
        bounded(s.open(user()))
    # Delivery into such a Maildir is refused for now (the MTA retries), never followed.
    with pytest.raises(TemporaryBackendError):
        bounded(s.deliver(user(), chunks_of(b"Subject: x\n\nhi\n")))
    assert list((fake / "new").iterdir()) == []
    assert list((fake / "tmp").iterdir()) == []


def test_the_mail_root_itself_may_be_a_link(tmp_path: Path) -> None:
    """The template's static folder is the operator's: /var/mail may be a symbolic link."""
    real = tmp_path / "real"
    (real / "alice" / "Maildir").mkdir(parents=True)
    (tmp_path / "m").symlink_to(real)
    s = MaildirStore("m/%u/Maildir", tmp_path, hostname="test")
    bounded(s.deliver(user(), chunks_of(b"Subject: x\n\nhi\n")))
    assert retrieve_all(s) == [b"Subject: x\r\n\r\nhi\r\n"]


def test_a_folder_swapped_for_a_link_after_open_is_not_followed(
    tmp_path: Path, outside: Path
) -> None:
    """cur/ replaced by a link during the session: RETR fails, DELE+QUIT unlinks nothing."""
    root = maildir_of(tmp_path)
    name = "1700000000.M1P1.host:2,"
    (root / "cur" / name).write_bytes(b"Subject: mine\n\nhello\n")
    s = store(tmp_path)

    async def go() -> None:
        md = await s.open(user())
        try:
            [info] = md.listing()
            (root / "cur").rename(root / "cur.old")
            (root / "cur").symlink_to(outside)  # outside holds a file of the same name
            with pytest.raises(TemporaryBackendError):
                await read_all(md, info.uid)
            with pytest.raises(TemporaryBackendError):
                md.read_inline(info.uid)
            with pytest.raises(TemporaryBackendError):
                await md.commit([info.uid])
        finally:
            await md.close()

    bounded(go())
    assert (root / "cur.old" / name).exists()


# ------------------------------------------------------------------ what is not a message


def _plant_specials(folder: Path, outside: Path, tag: str) -> list[str]:
    """A symlink to the secret, a FIFO, a socket and (as root) a device; their names."""
    names = []
    link = folder / f"1700000100.M1P1.{tag}link:2,"
    link.symlink_to(outside / "shadow")
    names.append(link.name)
    fifo = folder / f"1700000101.M1P1.{tag}fifo"
    os.mkfifo(fifo)
    names.append(fifo.name)
    # sun_path is short (108 octets): bind in a short folder, then move the socket in.
    short = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))
    try:
        with contextlib.closing(socket.socket(socket.AF_UNIX)) as sock:
            sock.bind(os.fspath(short / "s"))
            (short / "s").rename(folder / f"1700000102.M1P1.{tag}sock")
            names.append(f"1700000102.M1P1.{tag}sock")
    finally:
        shutil.rmtree(short)
    if os.geteuid() == 0:
        dev = folder / f"1700000103.M1P1.{tag}dev"
        os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        names.append(dev.name)
    return names


def test_links_fifos_sockets_and_devices_are_skipped_and_logged(
    tmp_path: Path, outside: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only regular files are messages: the others are skipped (logged), never opened."""
    root = maildir_of(tmp_path)
    planted = _plant_specials(root / "cur", outside, "c") + _plant_specials(
        root / "new", outside, "n"
    )
    (root / "new" / "1700000000.M9P1.host").write_bytes(b"Subject: real\n\nmail\n")
    # The index and a would-be index temp name as FIFOs: neither may block us.
    os.mkfifo(root / INDEX_NAME)
    s = store(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pop3d.storage.maildir"):
        bodies = retrieve_all(s)
    assert bodies == [b"Subject: real\r\n\r\nmail\r\n"]
    assert "not regular files" in caplog.text
    left = {p.name for folder in ("cur", "new") for p in (root / folder).iterdir()}
    assert set(planted) <= left  # untouched: never moved, never unlinked
    assert not (root / "cur" / "1700000101.M1P1.nfifo:2,").exists()


def test_a_message_replaced_by_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A listed file swapped for a FIFO before RETR: an error at once, never a blocked open."""
    root = maildir_of(tmp_path)
    path = root / "cur" / "1700000000.M1P1.host:2,"
    path.write_bytes(b"Subject: x\n\nhi\n")
    s = store(tmp_path)

    async def go() -> None:
        md = await s.open(user())
        try:
            [info] = md.listing()
            path.unlink()
            os.mkfifo(path)
            with pytest.raises(TemporaryBackendError):
                md.read_inline(info.uid)
            with pytest.raises(TemporaryBackendError):
                await read_all(md, info.uid)
        finally:
            await md.close()

    bounded(go())


# ------------------------------------------------------------------ files pop3d creates


def test_index_is_written_under_a_random_name_with_the_folder_mode(tmp_path: Path) -> None:
    """The size index's temp name is unpredictable; the index gets the Maildir's mode."""
    root = maildir_of(tmp_path)
    root.chmod(0o750)
    msg = root / "cur" / "1600000000.M1P1.host:2,"
    msg.write_bytes(b"x\n")
    os.utime(msg, (1_600_000_000, 1_600_000_000))
    # Every name the old code would have used, as FIFOs: none is ever opened now.
    for n in range(1, 5):
        os.mkfifo(root / f".{INDEX_NAME}.{os.getpid()}.{n}.tmp")
    s = store(tmp_path)
    bounded(s.stat(user()))
    assert len(retrieve_all(s)) == 1
    index = root / INDEX_NAME
    assert stat.S_ISREG(index.lstat().st_mode)
    assert stat.S_IMODE(index.stat().st_mode) == 0o640
    leftovers = [p for p in root.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 4
    assert all(stat.S_ISFIFO(p.lstat().st_mode) for p in leftovers)  # only the planted ones


def test_an_index_name_that_is_a_link_is_replaced_not_followed(
    tmp_path: Path, outside: Path
) -> None:
    """pop3d-sizes -> /etc/shadow: the index read ignores it, the rewrite replaces the link."""
    root = maildir_of(tmp_path)
    msg = root / "cur" / "1600000000.M1P1.host:2,"
    msg.write_bytes(b"x\n")
    os.utime(msg, (1_600_000_000, 1_600_000_000))
    (root / INDEX_NAME).symlink_to(outside / "shadow")
    assert len(retrieve_all(store(tmp_path))) == 1
    assert not (root / INDEX_NAME).is_symlink()


def test_delivery_refuses_a_symlinked_tmp_and_uses_the_folder_mode(
    tmp_path: Path, outside: Path
) -> None:
    """tmp/ -> elsewhere: delivery fails temporarily, nothing written there; else the mode
    of tmp/ (without x bits) and a random name."""
    root = maildir_of(tmp_path)
    (root / "tmp").rmdir()
    (root / "tmp").symlink_to(outside / "sub")
    s = store(tmp_path)
    with pytest.raises(TemporaryBackendError):
        bounded(s.deliver(user(), chunks_of(b"Subject: x\n\nhi\n")))
    (root / "tmp").unlink()
    (root / "tmp").mkdir(mode=0o750)
    (root / "tmp").chmod(0o750)
    bounded(s.deliver(user(), chunks_of(b"Subject: x\n\nhi\n")))
    [delivered] = (root / "new").iterdir()
    assert stat.S_IMODE(delivered.stat().st_mode) == 0o640


# ------------------------------------------------------------------ no blocking on the loop


def test_inline_reads_only_what_the_page_cache_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small message not in the page cache: read_inline says None, read() gets it in a
    thread; the event loop never does a blocking pread."""
    root = maildir_of(tmp_path)
    (root / "cur" / "1700000000.M1P1.host:2,").write_bytes(b"Subject: x\n\nhi\n")
    s = store(tmp_path)

    def cold(*_: object) -> int:
        raise BlockingIOError(errno.EAGAIN, "would block")

    real_pread = os.pread
    loop_thread: list[bool] = []

    def pread(fd: int, n: int, offset: int) -> bytes:
        try:
            asyncio.get_running_loop()
            loop_thread.append(True)
        except RuntimeError:
            loop_thread.append(False)
        return real_pread(fd, n, offset)

    async def go() -> bytes:
        md = await s.open(user())
        try:
            [info] = md.listing()
            monkeypatch.setattr(os, "preadv", cold)
            monkeypatch.setattr(os, "pread", pread)
            assert md.read_inline(info.uid) is None
            return await read_all(md, info.uid)
        finally:
            await md.close()

    assert bounded(go()) == b"Subject: x\r\n\r\nhi\r\n"
    assert loop_thread
    assert not any(loop_thread)  # every blocking read ran in a worker thread


def test_a_cold_open_reads_nothing_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Index and unindexed messages not in the page cache: the listing is made in a
    thread, with the same sizes; the loop's thread never does a blocking read."""
    root = maildir_of(tmp_path)
    for i in range(5):
        (root / "new" / f"{1_600_000_000 + i}.M{i}P1.host").write_bytes(b"S: %d\n\nx\n" % i)
    warm = [(i.uid, i.size) for i in bounded(listing_and_close(store(tmp_path)))]
    (root / "new" / "1600000009.M9P1.host").write_bytes(b"S: new\n\nfresh\n")

    def cold(*_: object) -> int:
        raise BlockingIOError(errno.EAGAIN, "would block")

    on_loop: list[str] = []
    for name in ("pread", "read"):
        real = getattr(os, name)

        def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop()
                on_loop.append(_name)
            return _real(*args)

        monkeypatch.setattr(os, name, spy)
    monkeypatch.setattr(os, "preadv", cold)
    cold_listing = [(i.uid, i.size) for i in bounded(listing_and_close(store(tmp_path)))]
    assert cold_listing[:5] == warm
    assert len(cold_listing) == 6
    assert on_loop == []


async def listing_and_close(s: MaildirStore) -> list[Any]:
    md = await s.open(user())
    try:
        return list(md.listing())
    finally:
        await md.close()


def test_pread_nowait_is_none_for_a_cold_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared helper: the octets when cached, None when the read would wait."""
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert blocking.pread_nowait(fd, 4, 2) in {b"2345", None}

        def cold(*_: object) -> int:
            raise BlockingIOError(errno.EAGAIN, "would block")

        monkeypatch.setattr(os, "preadv", cold)
        assert blocking.pread_nowait(fd, 4, 2) is None
    finally:
        os.close(fd)


# ------------------------------------------------------------------ self-healing sizes


def test_a_lying_w_size_is_corrected_from_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """S= right, W= wrong: one refused read, then the index holds the real size and the
    next session lists and serves it; the UIDL does not change."""
    root = maildir_of(tmp_path)
    body = b"Subject: w\n\nline\n"
    name = f"1700000000.M1P1.h,S={len(body)},W={len(body) + 10}:2,"
    (root / "cur" / name).write_bytes(body)
    s = store(tmp_path)

    async def session() -> tuple[str, int, bytes | None]:
        md = await s.open(user())
        try:
            [info] = md.listing()
            try:
                data: bytes | None = await read_all(md, info.uid)
            except TemporaryBackendError:
                data = None
            return info.uid, info.size, data
        finally:
            await md.close()

    with caplog.at_level(logging.WARNING, logger="pop3d.storage.maildir"):
        uid1, size1, data1 = bounded(session())
    assert (size1, data1) == (len(body) + 10, None)
    assert "size index corrected" in caplog.text
    uid2, size2, data2 = bounded(session())
    assert (uid2, size2, data2) == (uid1, 20, b"Subject: w\r\n\r\nline\r\n")
    # A fresh process (no remembered listing) reads the corrected index too.
    uid3, size3, _ = bounded(session_of(store(tmp_path)))
    assert (uid3, size3) == (uid1, 20)


def test_a_name_the_index_cannot_hold_is_measured_not_believed(tmp_path: Path) -> None:
    """A name with a line end cannot be recorded in the size index, so its W= is not
    trusted: the message is measured and served at the first open, and at every next one
    (found by the Maildir-name fuzzer: refused at every open)."""
    root = maildir_of(tmp_path)
    body = b"h]ello"
    (root / "new" / "1700000000hello\nhost,S=6,W=8").write_bytes(body)
    for _ in range(2):
        _uid, size, data = bounded(session_of(store(tmp_path)))
        assert (size, data) == (8, b"h]ello\r\n")


async def session_of(s: MaildirStore) -> tuple[str, int, bytes]:
    md = await s.open(user())
    try:
        [info] = md.listing()
        return info.uid, info.size, await read_all(md, info.uid)
    finally:
        await md.close()


def test_a_message_rewritten_in_place_heals_too(tmp_path: Path) -> None:
    """A file rewritten under the same name with another size: refused once, then listed right."""
    root = maildir_of(tmp_path)
    path = root / "cur" / "1700000000.M1P1.h:2,"
    path.write_bytes(b"Subject: a\n\none\n")
    os.utime(path, (1_600_000_000, 1_600_000_000))
    os.utime(root / "cur", (1_600_000_000, 1_600_000_000))
    os.utime(root / "new", (1_600_000_000, 1_600_000_000))
    s = store(tmp_path)
    bounded(session_of(s))
    bounded(session_of(s))  # remembered now
    path.write_bytes(b"Subject: a\n\none, and then much longer\n")
    os.utime(root / "cur", (1_600_000_000, 1_600_000_000))  # the folder looks unchanged
    with pytest.raises(TemporaryBackendError):
        bounded(session_of(s))
    assert bounded(session_of(s))[2] == b"Subject: a\r\n\r\none, and then much longer\r\n"


def test_a_uidl_change_of_a_known_message_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The guard: a file listed twice with two UIDLs is an error in the log."""
    entry = maildir._Entry("cur", "x:2,", "x", 7, 3, 11, 5, "x")
    moved = maildir._Entry("cur", "y:2,", "y", 7, 3, 11, 5, "y")
    with caplog.at_level(logging.ERROR, logger="pop3d.storage.maildir"):
        maildir._guard_uids(
            Path("/m"), maildir._Listing([entry]), maildir._Listing([moved])
        )
    assert "UIDL" in caplog.text


# ------------------------------------------------------------------ open_beneath itself


@pytest.mark.parametrize("openat2", [True, False])
def test_open_beneath_refuses_links_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openat2: bool
) -> None:
    """openat2 and the component walk both refuse a link in any component, and '..'."""
    if not openat2:
        monkeypatch.setattr(beneath, "_openat2", False)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"ok")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_bytes(SECRET)
    (tmp_path / "a" / "l").symlink_to(tmp_path / "t")
    (tmp_path / "a" / "b" / "lf").symlink_to(tmp_path / "t" / "f")
    root = MailRoot(tmp_path / "a")
    fd = root.open("b/f", os.O_RDONLY)
    os.close(fd)
    for rel in ("l/f", "b/lf", "l"):
        with pytest.raises(OSError, match=r".") as info:
            os.close(root.open(rel, os.O_RDONLY))
        assert beneath.is_link_refusal(info.value)
    with pytest.raises(OSError, match=r"."):
        open_beneath(root.fd(), "../t/f", os.O_RDONLY)


# ------------------------------------------------------------------ mbox


def mbox_store(base: Path) -> MboxStore:
    return MboxStore("mbox/%u", base, lock_timeout=0.5)


def test_mbox_symlinked_folder_or_file_refuses_the_login(tmp_path: Path, outside: Path) -> None:
    """mbox -> /etc/shadow or mbox/ -> /etc: [SYS/PERM] at login, a retry at delivery."""
    (tmp_path / "mbox").mkdir()
    (tmp_path / "mbox" / "alice").symlink_to(outside / "shadow")
    s = mbox_store(tmp_path)
    with pytest.raises(PermanentBackendError):
        bounded(s.open(user()))
    with pytest.raises(TemporaryBackendError):
        bounded(s.deliver(user(), chunks_of(b"Subject: x\n\nhi\n")))
    (tmp_path / "mbox" / "alice").unlink()
    (tmp_path / "mbox").rmdir()
    (tmp_path / "mbox").symlink_to(outside)  # the root's own folder: operator's, allowed
    other = MboxStore("spool/%u/mbox", tmp_path, lock_timeout=0.5)
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "alice").symlink_to(outside)
    with pytest.raises(PermanentBackendError):
        bounded(other.open(user()))
    with pytest.raises(TemporaryBackendError):
        bounded(other.deliver(user(), chunks_of(b"Subject: x\n\nhi\n")))


def test_mbox_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """An mbox that is a FIFO: refused without opening it (nothing blocks)."""
    (tmp_path / "mbox").mkdir()
    os.mkfifo(tmp_path / "mbox" / "alice")
    with pytest.raises(PermanentBackendError):
        bounded(mbox_store(tmp_path).open(user()))


def test_mbox_dotlock_link_is_never_followed(tmp_path: Path, outside: Path) -> None:
    """alice.lock -> /etc/shadow: never read, written or removed; the lock times out."""
    s = mbox_store(tmp_path)
    bounded(s.deliver(user(), chunks_of(b"Subject: x\n\nhi\n")))
    (tmp_path / "mbox" / "alice.lock").symlink_to(outside / "shadow")
    with pytest.raises(TemporaryBackendError):
        bounded(s.deliver(user(), chunks_of(b"Subject: y\n\nhi\n")))
    assert (tmp_path / "mbox" / "alice.lock").is_symlink()
    (tmp_path / "mbox" / "alice.lock").unlink()
    assert retrieve_all(s) == [b"Subject: x\r\n\r\nhi\r\n"]


def test_mbox_rewrite_and_spool_leave_no_predictable_files(tmp_path: Path) -> None:
    """Delivery spools and rewrite temp files are random, O_EXCL, and gone afterwards."""
    s = mbox_store(tmp_path)
    for i in range(3):
        bounded(s.deliver(user(), chunks_of(b"Subject: %d\n\nhi\n" % i)))
    assert len(retrieve_all(s)) == 3
    assert [p.name for p in (tmp_path / "mbox").iterdir() if p.name != ".pop3d-locks"] == [
        "alice"
    ]


def test_mbox_principal_with_attributes_still_delivers(tmp_path: Path) -> None:
    """A user record's uid/gid do not change where the mbox goes (no path from them)."""
    s = mbox_store(tmp_path)
    bounded(s.deliver(Principal("alice", {"uid": "0", "gid": "0"}), chunks_of(b"S: x\n\nb\n")))
    assert (tmp_path / "mbox" / "alice").is_file()
