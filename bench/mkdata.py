"""Benchmark data: users, Maildirs of realistic messages, a passwd-file and the manifest.

Messages are stored as an MTA writes them (LF line ends, Postfix/Dovecot style file names,
some with ``,S=``/``,W=`` sizes) and contain what trips up POP3 servers: lines starting with
``.``, a lone ``.`` line, ``..`` lines, long base64 blocks.  Identical mailboxes share their
files through hard links, so 10,000 users cost little disk and time.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pop3d.bench.manifest import Manifest, to_wire, wire_entry

_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when "
    "mailbox server message delivery queue report invoice meeting schedule attached please "
    "review thanks regards update project budget quarter draft version release notes"
)
WORDS = _TEXT.split()

DOT_LINES = (b".", b"..", b".signature follows", b"...and so on", b". leading dot and space")


def _text_lines(rng: random.Random, n: int) -> list[bytes]:
    lines = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            lines.append(rng.choice(DOT_LINES))
        elif r < 0.12:
            lines.append(b"")
        else:
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 13))]
            lines.append(" ".join(words).encode())
    return lines


def make_message(rng: random.Random, target: int, serial: int) -> bytes:
    """A plausible message of about ``target`` octets on the wire (LF line ends)."""
    head = [
        b"Return-Path: <sender%d@example.org>" % serial,
        b"Received: from mx.example.org (mx.example.org [192.0.2.7])",
        b"\tby mail.example.net (Postfix) with ESMTPS id 4Xy%05d" % serial,
        b"\tfor <rcpt@example.net>; Tue, 26 Nov 2024 14:%02d:00 +0000" % (serial % 60),
        b"From: Sender %d <sender%d@example.org>" % (serial, serial),
        b"To: rcpt@example.net",
        b"Subject: " + " ".join(rng.choice(WORDS) for _ in range(5)).encode(),
        b"Date: Tue, 26 Nov 2024 14:%02d:00 +0000" % (serial % 60),
        b"Message-ID: <%d.%d@example.org>" % (serial, rng.randrange(1 << 30)),
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=utf-8",
        b"",
    ]
    lines = head + _text_lines(rng, 8)
    size = sum(len(x) + 2 for x in lines)
    while size < target - 80:
        more = _text_lines(rng, 1)[0]
        lines.append(more)
        size += len(more) + 2
    # pad the last line so the wire size is exactly ``target`` where possible
    pad = target - size - 2
    if pad > 0:
        lines.append(b"x" * pad)
    return b"\n".join(lines) + b"\n"


def make_large(rng: random.Random, target: int) -> bytes:
    """A ~``target``-octet message: text, then a base64-looking attachment, dot lines mixed in."""
    head = make_message(rng, 2000, 999_999).rstrip(b"\n").split(b"\n")
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    block = [bytes(rng.choice(alphabet) for _ in range(76)) for _ in range(512)]
    lines = [*head, b"", b"--attachment follows--"]
    size = sum(len(x) + 2 for x in lines)
    i = 0
    while size < target:
        line = block[i % len(block)] if i % 997 else b"." + block[i % len(block)][:40]
        lines.append(line)
        size += len(line) + 2
        i += 1
    return b"\n".join(lines) + b"\n"


def make_dotty(rng: random.Random, target: int, share: float) -> bytes:
    """A ~``target``-octet plain-text message, ``share`` of its lines starting with ``.``.

    Quoted logs, ASCII art, signatures: prose lines of 40-76 octets, a ``share`` of them
    led by a dot (``.``, ``..``, ``.foo``); ``share`` 1 makes every line start with one.
    """
    head = make_message(rng, 2000, 999_998).rstrip(b"\n").split(b"\n")
    pool = []
    for _ in range(4096):
        words = [rng.choice(WORDS) for _ in range(rng.randint(7, 12))]
        pool.append(" ".join(words).encode()[:76])
    leads = (b".", b"..", b". ", b"...")
    lines = [*head, b""]
    size = sum(len(x) + 2 for x in lines)
    i = 0
    while size < target:
        line = pool[i % len(pool)]
        if rng.random() < share:
            line = leads[i % len(leads)] + line[: 76 - 3]
        if i % 701 == 0:
            line = b"."  # a lone dot, the terminator's look-alike
        lines.append(line)
        size += len(line) + 2
        i += 1
    return b"\n".join(lines) + b"\n"


@dataclass
class Dataset:
    """What :func:`build` made."""

    root: Path
    users: dict[str, str] = field(default_factory=dict)  # user -> passwd-file password field
    groups: dict[str, list[str]] = field(default_factory=dict)
    manifest: Manifest = field(default_factory=Manifest)


#: Maildirs one message file is linked into: ext4 allows 65,000 links to a file, and
#: ``run.py`` links every server's copy of the tree again (10,000 idle users times eight
#: servers with two ``--baseline`` columns went over).
LINKS_PER_FILE = 2000


class _Pool:
    """Message files written once and hard-linked into every Maildir that holds them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def add(self, message: bytes) -> tuple[Path, str]:
        self.n += 1
        wire = len(to_wire(message))
        base = f"1732630{self.n:06d}.M{self.n * 7919 % 999983}P{4242 + self.n}Q{self.n}.bench"
        form = self.n % 3
        name = base if form == 0 else f"{base},S={len(message)}"
        if form == 2:
            name += f",W={wire}"
        path = self.root / name
        path.write_bytes(message)
        return path, name

    def again(self, src: Path, name: str) -> tuple[Path, str]:
        """A fresh file with ``src``'s name and bytes, for the next :data:`LINKS_PER_FILE`."""
        self.n += 1
        folder = self.root / f"again{self.n}"
        folder.mkdir()
        shutil.copyfile(src, folder / name)
        return folder / name, name


def _maildir(mail: Path, user: str) -> Path:
    md = mail / user / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    return md


def build(root: Path, *, login_users: int, fetch_users: int, large_users: int,
          idle_users: int, storm_users: int, storm_hash: str, large_size: int,
          dots_users: int = 0) -> Dataset:
    """Create ``root/mail/<user>/Maildir`` trees, ``root/users`` and ``root/manifest.json``."""
    rng = random.Random(1939)
    ds = Dataset(root)
    mail = root / "mail"
    pool = _Pool(root / "pool")

    def box(name: str, messages: list[bytes]) -> list[tuple[Path, str]]:
        files = [pool.add(m) for m in messages]
        ds.manifest.mailboxes[name] = Counter(wire_entry(m) for m in messages)
        return files

    small = box("small", [make_message(rng, rng.choice((1500, 3000, 6000, 12000)), i)
                          for i in range(5)])
    fetch = box("fetch100", [make_message(rng, 4096, 100 + i) for i in range(100)])
    one = box("one", [make_message(rng, 2500, 7)])
    large = box("large", [make_large(rng, large_size)])
    # text a client cannot choose: 11 % of the lines led by a dot, and every line
    dots = box("dots", [make_dotty(rng, large_size, 0.11)]) if dots_users else []
    alldots = box("alldots", [make_dotty(rng, large_size, 1.0)]) if dots_users else []

    def group(prefix: str, count: int, files: list[tuple[Path, str]], boxname: str,
              password: str | None = None) -> None:
        names = [f"{prefix}{i}" for i in range(1, count + 1)]
        ds.groups[prefix] = names
        for k, user in enumerate(names):
            if k and k % LINKS_PER_FILE == 0:
                files = [pool.again(src, name) for src, name in files]
            md = _maildir(mail, user)
            for src, name in files:
                os.link(src, md / "new" / name)
            ds.manifest.users[user] = boxname
            ds.users[user] = password or "{PLAIN}pw-" + user

    group("login", login_users, small, "small")
    group("fetch", fetch_users, fetch, "fetch100")
    group("large", large_users, large, "large")
    if dots_users:
        group("dots", dots_users, dots, "dots")
        group("alldots", dots_users, alldots, "alldots")
    # idle: one more user than connections, the last one is the NOOP probe's
    group("idle", idle_users + 1, one, "one")
    group("storm", storm_users + 1, small, "small", password=storm_hash)
    lines = [f"{u}:{p}::::::" for u, p in ds.users.items()]
    (root / "users").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds.manifest.dump(root / "manifest.json")
    return ds


_MBOX_FROM = b"From MAILER-DAEMON@example.org Tue Nov 26 14:00:00 2024\n"


def mbox_file(messages: list[bytes]) -> bytes:
    """An mbox as an MDA appends: a From_ line per message and an empty line after it.

    The bench's messages hold no ``From `` line to quote (mboxo and mboxrd agree on them):
    asserted, so that both servers must return each message's bytes unchanged.
    """
    out = bytearray()
    for m in messages:
        if m.startswith(b"From ") or b"\nFrom " in m or b"\n>From " in m:
            raise ValueError("a bench message needs From_ quoting")
        out += _MBOX_FROM + m + (b"" if m.endswith(b"\n") else b"\n") + b"\n"
    return bytes(out)


def build_mbox(root: Path, *, login_users: int, fetch_users: int, large_users: int,
               large_size: int = 20 << 20) -> Dataset:
    """``root/mail/<user>/mbox`` for the login, fetch and large groups, plus users/manifest.

    The messages are :func:`build`'s (same seed, same order).  Every user gets a file of
    its own, not a hard link: Dovecot writes its X-UID/X-IMAPbase headers into the file.
    """
    rng = random.Random(1939)
    ds = Dataset(root)
    mail = root / "mail"
    small = [make_message(rng, rng.choice((1500, 3000, 6000, 12000)), i) for i in range(5)]
    fetch = [make_message(rng, 4096, 100 + i) for i in range(100)]
    make_message(rng, 2500, 7)  # build's "one" box, drawn to keep the random sequence
    large = [make_large(rng, large_size)]
    for prefix, count, messages, boxname in (("login", login_users, small, "small"),
                                             ("fetch", fetch_users, fetch, "fetch100"),
                                             ("large", large_users, large, "large")):
        ds.manifest.mailboxes[boxname] = Counter(wire_entry(m) for m in messages)
        data = mbox_file(messages)
        names = [f"{prefix}{i}" for i in range(1, count + 1)]
        ds.groups[prefix] = names
        for user in names:
            (mail / user).mkdir(parents=True, exist_ok=True)
            (mail / user / "mbox").write_bytes(data)
            ds.manifest.users[user] = boxname
            ds.users[user] = "{PLAIN}pw-" + user
    lines = [f"{u}:{p}::::::" for u, p in ds.users.items()]
    (root / "users").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds.manifest.dump(root / "manifest.json")
    return ds
