"""``pop3d import``: Maildir and mbox maildrops into PostgreSQL, UIDLs kept, run twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg

from pop3d.cli import main
from pop3d.cluster_lock import LeaseManager
from pop3d.database import Database
from pop3d.storage.maildir import MaildirStore
from pop3d.storage.mbox import MboxStore
from pop3d.storage.postgresql import PostgresStore
from pop3d.storage.wire import to_wire
from tests.storage.contract import read_all, user

MESSAGES = [b"Subject: one\n\nfirst\n", b"Subject: two\r\n\r\n.dot\r\nsecond", b""]


def _config(tmp_path: Path, url: str) -> Path:
    cfg = tmp_path / "pop3d.toml"
    cfg.write_text(f'[storage]\nbackend = "postgresql"\n[database]\nurl = "{url}"\n')
    return cfg


async def _listing(store: object, name: str) -> list[tuple[str, int, bytes]]:
    md = await store.open(user(name))  # type: ignore[attr-defined]
    try:
        return [(i.uid, i.size, await read_all(md, i.uid)) for i in md.listing()]
    finally:
        await md.close()


def _import(cfg: Path, *args: str) -> int:
    return main(["import", "--config", str(cfg), *args])


def _pg_listing(database: Database, name: str) -> list[tuple[str, int, bytes]]:
    store = PostgresStore(database, LeaseManager(database, 5.0))
    return asyncio.run(_listing(store, name))


def test_maildir_import_keeps_uidls_and_is_idempotent(
    tmp_path: Path, database: Database, monkeypatch: object
) -> None:
    """Every message arrives once with its Maildir UIDL and wire form, however often run."""
    source = MaildirStore("mail/%u/Maildir", tmp_path)
    for m in MESSAGES:
        asyncio.run(source.deliver(user("alice"), _chunks(m)))
    before = asyncio.run(_listing(source, "alice"))
    cfg = _config(tmp_path, database.config.url)
    monkeypatch.chdir(tmp_path)  # type: ignore[attr-defined]
    assert _import(cfg, "--maildir", "mail/%u/Maildir", "alice") == 0
    assert _import(cfg, "--maildir", "mail/%u/Maildir", "alice") == 0
    after = _pg_listing(database, "alice")
    assert after == before
    assert [body for _, _, body in after] == [to_wire(m) for m in MESSAGES]
    assert asyncio.run(_listing(source, "alice")) == before  # the source is untouched


def test_interrupted_import_resumes(tmp_path: Path, database: Database,
                                    monkeypatch: object) -> None:
    """An import that copied part of a mbox completes the rest, duplicating nothing."""
    source = MboxStore("mbox/%u", tmp_path)
    for m in MESSAGES:
        asyncio.run(source.deliver(user("bob"), _chunks(m)))
    before = asyncio.run(_listing(source, "bob"))
    first_uid = before[0][0]
    store = PostgresStore(database, LeaseManager(database, 5.0))

    async def partial() -> None:  # as if the first run died after one message
        await store.deliver(user("bob"), _chunks(MESSAGES[0]), uidl=first_uid)

    asyncio.run(partial())
    monkeypatch.chdir(tmp_path)  # type: ignore[attr-defined]
    assert _import(_config(tmp_path, database.config.url), "--mbox", "mbox/%u", "bob") == 0
    assert [(u, s) for u, s, _ in _pg_listing(database, "bob")] == [(u, s) for u, s, _ in before]
    with psycopg.connect(database.config.url) as conn:
        row = conn.execute("SELECT count(*) FROM messages WHERE mailbox = 'bob'").fetchone()
    assert row == (3,)


async def _chunks(data: bytes):  # type: ignore[no-untyped-def]
    yield data


def test_mailbox_stat_on_postgresql(tmp_path: Path, database: Database) -> None:
    """`pop3d mailbox stat` counts a PostgreSQL maildrop; a missing one is empty."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    with psycopg.connect(database.config.url, autocommit=True) as conn:
        conn.execute("INSERT INTO users (username, password) VALUES ('fay', '{PLAIN}x'), "
                     "('gus', '{PLAIN}x')")
    cfg = tmp_path / "pop3d.toml"
    cfg.write_text(f'[auth]\nbackend = "postgresql"\n[storage]\nbackend = "postgresql"\n'
                   f'[database]\nurl = "{database.config.url}"\n')
    store = PostgresStore(database, LeaseManager(database, 5.0))
    asyncio.run(store.deliver(user("fay"), _chunks(b"a\n")))

    def stat(name: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "pop3d", "mailbox", "stat", "--config", str(cfg), name],
            capture_output=True, text=True, check=False, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "messages: 1" in stat("fay")
    assert "no maildrop yet" in stat("gus")


def test_sql_user_add_without_terminal_or_password_stdin(
    tmp_path: Path, database: Database
) -> None:
    """`pop3d user add` on the users table, no terminal and no --password-stdin: the
    passwd-file's clear message (it once fell through getpass to a traceback), no user."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    cfg = tmp_path / "pop3d.toml"
    cfg.write_text(f'[auth]\nbackend = "postgresql"\n[storage]\nbackend = "postgresql"\n'
                   f'[database]\nurl = "{database.config.url}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "pop3d", "user", "add", "--config", str(cfg), "hal"],
        capture_output=True, text=True, check=False, timeout=60, input="",
        start_new_session=True,  # no controlling terminal, as under cron or CI
    )
    assert done.returncode == 1, done.stderr
    assert "--password-stdin" in done.stderr
    assert "Traceback" not in done.stderr
    with psycopg.connect(database.config.url, autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM users WHERE username = 'hal'").fetchone() is None
