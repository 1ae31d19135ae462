"""The lock table (storage/lock_table.py) and the choice of session locks (storage/locking.py).

Conflicts are checked between real processes and real open file descriptions; the only
stand-in is the platform flag of the fallback test.
"""

from __future__ import annotations

import fcntl
import gc
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pop3d.config import from_mapping
from pop3d.errors import ConfigError, MaildropLocked, TemporaryBackendError
from pop3d.storage import lock_table, locking
from pop3d.storage.lock_table import SHARDS, LockTable, TableLock, offset_of, shared_table
from pop3d.storage.locking import (
    PER_MAILBOX_LOCKS,
    TABLE_NAME,
    PerMailboxLocks,
    default_table_path,
    session_locks_for,
)
from pop3d.storage.maildir import MaildirStore
from pop3d.storage.mbox import MboxStore

from .conftest import PythonSpawner

pytestmark = pytest.mark.skipif(
    not lock_table.AVAILABLE, reason="no open-file-description locks on this platform"
)

#: ``struct flock`` as the kernel reads it on 64-bit Linux.
FLOCK = struct.Struct("@hhqqi4x")

HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pop3d.errors import MaildropLocked
    from pop3d.storage.lock_table import LockTable
    table = LockTable(Path(sys.argv[1]))
    try:
        held = table.lock(int(sys.argv[2]))
    except MaildropLocked:
        print("refused", flush=True)
        sys.exit(0)
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
    held.close()
    """
)


@pytest.fixture
def spawn(spawn_python: PythonSpawner) -> Callable[[Path, int], subprocess.Popen[str]]:
    """Start a process that holds byte ``offset`` of the table at ``path``; the answer
    ("locked"/"refused") is read with :func:`answer`."""
    return lambda path, offset: spawn_python(HOLDER, str(path), str(offset))


def answer(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def lock_seen_by_another_description(path: Path, offset: int) -> tuple[int, int, int]:
    """F_OFD_GETLK from a new open file description: (type, start, len) of the lock met."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        probe = FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
        kind, _, start, length, _ = FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))
    finally:
        os.close(fd)
    return kind, start, length


# ---------------------------------------------------------------------------- the table


def test_struct_flock_reaches_the_kernel_as_packed(tmp_path: Path) -> None:
    """The lock is exactly 1 byte at the offset asked for, seen from another description."""
    table = LockTable(tmp_path / "t")
    offset = (1 << 62) - 1 - 4096  # near the top: the 64-bit fields are not truncated
    held = table.lock(offset)
    assert FLOCK.size == 32
    file = table.file_of(offset)
    assert lock_seen_by_another_description(file, offset) == (fcntl.F_WRLCK, offset, 1)
    assert lock_seen_by_another_description(file, offset + 1)[0] == fcntl.F_UNLCK
    assert lock_seen_by_another_description(file, offset - 1)[0] == fcntl.F_UNLCK
    held.close()
    assert lock_seen_by_another_description(file, offset)[0] == fcntl.F_UNLCK


def test_second_lock_in_one_process_is_refused(tmp_path: Path) -> None:
    """One description does not conflict with itself: the table's own set refuses."""
    table = LockTable(tmp_path / "t")
    held = table.lock(42)
    with pytest.raises(MaildropLocked):
        table.lock(42)
    other = table.lock(43)  # another maildrop
    held.close()
    table.lock(42).close()
    other.close()
    assert table.held == 0


def test_two_tables_of_one_file_in_one_process_conflict(tmp_path: Path) -> None:
    """Two descriptions of the same table file exclude each other, even in one process."""
    one, two = LockTable(tmp_path / "t"), LockTable(tmp_path / "t")
    held = one.lock(7)
    with pytest.raises(MaildropLocked):
        two.lock(7)
    held.close()
    two.lock(7).close()


def test_another_process_is_refused_and_gets_it_after_release(
    tmp_path: Path, spawn: Callable[[Path, int], subprocess.Popen[str]]
) -> None:
    """A byte held here is refused to another process, which may take other bytes."""
    table = LockTable(tmp_path / "t")
    held = table.lock(1000)
    assert answer(spawn(table.path, 1000)) == "refused"
    neighbour = spawn(table.path, 1001)
    assert answer(neighbour) == "locked"
    with pytest.raises(MaildropLocked):
        table.lock(1001)
    held.close()
    assert answer(spawn(table.path, 1000)) == "locked"


def test_kill_9_of_the_holder_frees_its_locks(
    tmp_path: Path, spawn: Callable[[Path, int], subprocess.Popen[str]]
) -> None:
    """The lock dies with the process that held it: SIGKILL, and the byte is free."""
    table = LockTable(tmp_path / "t")
    holder = spawn(table.path, 5)
    assert answer(holder) == "locked"
    with pytest.raises(MaildropLocked):
        table.lock(5)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    table.lock(5).close()


def test_release_on_close_is_idempotent(tmp_path: Path) -> None:
    """close() releases once; a second close() changes nothing (not a later owner's lock)."""
    table = LockTable(tmp_path / "t")
    first = table.lock(9)
    first.close()
    second = table.lock(9)
    first.close()
    assert first.closed
    assert not second.closed
    with pytest.raises(MaildropLocked):
        LockTable(table.path).lock(9)
    second.close()


def test_a_dropped_handle_releases_its_lock(tmp_path: Path) -> None:
    """A handle garbage-collected without close() releases, as a dropped lock file does."""
    table = LockTable(tmp_path / "t")
    table.lock(11)  # dropped at once
    table.lock(11).close()

    held = table.lock(12)
    cycle: list[object] = [held]
    cycle.append(cycle)  # only the cycle collector can free it
    del held, cycle
    gc.collect()
    LockTable(table.path).lock(12).close()
    assert table.held == 0


def test_one_winner_among_threads(tmp_path: Path) -> None:
    """Threads racing for one maildrop: exactly one gets it."""
    table = LockTable(tmp_path / "t")
    barrier = threading.Barrier(8)
    won: list[TableLock] = []
    lost: list[int] = []

    def contend() -> None:
        barrier.wait()
        try:
            won.append(table.lock(77))
        except MaildropLocked:
            lost.append(1)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(lost)) == (1, 7)
    won[0].close()


def test_tables_of_two_files_are_independent(tmp_path: Path) -> None:
    """The same byte in two table files is two different locks."""
    one, two = LockTable(tmp_path / "a"), LockTable(tmp_path / "b")
    a, b = one.lock(3), two.lock(3)
    a.close()
    b.close()


def test_one_descriptor_per_file_for_every_lock(tmp_path: Path) -> None:
    """1,000 locks of one table hold one descriptor per file they fall in, at most SHARDS."""
    table = LockTable(tmp_path / "t")
    before = open_fds()
    held = [table.lock(i * SHARDS) for i in range(1000)]  # all in file 00
    assert open_fds() == before + 1
    held += [table.lock(i * 2 + 1) for i in range(1000)]  # the odd files
    assert open_fds() == before + 1 + SHARDS // 2
    for h in held:
        h.close()
    assert open_fds() == before + 1 + SHARDS // 2  # kept open for the next lock
    table.close()
    assert open_fds() == before


def test_locks_spread_over_the_files(tmp_path: Path) -> None:
    """Byte n lives in file n % SHARDS: each file's kernel lock list stays short."""
    table = LockTable(tmp_path / "t")
    held = [table.lock(i) for i in range(SHARDS * 3)]
    for i in (0, 1, SHARDS - 1, SHARDS, 2 * SHARDS + 5):
        assert table.file_of(i) == tmp_path / "t" / f"{i % SHARDS:02x}"
        assert lock_seen_by_another_description(table.file_of(i), i)[0] == fcntl.F_WRLCK
        other = (i + 1) % SHARDS
        assert lock_seen_by_another_description(table.path / f"{other:02x}", i)[0] == (
            fcntl.F_UNLCK
        )
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        f"{i:02x}" for i in range(SHARDS)
    ]
    for h in held:
        h.close()


def test_table_is_private_and_only_it_is_created(tmp_path: Path) -> None:
    """The folder (0700) and its files (0600) appear at the first lock; a parent never."""
    missing = LockTable(tmp_path / "nope" / "t")
    with pytest.raises(TemporaryBackendError):
        missing.lock(1)
    assert not (tmp_path / "nope").exists()
    (tmp_path / "nope").mkdir()
    missing.lock(1).close()  # a failure is not remembered
    assert stat.S_IMODE((tmp_path / "nope" / "t").stat().st_mode) == 0o700
    assert stat.S_IMODE(missing.file_of(1).stat().st_mode) == 0o600
    assert [p.name for p in (tmp_path / "nope" / "t").iterdir()] == ["01"]


def test_symlink_or_fifo_in_place_of_a_table_file_is_refused(tmp_path: Path) -> None:
    """A table file is opened without following a link, and must be a regular file."""
    table = LockTable(tmp_path / "t")
    table.path.mkdir()
    table.file_of(1).symlink_to(tmp_path / "target")
    with pytest.raises(TemporaryBackendError):
        table.lock(1)
    assert not (tmp_path / "target").exists()
    os.mkfifo(table.file_of(2))
    with pytest.raises(TemporaryBackendError):
        table.lock(2)
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(TemporaryBackendError):  # a file where the folder should be
        LockTable(tmp_path / "plain").lock(3)


def test_offsets_are_bounded(tmp_path: Path) -> None:
    table = LockTable(tmp_path / "t")
    for bad in (-1, 1 << 62):
        with pytest.raises(ValueError, match="range"):
            table.lock(bad)


# ---------------------------------------------------------------------------- fork


#: Forks (in a fresh interpreter of its own, not in the test runner) and prints what the
#: parent and the child each see.
FORKER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from pop3d.errors import MaildropLocked
    from pop3d.storage.lock_table import LockTable

    def attempt(table, offset):
        try:
            return table.lock(offset)
        except MaildropLocked:
            return None

    table = LockTable(Path(sys.argv[1]))
    parents = table.lock(1)
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            refused = attempt(table, 1) is None
            parents.close()  # inherited: must not unlock the parent's byte
            kept = table.lock(2)  # held until the child exits
            os.write(report_w, b"child: refused %s, holds %d" % (str(refused).encode(), table.held))
            os.read(go_r, 1)
        finally:
            os._exit(0)
    print(os.read(report_r, 100).decode())
    # The parent's lock survived the child's close of its inherited handle...
    other = LockTable(table.path)
    print("parent: byte 1 refused to another description:", attempt(other, 1) is None)
    # ...and the child's own lock holds against the parent's description.
    print("parent: byte 2 refused to the parent:", attempt(table, 2) is None)
    os.write(go_w, b"x")
    os.waitpid(pid, 0)
    print("parent: byte 2 after the child exited:", attempt(table, 2) is not None)
    """
)


def test_forked_child_opens_its_own_descriptor(tmp_path: Path) -> None:
    """After fork the child has its own description: parent and child exclude each other.

    The child's inherited handle releases nothing of the parent's; the child's own lock
    holds against the parent until the child ends.
    """
    out = subprocess.run(
        [sys.executable, "-c", FORKER, str(tmp_path / "t")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.splitlines() == [
        "child: refused True, holds 1",
        "parent: byte 1 refused to another description: True",
        "parent: byte 2 refused to the parent: True",
        "parent: byte 2 after the child exited: True",
    ]


def test_forked_child_does_not_keep_the_parents_locks_alive(
    tmp_path: Path, spawn: Callable[[Path, int], subprocess.Popen[str]]
) -> None:
    """The child closes the inherited descriptor: the parent's locks end with the parent."""
    code = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        from pop3d.storage.lock_table import LockTable
        table = LockTable(Path(sys.argv[1]))
        held = table.lock(3)
        if os.fork() == 0:  # the child outlives the parent, until stdin closes
            sys.stdin.read()
            os._exit(0)
        print("locked", flush=True)
        sys.stdin.read()
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "t")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert answer(parent) == "locked"
        assert answer(spawn(tmp_path / "t", 3)) == "refused"
        parent.kill()
        parent.wait()
        assert answer(spawn(tmp_path / "t", 3)) == "locked"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        assert parent.stdin is not None
        assert parent.stdout is not None
        parent.stdin.close()
        parent.stdout.close()  # and the orphaned child, reading the same stdin, ends


# ---------------------------------------------------------------------------- offsets


def test_offset_is_the_folders_identity_and_the_name(tmp_path: Path) -> None:
    """Every path to a folder gives its byte; another name or folder gives another."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    offset = offset_of(tmp_path / "a" / "pop3d.lock")
    assert offset_of(tmp_path / "link" / "pop3d.lock") == offset
    assert offset_of(tmp_path / "a" / ".." / "a" / "pop3d.lock") == offset
    assert offset_of(tmp_path / "a" / ".x.pop3d") != offset
    assert offset_of(tmp_path / "b" / "pop3d.lock") != offset
    assert 0 <= offset < 1 << 62
    with pytest.raises(TemporaryBackendError):
        offset_of(tmp_path / "missing" / "pop3d.lock")


def test_offset_is_the_same_in_every_process(tmp_path: Path) -> None:
    """A stable hash, not hash(): another interpreter computes the same byte."""
    (tmp_path / "a").mkdir()
    code = "import sys; from pathlib import Path; from pop3d.storage.lock_table import offset_of;"
    code += "print(offset_of(Path(sys.argv[1])))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "a" / "pop3d.lock")],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"},
    )  # fmt: skip
    assert int(out.stdout) == offset_of(tmp_path / "a" / "pop3d.lock")


# ---------------------------------------------------------------------------- the choice


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("mail/%u/Maildir", "/base/mail/.pop3d-locks"),
        ("/var/mail/%u", "/var/mail/.pop3d-locks"),
        ("/var/vmail/%d/%n/Maildir", "/var/vmail/.pop3d-locks"),
        ("mail/x%u", "/base/mail/.pop3d-locks"),
        ("mail/%%/%u", "/base/mail/%/.pop3d-locks"),
        ("%u/Maildir", None),  # no folder shared by the users
        ("%d/%n", None),
        ("mail/.%u", None),  # the user "pop3d-locks" would be the table
        ("mail/.pop3d-%u", None),
    ],
)
def test_default_table_is_in_the_templates_static_folder(
    template: str, expected: str | None
) -> None:
    got = default_table_path(template, Path("/base"))
    assert (None if got is None else str(got)) == expected


def test_per_mailbox_files_when_asked_or_without_a_static_folder(tmp_path: Path) -> None:
    assert session_locks_for("mail/%u", tmp_path, "per-mailbox") is PER_MAILBOX_LOCKS
    assert session_locks_for("%u/Maildir", tmp_path) is PER_MAILBOX_LOCKS
    table = session_locks_for("mail/%u", tmp_path)
    assert isinstance(table, LockTable)
    assert table.path == tmp_path / "mail" / TABLE_NAME
    explicit = session_locks_for("mail/%u", tmp_path, tmp_path / "locks")
    assert isinstance(explicit, LockTable)
    assert explicit.path == tmp_path / "locks"


def test_platforms_without_ofd_locks_use_per_mailbox_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock_table, "AVAILABLE", False)
    assert session_locks_for("mail/%u", tmp_path) is PER_MAILBOX_LOCKS
    assert session_locks_for("mail/%u", tmp_path, tmp_path / "locks") is PER_MAILBOX_LOCKS


def test_per_mailbox_lock_files_still_work(
    tmp_path: Path, spawn: Callable[[Path, int], subprocess.Popen[str]]
) -> None:
    """The fallback: flock on the lock path itself, refused twice, freed by close."""
    locks = PerMailboxLocks()
    held = locks.acquire(tmp_path / "pop3d.lock")
    assert (tmp_path / "pop3d.lock").is_file()
    with pytest.raises(MaildropLocked):
        locks.acquire(tmp_path / "pop3d.lock")
    code = (
        "import fcntl, sys; f = open(sys.argv[1], 'rb'); "
        "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    )
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pop3d.lock")],
                           capture_output=True, check=False)  # fmt: skip
    assert other.returncode != 0  # BlockingIOError in the other process
    held.close()
    locks.acquire(tmp_path / "pop3d.lock").close()


def test_stores_of_one_table_share_one_descriptor(tmp_path: Path) -> None:
    """Every store of a process naming one table file uses the same table object."""
    one, two = MaildirStore("mail/%u/Maildir", tmp_path), MaildirStore("mail/%u", tmp_path)
    assert one.session_locks is two.session_locks
    assert one.session_locks is shared_table(tmp_path / "mail" / TABLE_NAME)
    mbox = MboxStore("mbox/%u", tmp_path)
    assert isinstance(mbox.session_locks, LockTable)
    assert mbox.session_locks.path == tmp_path / "mbox" / TABLE_NAME


# ---------------------------------------------------------------------------- config


def _storage(tmp_path: Path, **keys: object) -> MaildirStore:
    cfg = from_mapping({"storage": {"maildir": "mail/%u/Maildir", **keys}}, tmp_path)
    return MaildirStore.from_config(cfg.storage)


def test_config_lock_table(tmp_path: Path) -> None:
    """``[storage] lock_table``: unset (the default), a path (config-relative), or per-mailbox."""
    default = _storage(tmp_path).session_locks
    assert isinstance(default, LockTable)
    assert default.path == tmp_path / "mail" / TABLE_NAME
    relative = _storage(tmp_path, lock_table="run/locks").session_locks
    assert isinstance(relative, LockTable)
    assert relative.path == tmp_path / "run" / "locks"
    absolute = _storage(tmp_path, lock_table="/run/pop3d/locks").session_locks
    assert isinstance(absolute, LockTable)
    assert absolute.path == Path("/run/pop3d/locks")
    assert _storage(tmp_path, lock_table="per-mailbox").session_locks is PER_MAILBOX_LOCKS
    cfg = from_mapping({"storage": {"mbox": "/var/mail/%u", "lock_table": "per-mailbox"}},
                       tmp_path)  # fmt: skip
    assert MboxStore.from_config(cfg.storage).session_locks is locking.PER_MAILBOX_LOCKS


@pytest.mark.parametrize("value", ["", "  ", 7, True])
def test_config_lock_table_must_be_a_path_or_per_mailbox(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError):
        from_mapping({"storage": {"maildir": "m/%u", "lock_table": value}}, tmp_path)
