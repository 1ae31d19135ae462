"""The RETR fast path: ``MaildirMaildrop.read_inline`` gives exactly what ``read`` streams."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pop3d.errors import MessageVanished, TemporaryBackendError
from pop3d.storage import blocking, maildir
from pop3d.storage.maildir import MaildirMaildrop
from pop3d.storage.wire import to_wire

from .contract import read_all, run, user
from .test_maildir import MaildirHarness

SHAPES = [
    b"",
    b".",
    b".\n",
    b"a\r\nb\r\n",
    b"bare\nlf\n",
    b"mixed\r\nends\nhere",
    b"lone\rcr\r",
    b"\x00\xff 8-bit\n",
    b"x" * 70_000,  # over the inline limit: streamed instead
]


def _open(h: MaildirHarness) -> MaildirMaildrop:
    return run(h.make_store().open(user()))


@pytest.mark.parametrize("body", SHAPES)
def test_read_inline_equals_read(tmp_path: Path, body: bytes) -> None:
    """Inline reads are byte-identical to streamed reads, and only for small messages."""
    h = MaildirHarness(tmp_path)
    h.put("alice", body)
    drop = _open(h)
    try:
        [info] = drop.listing()
        inline = drop.read_inline(info.uid)
        streamed = run(read_all(drop, info.uid))
        assert len(streamed) == info.size
        if len(body) > maildir._INLINE_READ_BYTES:
            assert inline is None
        else:
            assert inline == streamed
    finally:
        run(drop.close())


def test_read_inline_vanished(tmp_path: Path) -> None:
    """A message removed by another program is MessageVanished on the fast path too."""
    h = MaildirHarness(tmp_path)
    h.put("alice", b"Subject: x\n\nbody\n")
    drop = _open(h)
    try:
        [info] = drop.listing()
        h.vanish("alice", info.uid)
        with pytest.raises(MessageVanished):
            drop.read_inline(info.uid)
    finally:
        run(drop.close())


def test_read_inline_refuses_a_changed_file(tmp_path: Path) -> None:
    """A file rewritten with another wire size is refused before any octet is sent.

    read_inline leaves a changed file to read(), which measures it off the event loop.
    """
    h = MaildirHarness(tmp_path)
    h.put("alice", b"Subject: x\n\nbody\n")
    drop = _open(h)
    try:
        [info] = drop.listing()
        [path] = h.files("alice")
        path.write_bytes(b"Subject: x\n\nbody that is longer now\n")
        assert drop.read_inline(info.uid) is None
        with pytest.raises(TemporaryBackendError):
            run(read_all(drop, info.uid))
    finally:
        run(drop.close())


@pytest.mark.parametrize("mode", ["nowait", "disk", "unsupported"])
def test_big_message_read_paths_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A big message reads the same from the page cache inline, or from disk in a thread."""
    body = b"".join(b"%d line\n.dotted\r\n" % i for i in range(20_000))
    if mode == "disk":  # every non-blocking read says it would block

        def would_block(*_args: object) -> int:
            raise BlockingIOError

        monkeypatch.setattr(os, "preadv", would_block)
    elif mode == "unsupported":
        monkeypatch.setattr(blocking, "_nowait", False)
    h = MaildirHarness(tmp_path)
    h.put("alice", body)
    drop = _open(h)
    try:
        [info] = drop.listing()
        data = run(read_all(drop, info.uid))
    finally:
        run(drop.close())
    assert len(data) == info.size
    assert data == body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_full_chunks_from_the_reused_read_buffer_stay_intact(tmp_path: Path) -> None:
    """A full chunk is normalised straight from the reader's buffer: every chunk handed out
    must stay as it was while later reads refill that buffer (all are joined at the end)."""
    chunk = 4096
    # A CRLF split by a chunk boundary, dots at line starts and at a chunk start, bare LFs,
    # a lone CR: every branch of the normaliser, many times over, well past the inline size.
    unit = b"a" * (chunk - 1) + b"\r\n" + b".dot\nbare lf\nlone\rcr\r\n" + b"b" * (chunk - 30)
    body = unit * 40
    assert len(body) > maildir._INLINE_READ_BYTES
    h = MaildirHarness(tmp_path)
    h.put("alice", body)
    drop = run(h.make_store(chunk_size=chunk).open(user()))
    try:
        [info] = drop.listing()
        data = run(read_all(drop, info.uid, bound=2 * chunk + 1))
    finally:
        run(drop.close())
    assert data == to_wire(body)
    assert len(data) == info.size
