"""Fuzz target: the mbox store's splitter, reader, appender and rewrite, on real files.

For any existing file content (the "preamble": any octets, an mbox or not) and up to
three messages (any octets, delivered in chunks cut anywhere), in a real mbox file (on
``/dev/shm`` where there is one):

* opening never raises but ``TemporaryBackendError``, and every listed message reads as
  exactly its listed size, the same by the RETR fast path (``read_inline``) when it
  answers;
* after the deliveries, the file lists the old messages, then one message per delivery,
  each reading back byte for byte as the wire form of what was delivered (mboxrd quoting
  is reversed exactly; bare LF as CRLF, final CRLF);
* the old messages keep their UIDLs and content across the appends, when the file ended
  with a line end, LF or CRLF (see the exception below);
* deleting one message (UPDATE: rewrite and rename) keeps every other message, UIDL and
  content, unless messages carry ``X-UIDL:`` headers or are identical (both documented
  to renumber their UIDLs in ``storage/mbox.py``).

Not checked (reported instead): a file whose last line lacks its line end gains one when
a message is appended after it, which changes that last message's UIDL, and can turn an
unterminated ``From ...hh:mm`` line at the end of the preamble into a From_ line (one
more, empty, message).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from pop3d.errors import TemporaryBackendError
from pop3d.protocol.values import Principal
from pop3d.storage.mbox import MboxStore
from tests.fuzz import harness
from tests.fuzz.fuzz_maildir_names import reference_wire

_SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
_LOOP = asyncio.new_event_loop()
_USER = Principal("fuzz")

Listing = list[tuple[str, int, bytes]]


async def _read_all(store: MboxStore) -> Listing:
    """(uid, listed size, content) of every message; each read must match its size."""
    drop = await store.open(_USER)
    try:
        out = []
        for info in drop.listing():
            data = b"".join([chunk async for chunk in drop.read(info.uid)])
            assert len(data) == info.size, "listed size differs from what RETR sends"
            inline = drop.read_inline(info.uid)
            assert inline is None or inline == data, "the RETR fast path differs"
            out.append((info.uid, info.size, data))
        return out
    finally:
        await drop.close()


async def _chunks(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def _delete(store: MboxStore, uid: str) -> None:
    drop = await store.open(_USER)
    try:
        await drop.commit([uid])
    finally:
        await drop.close()


def _renumbering(listing: Listing) -> bool:
    """Whether UIDLs may legitimately move: X-UIDL headers, or identical messages."""
    contents = [data for _, _, data in listing]
    return len(set(contents)) < len(contents) or any(b"x-uidl:" in d.lower() for d in contents)


def test_one_input(data: bytes) -> None:
    """Write the preamble, deliver the messages, read, delete one, read again."""
    split = harness.Split(data)
    preamble = split.chunk()
    count = split.byte() % 4
    messages = [split.chunk() for _ in range(count)]
    sender = split.chunk(40).decode("ascii", "replace") or None
    victim = split.byte()
    root = Path(tempfile.mkdtemp(prefix="pop3d-fuzz-", dir=_SCRATCH))
    try:
        (root / "fuzz").write_bytes(preamble)
        store = MboxStore("%u", root, lock_timeout=5)
        try:
            before = _LOOP.run_until_complete(_read_all(store))
        except TemporaryBackendError:
            return  # a file it refuses to serve (too damaged): refused cleanly
        for message in messages:
            pieces = split.pieces(message) if message else []
            _LOOP.run_until_complete(store.deliver(_USER, _chunks(pieces), sender=sender))
        after = _LOOP.run_until_complete(_read_all(store))
        ends_line = preamble.endswith(b"\n") or not preamble
        if ends_line:
            assert len(after) == len(before) + len(messages), "a delivery merged or split"
        else:  # the line end the append adds may complete a From_ line (see the head)
            assert len(after) >= len(before) + len(messages), "a delivery merged"
        for (_, _, got), sent in zip(after[len(after) - len(messages):], messages, strict=True):
            assert got == reference_wire(sent), "a delivered message reads back changed"
        if ends_line and not _renumbering(after):
            assert after[: len(before)] == before, "an append changed an older message"
        if not after:
            return
        gone = after[victim % len(after)]
        _LOOP.run_until_complete(_delete(store, gone[0]))
        final = _LOOP.run_until_complete(_read_all(store))
        kept = [m for m in after if m is not gone]
        assert len(final) == len(kept), "the rewrite lost or invented a message"
        if not _renumbering(after):
            assert final == kept, "the rewrite changed a message it kept"
        else:
            assert [d for _, _, d in final] == [d for _, _, d in kept]
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    harness.main("tests.fuzz.fuzz_mbox")
