"""What the load generator expects to receive: sizes and checksums of every message.

A manifest is JSON::

    {"version": 1,
     "mailboxes": {"small": [[size, crc], ...], ...},
     "users": {"alice": "small", ...}}

``size`` is the message's octet count as POP3 sends it (CRLF line ends, before stuffing),
which LIST and STAT must report; ``crc`` is the CRC-32 of the body exactly as it must come
over the wire (stuffed), see :func:`wire_entry`.  Servers may list a maildrop in any order
and name messages with any UIDL, so a mailbox is a multiset of ``(size, crc)``.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


def to_wire(message: bytes) -> bytes:
    """Return ``message`` with CRLF line ends and a final CRLF: the form LIST counts."""
    text = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def stuff(wire: bytes) -> bytes:
    """Byte-stuff a CRLF message (RFC 1939 §3), first line included."""
    return (b"\r\n" + wire).replace(b"\r\n.", b"\r\n..")[2:]


def wire_entry(message: bytes) -> tuple[int, int]:
    """Return ``(size, crc)`` of a stored message (LF or CRLF line ends) for the manifest."""
    wire = to_wire(message)
    return len(wire), zlib.crc32(stuff(wire))


@dataclass
class Manifest:
    """Expected maildrop contents per user."""

    mailboxes: dict[str, Counter[tuple[int, int]]] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)

    def expected(self, user: str) -> Counter[tuple[int, int]] | None:
        """The multiset of ``(size, crc)`` of ``user``'s maildrop, or None if unknown."""
        box = self.users.get(user)
        return None if box is None else self.mailboxes.get(box)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read a manifest file."""
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != 1:
            raise ValueError(f"{path}: not a version 1 manifest")
        boxes = {
            name: Counter((int(s), int(c)) for s, c in entries)
            for name, entries in data["mailboxes"].items()
        }
        users = {str(u): str(b) for u, b in data["users"].items()}
        missing = set(users.values()) - set(boxes)
        if missing:
            raise ValueError(f"{path}: users refer to unknown mailboxes {sorted(missing)[:3]}")
        return cls(boxes, users)

    def dump(self, path: Path) -> None:
        """Write the manifest to ``path``."""
        data = {
            "version": 1,
            "mailboxes": {
                name: [[s, c] for (s, c), k in sorted(box.items()) for _ in range(k)]
                for name, box in self.mailboxes.items()
            },
            "users": self.users,
        }
        path.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
