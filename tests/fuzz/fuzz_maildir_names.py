"""Fuzz target: Maildir file names, as parsed and as listed by a real store.

Pure properties of the name parser, for any name (``os.fsdecode`` of any octets):

* ``split_name`` splits at the info separator and loses nothing;
* ``message_key`` ignores the flags and the ``S=``/``W=`` size fields, so a message keeps
  its key when another program adds flags or sizes to its name;
* ``uid_for_key`` is a valid UIDL (1-70 octets in 0x21-0x7E, RFC 1939 §7).

Properties of the store, with up to three files of those names and any content in ``new/``
and ``cur/`` of a real Maildir (on ``/dev/shm`` where there is one):

* opening never fails, whatever the names and the sizes they claim;
* UIDLs are unique, valid, and the same at the next open (after ``new/`` moved to ``cur/``);
* every message reads as its wire form (bare LF as CRLF, final CRLF), its length the
  listed size; a size in the name is only a hint: if a read finds it wrong, the next
  open lists the real size (issue 15: a self-healing index, never ``[SYS/TEMP]`` forever).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from pathlib import Path

from pop3d.errors import TemporaryBackendError
from pop3d.protocol import limits
from pop3d.protocol.values import Principal
from pop3d.storage import maildir
from tests.fuzz import harness

_SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
_LOOP = asyncio.new_event_loop()
_BARE_LF = re.compile(rb"(?<!\r)\n")


def reference_wire(data: bytes) -> bytes:
    """The wire form (RFC 1939 §3), written independently of ``pop3d.storage.wire``."""
    if not data:
        return b""
    out = _BARE_LF.sub(b"\r\n", data)
    return out if out.endswith(b"\n") else out + b"\r\n"


def _check_name(name: str) -> None:
    base, info = maildir.split_name(name)
    assert base + (name[len(base)] if info or len(base) < len(name) else "") + info == name \
        or (base, info) == (name, "")
    key = maildir.message_key(name)
    uid = maildir.uid_for_key(key)
    assert 1 <= len(uid) <= limits.MAX_UIDL
    assert all(0x21 <= ord(ch) <= 0x7E for ch in uid), f"invalid UIDL {uid!r}"
    if ":" not in base:
        assert maildir.message_key(base + ":2,FS") == key, "flags changed the key"
    if "," not in name and ":" not in name and "!" not in name and ";" not in name:
        assert maildir.message_key(name + ",S=12,W=13:2,S") == key, "sizes changed the key"


def _valid_file_name(name: str) -> bool:
    raw = os.fsencode(name)
    return 0 < len(raw) <= 200 and b"/" not in raw and b"\0" not in raw and \
        name not in (".", "..") and not name.startswith(".")


async def _open_and_read(store: maildir.MaildirStore) -> dict[str, tuple[int, bytes | None]]:
    """uid -> (listed size, what a read gave or None if it refused)."""
    drop = await store.open(Principal("fuzz"))
    try:
        out: dict[str, tuple[int, bytes | None]] = {}
        for info in drop.listing():
            assert info.uid not in out, "two messages with one UIDL"
            assert 1 <= len(info.uid) <= limits.MAX_UIDL
            try:
                data = b"".join([chunk async for chunk in drop.read(info.uid)])
            except TemporaryBackendError:
                data = None
            out[info.uid] = (info.size, data)
        return out
    finally:
        await drop.close()


def _check_store(split: harness.Split, names: list[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="pop3d-fuzz-", dir=_SCRATCH))
    try:
        box = root / "fuzz" / "Maildir"
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True)
        stored: list[bytes] = []
        for name in names:
            folder = "cur" if split.byte() & 1 else "new"
            data = split.chunk()
            if (box / "cur" / name).exists() or (box / "new" / name).exists():
                continue
            (box / folder / name).write_bytes(data)
            stored.append(data)
        store = maildir.MaildirStore("%u/Maildir", root)
        first = _LOOP.run_until_complete(_open_and_read(store))
        second = _LOOP.run_until_complete(_open_and_read(store))
        assert len(first) == len(stored), "a message file is not listed"
        assert set(first) == set(second), "UIDLs changed between two opens"
        for size, got in first.values():
            if got is not None:
                assert size == len(got), "listed size differs from what RETR sends"
        read = []
        for size, again in second.values():
            assert again is not None, "a message still unreadable at the next open"
            assert size == len(again), "listed size differs from what RETR sends"
            read.append(again)
        assert sorted(read) == sorted(map(reference_wire, stored)), "not read as wire form"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_one_input(data: bytes) -> None:
    """Check the parser on up to three names, then list them from a real Maildir."""
    split = harness.Split(data)
    names = []
    for _ in range(split.byte() % 4):
        name = os.fsdecode(split.chunk(100))
        _check_name(name)
        if _valid_file_name(name):
            names.append(name)
    if names and split.byte() & 1:
        _check_store(split, names)


if __name__ == "__main__":
    harness.main("tests.fuzz.fuzz_maildir_names")
