"""The mbox store's fast paths: the scan cache, ``open_now``, ``read_inline``, the unquoter.

Each is checked against the slow path or a plain reference: a remembered scan is used only
while the file is the one scanned (an append, a change of the same size by another
program, our own UPDATE are all seen at the next login), and the fast reads give exactly
what one regular expression over the whole text and :func:`to_wire` give, however the
message is cut into chunks.
"""

from __future__ import annotations

import itertools
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from pop3d.errors import (
    MaildropLocked,
    MessageVanished,
    PermanentBackendError,
    TemporaryBackendError,
    WouldWait,
)
from pop3d.storage import mbox
from pop3d.storage.mbox import MboxMaildrop, MboxStore
from pop3d.storage.wire import to_wire

from .contract import chunks_of, read_all, run, user
from .test_maildir_inline import SHAPES as MAILDIR_SHAPES
from .test_mbox import QUOTE, UNQUOTE, MboxHarness

OLD = 1_600_000_000


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every scan of an mbox (its size)."""
    seen: list[int] = []
    real = mbox._scan

    def counting(fd: int, *args: Any, **kwargs: Any) -> Any:
        seen.append(os.fstat(fd).st_size)
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(mbox, "_scan", counting)
    return seen


@pytest.fixture
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remember scans of files changed just now (a change must then land in a later
    timestamp tick to be seen: see :func:`_in_a_later_tick`)."""
    monkeypatch.setattr(mbox, "_RACY_SECONDS", 0)


def _in_a_later_tick(path: Path, change: Callable[[], None]) -> None:
    """Make ``change`` to the file until its ctime moves (a bounded number of tries)."""
    before = path.stat().st_ctime_ns
    for _ in range(10_000):
        change()
        if path.stat().st_ctime_ns != before:
            return
    raise AssertionError("the ctime never moved")


def _listing(store: MboxStore) -> list[tuple[str, int, bytes]]:
    async def go() -> list[tuple[str, int, bytes]]:
        drop = await store.open(user())
        try:
            return [(i.uid, i.size, await read_all(drop, i.uid)) for i in drop.listing()]
        finally:
            await drop.close()

    return run(go())


def _opened_now(store: MboxStore) -> MboxMaildrop:
    return store.open_now(user())


# ---------------------------------------------------------------------------- scan cache


def test_unchanged_mbox_is_not_scanned_again(
    tmp_path: Path, scans: list[int], no_racy_window: None
) -> None:
    """A second login to an unchanged mbox reuses the scan: no scan, opened at once."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    h.put("alice", b"Subject: 2\n\n>From two\n")
    store = h.make_store()
    with pytest.raises(WouldWait):
        _opened_now(store)  # nothing remembered yet: nothing locked either
    first = _listing(store)
    assert len(scans) == 1
    assert _listing(store) == first
    drop = _opened_now(store)
    try:
        assert [(i.uid, i.size) for i in drop.listing()] == [(u, s) for u, s, _ in first]
    finally:
        drop.release()
    assert len(scans) == 1


def test_racy_mbox_is_scanned_at_every_login(tmp_path: Path, scans: list[int]) -> None:
    """An mbox changed within the racy window is not remembered (the rule of Maildir's)."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    assert _listing(store) == _listing(store)
    assert len(scans) == 2
    with pytest.raises(WouldWait):
        _opened_now(store)


def test_an_mbox_older_than_the_racy_window_is_remembered(tmp_path: Path, scans: list[int]) -> None:
    """The rule with its real window: remembered once mtime and ctime are older than it
    (reached by waiting for the clock, a bounded 3 s: a ctime cannot be set back)."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    s = h.path("alice").stat()
    old_enough = max(s.st_ctime_ns, s.st_mtime_ns) + (mbox._RACY_SECONDS + 0.2) * 1e9
    while time.time_ns() < old_enough:
        time.sleep(0.05)
    first = _listing(store)
    assert _listing(store) == first
    assert len(scans) == 1


def test_append_by_another_program_is_seen(
    tmp_path: Path, scans: list[int], no_racy_window: None
) -> None:
    """A message appended between sessions (size and times change) is listed next login."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    _listing(store)
    h.put("alice", b"Subject: 2\n\ntwo\n")
    assert [b for _, _, b in _listing(store)] == [b"Subject: 1\r\n\r\none\r\n",
                                                  b"Subject: 2\r\n\r\ntwo\r\n"]  # fmt: skip
    assert len(scans) == 2


def test_our_own_delivery_is_seen(tmp_path: Path, no_racy_window: None) -> None:
    """A delivery through the store (as ``pop3d deliver`` and LMTP do) is listed next login."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    assert len(_listing(store)) == 1
    run(store.deliver(user(), chunks_of(b"Subject: 2\r\n\r\ntwo\r\n")))
    assert len(_listing(store)) == 2
    assert len(_listing(h.make_store())) == 2  # another process's view agrees


def test_same_size_change_by_another_program_is_seen(
    tmp_path: Path, scans: list[int], no_racy_window: None
) -> None:
    """A rewrite in place of the same size, mtime set back, is seen: the ctime moved."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\nhello\n")
    store = h.make_store()
    [(uid, size, body)] = _listing(store)
    path = h.path("alice")
    s = path.stat()

    def rewrite() -> None:
        data = path.read_bytes()
        with path.open("r+b") as f:
            f.write(data.replace(b"hello", b"HELLO") if b"hello" in data
                    else data.replace(b"HELLO", b"hello"))  # fmt: skip
        os.utime(path, ns=(s.st_atime_ns, s.st_mtime_ns))

    _in_a_later_tick(path, rewrite)
    if b"HELLO" not in path.read_bytes():
        _in_a_later_tick(path, rewrite)
    assert path.stat().st_size == s.st_size
    assert path.stat().st_mtime_ns == s.st_mtime_ns
    [(uid2, size2, body2)] = _listing(store)
    assert body2 == body.replace(b"hello", b"HELLO")
    assert size2 == size
    assert uid2 != uid
    assert len(scans) == 2


def test_our_own_update_is_seen(tmp_path: Path, scans: list[int], no_racy_window: None) -> None:
    """After our UPDATE (a new file by rename), the next login lists what is left."""
    h = MboxHarness(tmp_path)
    for i in range(3):
        h.put("alice", b"Subject: %d\n\nm%d\n" % (i, i))
    store = h.make_store()
    before = _listing(store)

    async def delete_first() -> None:
        drop = await store.open(user())
        await drop.commit([drop.listing()[0].uid])
        await drop.close()

    run(delete_first())
    assert _listing(store) == before[1:]
    assert len(scans) == 3  # the open, the commit's rescan under the lock, the next open


def test_a_miss_in_open_now_leaves_nothing_locked(tmp_path: Path, no_racy_window: None) -> None:
    """open_now on a changed mbox says WouldWait and holds no session lock after it."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    _listing(store)
    h.put("alice", b"Subject: 2\n\ntwo\n")
    with pytest.raises(WouldWait):
        _opened_now(store)
    drop = run(h.make_store().open(user()))  # another process's store: not locked out
    run(drop.close())


def test_open_now_respects_the_session_lock(tmp_path: Path, no_racy_window: None) -> None:
    """A remembered mbox is still one session at a time."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    _listing(store)
    drop = _opened_now(store)
    try:
        with pytest.raises(MaildropLocked):
            _opened_now(store)
        with pytest.raises(MaildropLocked):
            run(h.make_store().open(user()))
    finally:
        drop.release()


def test_a_remembered_mbox_opens_while_another_program_holds_its_lock(
    tmp_path: Path, no_racy_window: None
) -> None:
    """An unchanged mbox needs no mbox lock: a login does not wait for an MDA that holds
    it and has not written; once it writes, the login waits (and here times out)."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = MboxStore("mbox/%u", tmp_path, lock_timeout=0.3)
    _listing(store)
    dotlock = h.path("alice").with_name("alice.lock")
    dotlock.write_text(f"{os.getpid()}:{socket.gethostname()}\n")  # alive: never stale
    try:
        assert len(_listing(store)) == 1
        h.put("alice", b"Subject: 2\n\ntwo\n")  # an MDA ignoring its own lock, for the test
        with pytest.raises(TemporaryBackendError, match="timed out"):
            _listing(store)
    finally:
        dotlock.unlink()
    assert len(_listing(store)) == 2


def test_a_link_put_in_place_of_a_remembered_mbox_is_refused(
    tmp_path: Path, no_racy_window: None
) -> None:
    """The fast path opens with O_NOFOLLOW too: a symlink swapped in is [SYS/PERM]."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    store = h.make_store()
    _listing(store)
    secret = tmp_path / "secret"
    h.path("alice").rename(secret)
    h.path("alice").symlink_to(secret)
    with pytest.raises(WouldWait):
        _opened_now(store)
    with pytest.raises(PermanentBackendError):
        _listing(store)


def test_a_message_found_moved_drops_the_remembered_scan(
    tmp_path: Path, scans: list[int], no_racy_window: None
) -> None:
    """A read that finds the mbox changed under a session makes the next login scan."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: 1\n\none\n")
    h.put("alice", b"Subject: 2\n\ntwo\n")
    store = h.make_store()
    _listing(store)
    drop = _opened_now(store)
    try:
        first, second = drop.listing()
        h.vanish("alice", first.uid)
        assert drop.read_inline(second.uid) is None  # past the end now: left to read()
        with pytest.raises(MessageVanished):
            run(read_all(drop, second.uid))
    finally:
        drop.release()
    with pytest.raises(WouldWait):
        _opened_now(store)
    assert len(_listing(store)) == 1


def test_a_scan_too_big_to_remember_is_not_kept(
    tmp_path: Path, scans: list[int], no_racy_window: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is bounded in messages: an mbox over the bound is scanned at every login."""
    monkeypatch.setattr(mbox, "_SCAN_CACHE_MESSAGES", 2)
    h = MboxHarness(tmp_path)
    for i in range(3):
        h.put("alice", b"m%d\n" % i)
    store = h.make_store()
    _listing(store)
    _listing(store)
    assert len(scans) == 2


# ---------------------------------------------------------------------------- read_inline

SHAPES = [
    *MAILDIR_SHAPES,  # the last is over the inline limit: streamed instead
    b"From me\n>From you\n>>From them\n\nFrom 12:00\n",
    b">",
]


@pytest.mark.parametrize("body", SHAPES)
def test_read_inline_equals_read(tmp_path: Path, body: bytes) -> None:
    """Inline reads are byte-identical to streamed reads, and only for small messages."""
    h = MboxHarness(tmp_path)
    h.create("alice")
    store = h.make_store()
    run(store.deliver(user(), chunks_of(body)))
    drop = run(store.open(user()))
    try:
        [info] = drop.listing()
        inline = drop.read_inline(info.uid)
        streamed = run(read_all(drop, info.uid))
        assert streamed == to_wire(body)
        assert len(streamed) == info.size
        if len(body) > mbox._INLINE_READ_BYTES:
            assert inline is None
        else:
            assert inline == streamed
    finally:
        run(drop.close())


def test_read_inline_refuses_a_changed_message(tmp_path: Path) -> None:
    """A message whose octets no longer add up to its size is refused before any is sent."""
    h = MboxHarness(tmp_path)
    h.put("alice", b"Subject: x\n\nbody\n")
    h.put("alice", b"Subject: y\n\nmore\n")
    drop = run(h.make_store().open(user()))
    try:
        first, _ = drop.listing()
        path = h.path("alice")
        path.write_bytes(path.read_bytes().replace(b"body\n", b"bo\ndy"))  # same length
        with pytest.raises(TemporaryBackendError, match="changed"):
            drop.read_inline(first.uid)
    finally:
        run(drop.close())


# ---------------------------------------------------------------------------- chunking

_ALPHABET = b">From \r\n\nxF."


@settings(max_examples=400, deadline=None)
@given(
    data=hs.binary(max_size=200).map(lambda b: bytes(_ALPHABET[c % len(_ALPHABET)] for c in b)),
    cuts=hs.lists(hs.integers(min_value=0, max_value=200), max_size=8),
)
def test_requoting_equals_one_regex_over_the_whole_text(data: bytes, cuts: list[int]) -> None:
    """Either direction, fed in chunks cut anywhere, gives what one regular expression
    over the whole text gives; a chunk it leaves alone comes back as the same object."""
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    for unquote, expected in ((True, UNQUOTE.sub(rb"\1", data)), (False, QUOTE.sub(rb">\1", data))):
        r = mbox._Requoter(unquote=unquote)
        out = []
        for chunk in chunks:
            buf = bytearray(chunk)  # the reader feeds its read buffer
            got = r.feed(cast("bytes", buf))
            out.append(bytes(got))
        assert b"".join(out) + r.finish() == expected


def test_an_untouched_chunk_is_not_copied() -> None:
    """Base64-like chunks, and text without ``>From``, pass through as they are."""
    r = mbox._Requoter(unquote=True)
    for chunk in (b"QUJD\nREVG\n", b"reply:\n> quoted\n> From here on\nend", b"\nno more\n"):
        assert r.feed(chunk) is chunk
    assert r.feed(b">From x\n") == b"From x\n"


@settings(max_examples=150, deadline=None)
@given(
    body=hs.binary(max_size=300).map(lambda b: bytes(_ALPHABET[c % len(_ALPHABET)] for c in b)),
    chunk_size=hs.integers(min_value=1, max_value=64),
)
def test_streamed_and_inline_reads_equal_the_wire_form(body: bytes, chunk_size: int) -> None:
    """Whatever the message and however the reader cuts it, RETR sends ``to_wire(body)``."""
    with tempfile.TemporaryDirectory() as tmp:
        h = MboxHarness(Path(tmp))
        h.create("alice")
        store = h.make_store(chunk_size=chunk_size)
        run(store.deliver(user(), chunks_of(body)))
        drop = run(store.open(user()))
        try:
            [info] = drop.listing()
            streamed = run(read_all(drop, info.uid))
            assert streamed == to_wire(body)
            assert len(streamed) == info.size
            inline = drop.read_inline(info.uid)
            assert inline is None or inline == streamed
        finally:
            run(drop.close())


@settings(max_examples=400, deadline=None)
@given(data=hs.binary(max_size=300).map(lambda b: bytes(b">>>>From x\n"[c % 11] for c in b)))
def test_the_quoted_from_search_equals_in(data: bytes) -> None:
    """The memchr walk over ``>`` finds ``>From `` exactly where ``in`` does, past its
    first 16 ``>`` too."""
    assert mbox._holds_quoted_from(data) == (b">From " in data)
    assert mbox._holds_quoted_from(b">" * 40 + data) == (b">From " in b">" * 40 + data)
    assert mbox._holds_quoted_from(b"> x " * 20 + b">From ")
