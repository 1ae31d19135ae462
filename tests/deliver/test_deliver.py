"""``pop3d deliver``: exit codes MTAs act on, streaming, and what ends up in the maildrop.

Deliveries run in-process through ``pop3d.cli.main([...])`` and as a subprocess
(``python -m pop3d deliver``); the result is read back through the store's Maildrop and
compared byte for byte with the wire form of what was sent.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3d.cli import main
from pop3d.errors import TemporaryBackendError
from pop3d.protocol.values import Principal
from pop3d.storage.maildir import MaildirStore
from pop3d.storage.mbox import MboxStore
from pop3d.storage.wire import to_wire

USERS = "alice:{PLAIN}secret\nbob:{PLAIN}x::::::quota_rule=*:storage=100\n"
MESSAGE = b"From: bob@example.org\nSubject: hi\n\nFrom the start\n.dot\n"


class Site:
    """A config file, a passwd-file and a store, as an operator sets them up."""

    def __init__(self, root: Path, kind: str, extra: str = "") -> None:
        self.root = root
        self.kind = kind
        (root / "users").write_text(USERS)
        template = "mail/%u/Maildir" if kind == "maildir" else "mbox/%u"
        self.config = root / "pop3d.toml"
        self.config.write_text(
            f'[auth]\npasswd_file = "users"\n[storage]\n{kind} = "{template}"\n{extra}'
        )
        self.store: MaildirStore | MboxStore = (
            MaildirStore(template, root) if kind == "maildir" else MboxStore(template, root)
        )

    def deliver(self, *args: str) -> int:
        return main(["deliver", "--config", str(self.config), *args])

    def run(self, *args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "pop3d", "deliver", "--config", str(self.config), *args],
            input=data,
            capture_output=True,
            check=False,
            timeout=120,
        )

    def messages(self, name: str = "alice") -> list[bytes]:
        async def go() -> list[bytes]:
            md = await self.store.open(Principal(name))
            try:
                return [b"".join([c async for c in md.read(i.uid)]) for i in md.listing()]
            finally:
                await md.close()

        try:
            return asyncio.run(go())
        except TemporaryBackendError:
            return []

    def files(self) -> list[Path]:
        """Every file under the site's mail folders."""
        return sorted(
            p for folder in ("mail", "mbox") for p in (self.root / folder).rglob("*") if p.is_file()
        )


@pytest.fixture(params=["maildir", "mbox"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    return Site(tmp_path, request.param)


@pytest.fixture
def message_file(tmp_path: Path) -> Path:
    path = tmp_path / "message.eml"
    path.write_bytes(MESSAGE)
    return path


# ---------------------------------------------------------------------------- success


def test_in_process_delivery_reads_back_exactly(site: Site, message_file: Path) -> None:
    """main(['deliver', ...]) exits 0 and the maildrop returns the message's wire form."""
    assert site.deliver("alice", str(message_file)) == 0
    assert site.messages() == [to_wire(MESSAGE)]


def test_subprocess_delivery_from_stdin(site: Site) -> None:
    """`python -m pop3d deliver USER` reads stdin and exits 0."""
    done = site.run("alice", data=MESSAGE)
    assert done.returncode == 0, done.stderr
    assert site.messages() == [to_wire(MESSAGE)]


def test_envelope_from_line_is_dropped(site: Site) -> None:
    """A leading mbox 'From ' line (procmail style) is not part of the message."""
    done = site.run("alice", data=b"From carol@example.net Thu Nov 14 22:13:20 2023\n" + MESSAGE)
    assert done.returncode == 0, done.stderr
    assert site.messages() == [to_wire(MESSAGE)]
    if site.kind == "mbox":
        assert (site.root / "mbox/alice").read_bytes().startswith(b"From carol@example.net ")


def test_sender_option_names_the_mbox_from_line(tmp_path: Path) -> None:
    """-f SENDER is the envelope sender of the mbox From_ line."""
    site = Site(tmp_path, "mbox")
    assert site.run("-f", "dave@example.com", "alice", data=MESSAGE).returncode == 0
    assert (tmp_path / "mbox/alice").read_bytes().startswith(b"From dave@example.com ")


@pytest.mark.parametrize(
    "message",
    [b"no header block, just a line\n", b"A: 1\n\n\x00\x00nul\x00\xff\n", b"", b"no newline"],
    ids=["no-headers", "nul", "empty", "no-final-newline"],
)
def test_odd_messages_arrive_intact(site: Site, tmp_path: Path, message: bytes) -> None:
    """Messages without headers, with NUL bytes, empty or unterminated arrive as sent."""
    path = tmp_path / "odd"
    path.write_bytes(message)
    assert site.deliver("alice", str(path)) == 0
    assert site.messages() == [to_wire(message)]


def test_delivery_during_an_open_session_is_unseen_and_kept(site: Site) -> None:
    """A delivery while the user is logged in is not in the session and survives its UPDATE."""
    assert site.run("alice", data=b"Subject: old\n\n").returncode == 0

    async def session() -> None:
        md = await site.store.open(Principal("alice"))
        try:
            listing = list(md.listing())
            done = await asyncio.to_thread(site.run, "alice", data=b"Subject: new\n\n")
            assert done.returncode == 0, done.stderr
            assert list(md.listing()) == listing
            await md.commit([i.uid for i in listing])
        finally:
            await md.close()

    asyncio.run(session())
    assert site.messages() == [b"Subject: new\r\n\r\n"]


# ---------------------------------------------------------------------------- exit codes


def test_local_at_domain_falls_back_to_local(site: Site, message_file: Path) -> None:
    """USER local@domain is that user if it exists, else the user local (as for LMTP)."""
    assert site.deliver("alice@example.com", str(message_file)) == 0
    assert site.messages() == [to_wire(MESSAGE)]
    assert site.deliver("nobody@example.com", str(message_file)) == 67


def test_unknown_user_is_67(site: Site, message_file: Path) -> None:
    """A user not in the passwd-file exits 67 (EX_NOUSER): the MTA bounces."""
    assert site.deliver("nobody", str(message_file)) == 67
    assert site.run("nobody", data=MESSAGE).returncode == 67
    assert site.files() == []


@pytest.mark.parametrize(
    "name", ["../alice", "alice/../../x", "..", "a/b", "/etc/passwd", "", "..@x", "../alice@x"]
)
def test_path_like_user_names_never_leave_the_mail_root(
    site: Site, message_file: Path, name: str
) -> None:
    """A user name with '/' or '..' is no user (67) and writes nothing anywhere."""
    before = sorted(site.root.parent.rglob("*"))
    assert site.deliver(name, str(message_file)) == 67
    assert sorted(site.root.parent.rglob("*")) == before


@pytest.mark.parametrize(("extra", "status"), [("", 75), ("quota_exit = 77\n", 77)])
def test_over_quota_is_75_or_77(tmp_path: Path, extra: str, status: int) -> None:
    """Over quota exits 75 (retry) or 77 (bounce) per [storage] quota_exit; nothing stored."""
    site = Site(tmp_path, "mbox", extra)
    done = site.run("bob", data=b"Subject: big\n\n" + b"x" * 200 + b"\n")
    assert done.returncode == status
    assert b"over quota" in done.stderr
    assert site.messages("bob") == []


def test_usage_errors_are_64(site: Site) -> None:
    """Missing arguments exit 64 (EX_USAGE), not argparse's 2."""
    with pytest.raises(SystemExit) as exc:
        main(["deliver", "--config", str(site.config)])
    assert exc.value.code == 64
    assert site.run().returncode == 64


def test_config_errors_are_78(tmp_path: Path, message_file: Path) -> None:
    """A missing or invalid config, or one without a passwd-file, exits 78 (EX_CONFIG)."""
    assert main(["deliver", "--config", str(tmp_path / "nope.toml"), "alice"]) == 78
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage]\nmaildir = 1\n")
    assert main(["deliver", "--config", str(bad), "alice", str(message_file)]) == 78
    nopw = tmp_path / "nopw.toml"
    nopw.write_text('[storage]\nmbox = "mbox/%u"\n')
    assert main(["deliver", "--config", str(nopw), "alice", str(message_file)]) == 78


def test_unreadable_message_file_is_66(site: Site, tmp_path: Path) -> None:
    """A MESSAGE_FILE that cannot be opened exits 66 (EX_NOINPUT)."""
    assert site.deliver("alice", str(tmp_path / "missing.eml")) == 66


def limited_delivery(site: Site, data: bytes, limit: int) -> subprocess.CompletedProcess[bytes]:
    """``pop3d deliver`` in a process whose files may not grow past ``limit`` octets."""
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from pop3d.cli import main
        sys.exit(main(["deliver", "--config", {str(site.config)!r}, "alice"]))
    """)
    return subprocess.run(
        [sys.executable, "-c", code], input=data, capture_output=True, check=False, timeout=120
    )


def test_disk_full_is_75_and_leaves_no_partial_message(site: Site) -> None:
    """A delivery that runs out of space (RLIMIT_FSIZE) exits 75 and leaves nothing behind."""
    assert site.run("alice", data=b"Subject: first\n\n").returncode == 0
    before = {p: p.read_bytes() for p in site.files()}
    done = limited_delivery(site, b"Subject: big\n\n" + b"y" * 99_999 + b"\n", 50_000)
    assert done.returncode == 75, done.stderr
    assert {p: p.read_bytes() for p in site.files()} == before
    assert site.messages() == [b"Subject: first\r\n\r\n"]


# ---------------------------------------------------------------------------- memory

RSS_PROBE = textwrap.dedent("""
    import resource, sys
    from pop3d.cli import main
    import pop3d.deliver, pop3d.serve, pop3d.storage.maildir, pop3d.storage.mbox
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status = main(["deliver", "--config", sys.argv[1], "alice", *sys.argv[2:]])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(status, before, after, file=sys.stderr)
""")

BIG = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def big_message(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 100 MiB message with ordinary 77-octet lines."""
    path = tmp_path_factory.mktemp("big") / "big.eml"
    line = b"0123456789" * 7 + b"abcdef\n"
    with path.open("wb") as f:
        f.write(b"Subject: big\n\n")
        f.write(line * (BIG // len(line)))
    yield path
    path.unlink()


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_100_mib_message_streams_in_bounded_memory(site: Site, big_message: Path, via: str) -> None:
    """A 100 MiB delivery grows peak RSS by far less than the message (< 32 MiB)."""
    args = [str(big_message)] if via == "file" else []
    with big_message.open("rb") as stdin:
        done = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, str(site.config), *args],
            stdin=stdin, capture_output=True, check=False, timeout=300,
        )  # fmt: skip
    status, before, after = (int(x) for x in done.stderr.split()[-3:])
    assert status == 0, done.stderr
    growth_kib = after - before
    print(f"{site.kind} via {via}: peak RSS grew {growth_kib} KiB for 100 MiB")
    assert growth_kib < 32 * 1024
    [info] = asyncio.run(_listing(site))
    assert info == big_message.stat().st_size + BIG // 77 + 2  # LF -> CRLF, header lines


async def _listing(site: Site) -> list[int]:
    md = await site.store.open(Principal("alice"))
    try:
        return [i.size for i in md.listing()]
    finally:
        await md.close()
