"""curl (libcurl's POP3 client) against pop3d: RETR, LIST, UIDL, DELE."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest

from pop3d.auth.schemes import hash_password
from pop3d.testing import Pop3TestServer

from .messages import TRICKY, wire

pytestmark = [
    pytest.mark.client,
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]


def curl(*args: str) -> bytes:
    """Run curl with a bounded time; return its stdout (failing on a non-zero exit)."""
    done = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def loaded(pop3_server: Pop3TestServer) -> Pop3TestServer:
    for data in TRICKY.values():
        pop3_server.add_message("alice", data)
    return pop3_server


def url(srv: Pop3TestServer, path: str = "") -> str:
    return f"pop3://alice:secret@{srv.host}:{srv.port}/{path}"


def test_curl_retrieves_each_message_exactly(loaded: Pop3TestServer) -> None:
    """curl pop3://user:pass@host:port/N writes message N un-stuffed, CRLF, byte for byte."""
    for n, data in enumerate(TRICKY.values(), start=1):
        assert curl(url(loaded, str(n))) == wire(data), n


def test_curl_lists_sizes(loaded: Pop3TestServer) -> None:
    """curl's listing (LIST) shows every message with its wire size."""
    expected = b"".join(b"%d %d\r\n" % (n, len(wire(d))) for n, d in enumerate(TRICKY.values(), 1))
    assert curl(url(loaded)) == expected


def test_curl_uidl(loaded: Pop3TestServer) -> None:
    """curl -X UIDL lists one stable unique-id per message, the same on every call."""
    first = curl("-X", "UIDL", url(loaded))
    rows = first.splitlines()
    assert [r.split(b" ")[0] for r in rows] == [b"%d" % n for n in range(1, len(TRICKY) + 1)]
    assert len({r.split(b" ")[1] for r in rows}) == len(TRICKY)
    assert curl("-X", "UIDL", url(loaded)) == first


def test_curl_dele_removes_the_message(loaded: Pop3TestServer) -> None:
    """curl -X DELE -I deletes message N (curl QUITs, so UPDATE runs) and nothing else."""
    curl("-X", "DELE", "-I", url(loaded, "2"))
    expected = [d for n, d in enumerate(TRICKY.values(), 1) if n != 2]
    assert loaded.messages("alice") == expected
    assert curl(url(loaded, "2")) == wire(expected[1])


def test_curl_wrong_password_fails(loaded: Pop3TestServer) -> None:
    """A wrong password makes curl fail with its login-denied error (67)."""
    done = subprocess.run(
        ["curl", "--silent", "--max-time", "20", f"pop3://alice:nope@{loaded.host}:{loaded.port}/1"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 67
    assert done.stdout == b""


@pytest.mark.parametrize("scheme", ["ARGON2ID", "SHA512-CRYPT"])
def test_curl_logs_in_users_with_hashed_passwords(
    pop3_server_factory: Callable[..., Pop3TestServer], scheme: str
) -> None:
    """With the default mechanisms curl logs in a user whose password is a one-way hash.

    curl picks CRAM-MD5 or SCRAM whenever CAPA offers them and never falls back, and a
    hashed password cannot answer them: so they are not offered by default.
    """
    srv = pop3_server_factory(users={"zoe": hash_password(scheme, b"hashed pw")})
    srv.add_message("zoe", b"Subject: hi\r\n\r\nhello\r\n")
    assert curl(f"pop3://zoe:hashed%20pw@{srv.host}:{srv.port}/1") == (
        b"Subject: hi\r\n\r\nhello\r\n"
    )
