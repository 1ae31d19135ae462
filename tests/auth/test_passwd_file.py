"""The Dovecot passwd-file backend: parsing, reload, timing-safe refusals, the writer."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from pop3d.auth import passwd_file, schemes
from pop3d.auth.passwd_file import PasswdFileAuthenticator, list_users, update_user
from pop3d.auth.verdict import Refused, Unfinished
from pop3d.errors import ConfigError, TemporaryBackendError, WouldWait
from pop3d.protocol.values import Principal

from .contract import SECRET_HASHES, AuthenticatorContract

ARGON2ID_SECRET = (
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$ZxOUnUAqAF0NmJEOLaExcg$yTdRvT2qzlhbqsCM8oARYO7cqg9u"
    "8CBlh2Bx3GMq4rw"
)

SAMPLE = f"""\
# users of example.org
alice:{{PLAIN}}alice-pass:1000:1000::/home/alice::userdb_quota_rule=*:storage=100M quota=1G

bob@example.org:{SECRET_HASHES["ssha512"]}
carol:{SECRET_HASHES["sha512crypt"]}:1001:1001:Carol:/home/carol:/bin/sh:userdb_mail=maildir:~/M
   \t
dave:::::::nopassword
erin:{{PLAIN}}erin-pass::::::nologin reason=moved
frank:
crlf:{{PLAIN}}crlf-pass\r
no colon here
bad/name:{{PLAIN}}x
 lead:{{PLAIN}}x
alice:{{PLAIN}}second-alice
weird:{{NO-SUCH}}data
"""


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def auth_for(
    tmp_path: Path, text: str | bytes = SAMPLE, check_interval: float = 1.0
) -> PasswdFileAuthenticator:
    return PasswdFileAuthenticator(write(tmp_path / "users", text), check_interval=check_interval)


class TestPasswdFileContract(AuthenticatorContract):
    """The shared Authenticator contract, on a passwd-file."""

    def make(self, tmp_path: Path, users: Mapping[str, str]) -> PasswdFileAuthenticator:
        text = "".join(f"{name}:{stored}\n" for name, stored in users.items())
        return auth_for(tmp_path, text)


# ------------------------------------------------------------------ parsing


def test_fields_and_extras_become_attributes(tmp_path: Path) -> None:
    """uid, gid, home and extra fields (userdb_ stripped, ':' allowed) are attributes."""
    auth = auth_for(tmp_path)
    alice = asyncio.run(auth.lookup("alice"))
    assert alice == Principal(
        "alice",
        {"uid": "1000", "gid": "1000", "home": "/home/alice",
         "quota_rule": "*:storage=100M", "quota": "1G"},
    )
    carol = asyncio.run(auth.lookup("carol"))
    assert carol is not None
    assert carol.attributes["mail"] == "maildir:~/M"
    assert carol.attributes["home"] == "/home/carol"
    assert "Carol" not in carol.attributes.values()  # gecos is unused, as in Dovecot


def test_userdb_prefix_wins_over_plain_key(tmp_path: Path) -> None:
    """userdb_quota overrides quota, whatever the order on the line."""
    auth = auth_for(tmp_path, "u:{PLAIN}p::::::userdb_quota=1M quota=2M\n")
    principal = asyncio.run(auth.lookup("u"))
    assert principal is not None
    assert principal.attributes["quota"] == "1M"


def test_comments_blank_and_crlf_lines(tmp_path: Path) -> None:
    """Comments and blank lines are skipped; a CRLF line end is not part of the password."""
    auth = auth_for(tmp_path)
    assert asyncio.run(auth.verify_password("crlf", b"crlf-pass")) is not None
    assert asyncio.run(auth.lookup("# users of example.org")) is None


def test_malformed_lines_skipped_with_warning_not_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Malformed lines are skipped with a logged line number, never their content."""
    caplog.set_level(logging.DEBUG)
    text = SAMPLE + "\xff-not-utf8:{PLAIN}hunter2\n=:{PLAIN}hunter3::::::=novalue\n"
    auth = auth_for(tmp_path, text.encode("latin-1", "replace"))
    assert asyncio.run(auth.lookup("bad/name")) is None
    assert asyncio.run(auth.lookup("lead")) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("line 11" in w for w in warnings)  # "no colon here"
    assert "hunter" not in caplog.text
    assert "alice-pass" not in caplog.text
    assert "second-alice" not in caplog.text
    assert "no colon" not in caplog.text


def test_malformed_extra_field_skips_the_line(tmp_path: Path) -> None:
    """A line whose extra fields cannot be parsed is skipped, not half-applied."""
    auth = auth_for(tmp_path, "u:{PLAIN}p::::::=x\nv:{PLAIN}p\n")
    assert asyncio.run(auth.lookup("u")) is None
    assert asyncio.run(auth.lookup("v")) is not None


def test_first_entry_of_a_name_wins(tmp_path: Path) -> None:
    """As in Dovecot, a duplicate user line is ignored (with a warning)."""
    auth = auth_for(tmp_path)
    assert asyncio.run(auth.verify_password("alice", b"alice-pass")) is not None
    assert asyncio.run(auth.verify_password("alice", b"second-alice")) is None


def test_unsupported_scheme_warns_by_name_and_never_matches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown scheme is logged (name only) at load and refuses every password."""
    caplog.set_level(logging.WARNING)
    auth = auth_for(tmp_path)
    assert "{NO-SUCH}" in caplog.text
    assert "data" not in caplog.text.split("{NO-SUCH}")[1].split("\n")[0]
    assert asyncio.run(auth.verify_password("weird", b"data")) is None
    assert asyncio.run(auth.verify_password("weird", b"{NO-SUCH}data")) is None


def test_empty_password_never_matches(tmp_path: Path) -> None:
    """An empty password field without nopassword refuses every password, even empty."""
    auth = auth_for(tmp_path)
    assert asyncio.run(auth.verify_password("frank", b"")) is None
    assert asyncio.run(auth.verify_password("frank", b"x")) is None
    assert asyncio.run(auth.lookup("frank")) is not None


def test_nopassword_accepts_any_password(tmp_path: Path) -> None:
    """Dovecot's nopassword (with an empty password field) lets any password in."""
    auth = auth_for(tmp_path)
    assert asyncio.run(auth.verify_password("dave", b"anything")) is not None
    assert asyncio.run(auth.secret_for("dave", "PLAIN")) is None


def test_nopassword_with_a_password_still_checks_it(tmp_path: Path) -> None:
    """nopassword only applies to an empty password field."""
    auth = auth_for(tmp_path, "u:{PLAIN}p::::::nopassword\n")
    assert asyncio.run(auth.verify_password("u", b"p")) is not None
    assert asyncio.run(auth.verify_password("u", b"x")) is None


def test_nologin_refuses_the_right_password(tmp_path: Path) -> None:
    """nologin refuses the login even with the right password, and hides secrets."""
    auth = auth_for(tmp_path)
    assert asyncio.run(auth.verify_password("erin", b"erin-pass")) is None
    assert asyncio.run(auth.secret_for("erin", "PLAIN")) is None
    assert asyncio.run(auth.lookup("erin")) is not None  # mail still arrives


# ------------------------------------------------------------------ refusals


def test_every_refusal_verifies_one_hash_of_each_cost_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown user, wrong password of any scheme, nologin: one hash of each class each."""
    calls: list[str] = []
    real_verify = schemes.verify

    def verify(stored: str, password: bytes) -> bool:
        calls.append(schemes.cost_class(stored))
        return real_verify(stored, password)

    monkeypatch.setattr(schemes, "verify", verify)
    text = "".join(f"u{i}:{SECRET_HASHES['sha512crypt']}\n" for i in range(3)) + (
        "p:{PLAIN}x\nq:{PLAIN}y\nn:{PLAIN}z::::::nologin\n"
    )
    auth = auth_for(tmp_path, text)
    attempts = [("u1", b"wrong"), ("p", b"wrong"), ("nobody", b"wrong"),
                ("no\0body", b"wrong"), ("n", b"z")]
    for username, password in attempts:
        calls.clear()
        assert asyncio.run(auth.verify_password(username, password)) is None, username
        assert sorted(calls) == ["$6$", "fast"], username
    auth.close()


def test_a_right_password_pays_no_dummy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A success stops at the user's own hash; an all-PLAIN file's refusal needs no other."""
    calls: list[str] = []
    monkeypatch.setattr(schemes, "dummy_verify", lambda *a: calls.append("dummy"))
    auth = auth_for(tmp_path)
    assert asyncio.run(auth.verify_password("alice", b"alice-pass")) is not None
    assert calls == []
    (tmp_path / "plain").mkdir()
    plain = auth_for(tmp_path / "plain", "a:{PLAIN}x\nb:{PLAIN}y\n")
    assert asyncio.run(plain.verify_password("a", b"nope")) is None
    assert calls == []
    assert asyncio.run(plain.verify_password("nobody", b"nope")) is None
    assert calls == ["dummy"]


def test_empty_file_still_does_dummy_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no hash to imitate, an unknown user costs a default ARGON2ID verify."""
    calls: list[str | None] = []
    monkeypatch.setattr(schemes, "dummy_verify", lambda p, like=None: calls.append(like))
    auth = auth_for(tmp_path, "# nobody yet\n")
    assert asyncio.run(auth.verify_password("x", b"y")) is None
    assert calls == [None]
    auth.close()


def test_verification_failure_is_a_temporary_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hash library or thread pool failure raises TemporaryBackendError, not a 'no'."""

    def broken(stored: str, password: bytes) -> bool:
        raise OSError("boom")

    monkeypatch.setattr(schemes, "verify", broken)
    auth = auth_for(tmp_path)
    with pytest.raises(TemporaryBackendError):
        asyncio.run(auth.verify_password("alice", b"alice-pass"))  # fast, inline
    with pytest.raises(TemporaryBackendError):
        asyncio.run(auth.verify_password("carol", b"secret"))  # slow, in the pool
    auth.close()


def test_no_password_or_hash_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing the backend logs, at any level, holds a password or a stored hash."""
    caplog.set_level(logging.DEBUG)
    auth = auth_for(tmp_path, SAMPLE, check_interval=0)
    for user, password in (("alice", b"alice-pass"), ("alice", b"guess-1"), ("zed", b"guess-2"),
                           ("carol", b"secret"), ("erin", b"erin-pass")):
        asyncio.run(auth.verify_password(user, password))
    write(tmp_path / "users", SAMPLE + "new:{PLAIN}guess-3\n")
    asyncio.run(auth.lookup("new"))
    (tmp_path / "users").unlink()
    asyncio.run(auth.lookup("new"))
    for secret in ("alice-pass", "guess-", "secret", "erin-pass", "$6$", "{SSHA512}", "{PLAIN}"):
        assert secret not in caplog.text
    auth.close()


# ------------------------------------------------------------------ secrets


def test_secrets_for_challenge_response(tmp_path: Path) -> None:
    """PLAIN, CRAM-MD5 and SCRAM-SHA-256 secrets come from PLAIN storage; SCRAM salt stable."""
    auth = auth_for(tmp_path)
    assert asyncio.run(auth.secret_for("alice", "plain")) == b"alice-pass"
    assert asyncio.run(auth.secret_for("alice", "CRAM-MD5")) == schemes.cram_md5_context(
        b"alice-pass"
    )
    first = asyncio.run(auth.secret_for("alice", "SCRAM-SHA-256"))
    again = asyncio.run(auth.secret_for("alice", "SCRAM-SHA-256"))
    assert first is not None
    assert first == again
    secret = schemes.ScramSecret.decode(first)
    assert secret is not None
    assert secret.salt == schemes.scram_salt(auth.scram_salt_key, "alice")
    assert secret == schemes.ScramSecret.derive(b"alice-pass", secret.salt)
    assert asyncio.run(auth.secret_for("carol", "PLAIN")) is None
    auth.close()


def test_stored_scram_and_cram_secrets_are_returned(tmp_path: Path) -> None:
    """{SCRAM-SHA-256} and {CRAM-MD5} storage give their own secrets."""
    scram = schemes.hash_password("SCRAM-SHA-256", b"pw")
    cram = schemes.hash_password("CRAM-MD5", b"pw")
    auth = auth_for(tmp_path, f"s:{scram}\nc:{cram}\n")
    got = asyncio.run(auth.secret_for("s", "SCRAM-SHA-256"))
    assert got is not None
    assert got.decode() == scram.removeprefix("{SCRAM-SHA-256}")
    assert asyncio.run(auth.secret_for("c", "CRAM-MD5")) == schemes.cram_md5_context(b"pw")
    decoy = asyncio.run(auth.secret_for("s", "CRAM-MD5"))  # a SCRAM hash gives no CRAM secret
    assert decoy is not None
    assert decoy != schemes.cram_md5_context(b"pw")


# ------------------------------------------------------------------ reload


def test_reload_on_change(tmp_path: Path) -> None:
    """A changed file is re-read without a restart: added, changed, removed users."""
    auth = auth_for(tmp_path, "a:{PLAIN}one\n", check_interval=0)
    assert asyncio.run(auth.verify_password("a", b"one")) is not None
    new = tmp_path / "users.new"
    write(new, "a:{PLAIN}two\nb:{PLAIN}three\n")
    new.replace(tmp_path / "users")  # atomic replace: new inode
    assert asyncio.run(auth.verify_password("a", b"one")) is None
    assert asyncio.run(auth.verify_password("a", b"two")) is not None
    assert asyncio.run(auth.verify_password("b", b"three")) is not None
    write(tmp_path / "users", "b:{PLAIN}three\n")  # in place: size changes
    assert asyncio.run(auth.lookup("a")) is None


def test_check_interval_bounds_the_stat_rate(tmp_path: Path) -> None:
    """Within check_interval the file is not even looked at (a cheap hot path)."""
    auth = auth_for(tmp_path, "a:{PLAIN}one\n", check_interval=3600)
    write(tmp_path / "users", "b:{PLAIN}two\n")
    assert asyncio.run(auth.lookup("a")) is not None
    assert asyncio.run(auth.lookup("b")) is None


@pytest.mark.parametrize("damage", ["vanished", "now a folder"])
def test_a_file_gone_bad_keeps_last_good_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """A file that vanishes, or changes into something that cannot be read (here: a
    folder), keeps the users we had, with one error logged, until it is back."""
    auth = auth_for(tmp_path, "a:{PLAIN}one\n", check_interval=0)
    (tmp_path / "users").unlink()
    if damage == "now a folder":
        (tmp_path / "users").mkdir()
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            assert asyncio.run(auth.verify_password("a", b"one")) is not None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].endswith("; keeping the last good user table")
    if damage == "now a folder":
        (tmp_path / "users").rmdir()
    write(tmp_path / "users", "b:{PLAIN}two\n")
    assert asyncio.run(auth.lookup("b")) is not None
    assert asyncio.run(auth.lookup("a")) is None


def test_missing_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    """The server reports a missing passwd-file at start-up, before serving anyone."""
    with pytest.raises(ConfigError):
        PasswdFileAuthenticator(tmp_path / "nope")


def test_concurrent_lookups_during_reload_all_see_the_new_table(tmp_path: Path) -> None:
    """Lookups racing a reload wait for it; none sees a half-read table or an error."""
    auth = auth_for(tmp_path, "a:{PLAIN}one\n", check_interval=0)
    write(tmp_path / "users", "".join(f"u{i}:{{PLAIN}}p\n" for i in range(5000)))

    async def main() -> list[Principal | None]:
        return await asyncio.gather(*(auth.lookup(f"u{i}") for i in range(0, 5000, 50)))

    assert all(p is not None for p in asyncio.run(main()))


# ------------------------------------------------------------------ concurrency


def test_slow_verifies_do_not_block_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While argon2 verifies are in progress, the event loop keeps running.

    Each verify waits, in its thread, for the loop to let it go: were a verify run on
    the loop, the loop could never do so (the verify gives up after a bound and the test
    fails).  No clock is read: it holds however slow the machine.
    """
    auth = auth_for(tmp_path, f"u:{ARGON2ID_SECRET}\n")
    entered = threading.Semaphore(0)  # one release per verify begun
    release = threading.Event()
    real_verify = schemes.verify

    def gated_verify(stored: str, password: bytes) -> bool:
        entered.release()
        if not release.wait(30):
            raise AssertionError("the event loop never ran while a verify was in progress")
        return real_verify(stored, password)

    monkeypatch.setattr(schemes, "verify", gated_verify)

    async def main() -> list[Principal | None]:
        loop = asyncio.get_running_loop()
        verifies = asyncio.gather(
            *(auth.verify_password("u", b"secret" if i % 2 else b"wrong") for i in range(4))
        )
        # This coroutine runs on while a verify is held in its thread (the pool's threads
        # take them a few at a time).
        assert await loop.run_in_executor(None, functools.partial(entered.acquire, timeout=30))
        release.set()
        return list(await verifies)

    results = asyncio.run(main())
    auth.close()
    assert [r is not None for r in results] == [False, True, False, True]


def test_fast_schemes_run_inline(tmp_path: Path) -> None:
    """PLAIN/SHA verifies never start a thread pool (a thread hop costs more than the hash)."""
    auth = auth_for(tmp_path, f"a:{{PLAIN}}x\nb:{SECRET_HASHES['ssha512']}\n")
    before = threading.active_count()
    assert asyncio.run(auth.verify_password("a", b"x")) is not None
    assert asyncio.run(auth.verify_password("b", b"secret")) is not None
    assert asyncio.run(auth.verify_password("nobody", b"x")) is None
    assert auth._executor is None
    assert threading.active_count() == before


# ------------------------------------------------------------------ the writer


def test_update_user_adds_changes_and_deletes(tmp_path: Path) -> None:
    """update_user appends, replaces only the password field, and deletes every line."""
    path = write(tmp_path / "users", "# head\r\nalice:{PLAIN}a:1:2::/h::quota=1G\n\nbob:{PLAIN}b")
    assert update_user(path, "carol", "{PLAIN}c") is False
    assert path.read_bytes().endswith(b"bob:{PLAIN}b\ncarol:{PLAIN}c\n")
    assert update_user(path, "alice", "{PLAIN}new") is True
    assert path.read_bytes().startswith(b"# head\r\nalice:{PLAIN}new:1:2::/h::quota=1G\n\n")
    write(path, path.read_text() + "bob:{PLAIN}dup\n")
    assert update_user(path, "bob", None) is True
    assert b"bob" not in path.read_bytes()
    assert update_user(path, "bob", None) is False
    assert [u.username for u in list_users(path)] == ["alice", "carol"]


def test_update_user_new_user_with_extra_fields(tmp_path: Path) -> None:
    """A new user's extra fields land in the extra column and parse back."""
    path = tmp_path / "users"
    update_user(path, "dan", "{PLAIN}d", extra={"userdb_quota_rule": "*:storage=1M", "x": ""})
    (info,) = list_users(path)
    assert info.scheme == "PLAIN"
    assert info.attributes == {"quota_rule": "*:storage=1M", "x": ""}


def test_update_user_creates_a_private_file_and_keeps_modes(tmp_path: Path) -> None:
    """A new file is 0600; an existing file keeps its mode across the atomic rewrite."""
    path = tmp_path / "users"
    update_user(path, "a", "{PLAIN}a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o640)
    inode = path.stat().st_ino
    update_user(path, "a", "{PLAIN}b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temporary file left


def test_update_user_delete_from_missing_file(tmp_path: Path) -> None:
    """Deleting from a file that does not exist changes nothing and creates nothing."""
    assert update_user(tmp_path / "users", "a", None) is False
    assert not (tmp_path / "users").exists()


@pytest.mark.parametrize("name", ["", "a:b", "a/b", "a b", "a\nb", "#a", ".a", "a\0", "x" * 300])
def test_update_user_refuses_bad_names(tmp_path: Path, name: str) -> None:
    """Names that could break the file or a path are refused."""
    with pytest.raises(ValueError):
        update_user(tmp_path / "users", name, "{PLAIN}x")


def test_update_user_refuses_bad_stored_passwords(tmp_path: Path) -> None:
    """A stored password with ':' or a line end would corrupt the file: refused."""
    for stored in ("{PLAIN}a:b", "{PLAIN}a\nroot:{PLAIN}x"):
        with pytest.raises(ValueError):
            update_user(tmp_path / "users", "a", stored)


def test_concurrent_updates_lose_nothing(tmp_path: Path) -> None:
    """Concurrent writers are serialised: every added user is there afterwards."""
    path = tmp_path / "users"
    threads = [
        threading.Thread(target=update_user, args=(path, f"u{i}", "{PLAIN}p")) for i in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(u.username for u in list_users(path)) == sorted(f"u{i}" for i in range(20))


def test_list_users_hides_passwords(tmp_path: Path) -> None:
    """list_users shows each user's scheme, never the stored hash."""
    infos = list_users(write(tmp_path / "users", SAMPLE))
    by_name = {i.username: i for i in infos}
    assert by_name["carol"].scheme == "SHA512-CRYPT"
    assert by_name["frank"].scheme == ""
    assert "$6$" not in repr(infos)
    assert "alice-pass" not in repr(infos)


def test_written_hash_logs_in(tmp_path: Path) -> None:
    """A user added with hash_password + update_user can log in through a live authenticator."""
    path = write(tmp_path / "users", "")
    auth = PasswdFileAuthenticator(path, check_interval=0)
    update_user(path, "neo", schemes.hash_password("SHA512-CRYPT", b"red pill"))
    assert asyncio.run(auth.verify_password("neo", b"red pill")) is not None
    update_user(path, "neo", None)
    assert asyncio.run(auth.verify_password("neo", b"red pill")) is None
    auth.close()


def test_record_repr_hides_password() -> None:
    """A UserRecord in a log or traceback shows no password."""
    record = passwd_file.UserRecord("u", "{PLAIN}hunter2", {})
    assert "hunter2" not in repr(record)
    assert os.fspath("u") in repr(record)


# ------------------------------------------------------------------ the login fast path


CASES = [("alice", b"alice-pass"), ("alice", b"second-alice"), ("bob@example.org", b"x"),
         ("bob@example.org", b"secret"), ("crlf", b"crlf-pass"), ("dave", b"anything"),
         ("erin", b"erin-pass"), ("frank", b""), ("weird", b"data"), ("nobody", b"x"),
         ("bad/name", b"x"), ("no\0body", b"x")]


def test_begin_answers_as_verify_does_or_hands_over_the_rest(tmp_path: Path) -> None:
    """begin gives verify's answer at once, or an Unfinished that finishes with it.

    SAMPLE holds SHA512-CRYPT (carol): every refusal pays a slow dummy, so refusals are
    Unfinished; successes of fast schemes (PLAIN, SSHA512, nopassword) are answered inline.
    """
    auth = auth_for(tmp_path)
    inline = []
    for username, password in [*CASES, ("carol", b"secret"), ("carol", b"wrong")]:
        expected = asyncio.run(auth.verify(username, password))
        verdict = auth.begin(username, password)
        if isinstance(verdict, Unfinished):
            verdict = asyncio.run(verdict.result())
        else:
            inline.append(username)
        assert verdict == expected, username
    assert inline == ["alice", "bob@example.org", "crlf", "dave"]
    assert asyncio.run(auth.verify("nobody", b"x")) is Refused.UNKNOWN_USER
    assert asyncio.run(auth.verify("alice", b"x")) is Refused.BAD_PASSWORD
    assert asyncio.run(auth.verify("erin", b"erin-pass")) is Refused.NOLOGIN
    auth.close()


def test_verify_now_answers_a_fast_file_inline(tmp_path: Path) -> None:
    """With only fast schemes, verify_password_now answers every case as verify_password."""
    fast = "\n".join(line for line in SAMPLE.splitlines() if not line.startswith("carol"))
    auth = auth_for(tmp_path, fast)
    for username, password in CASES:
        expected = asyncio.run(auth.verify_password(username, password))
        assert auth.verify_password_now(username, password) == expected, username
        assert not isinstance(auth.begin(username, password), Unfinished)
    assert auth._executor is None
    with pytest.raises(WouldWait):  # a refusal in a file with a slow class waits
        auth_for(tmp_path, SAMPLE).verify_password_now("nobody", b"x")


def test_a_due_look_at_an_unchanged_file_is_made_inline(tmp_path: Path) -> None:
    """A file due a look that has not changed costs a stat, inline: the login is not
    handed to a task (at a thousand logins a second, one a second would be, and the
    address's other logins would queue behind it for a slot)."""
    auth = auth_for(tmp_path, check_interval=0.0)
    assert not isinstance(auth.begin("alice", b"alice-pass"), Unfinished)
    assert auth.verify_password_now("alice", b"alice-pass") is not None


def test_verify_now_leaves_a_changed_file_to_verify(tmp_path: Path) -> None:
    """When the file changed, only verify_password (which re-reads it) answers."""
    auth = auth_for(tmp_path, check_interval=0.0)
    write(tmp_path / "users", "alice:{PLAIN}new-pass\n")
    with pytest.raises(WouldWait):
        auth.verify_password_now("alice", b"new-pass")
    assert isinstance(auth.begin("alice", b"new-pass"), Unfinished)
    assert asyncio.run(auth.verify_password("alice", b"new-pass")) is not None
    assert auth.verify_password_now("alice", b"new-pass") is not None  # re-read


def test_verify_now_leaves_a_slow_dummy_to_verify(tmp_path: Path) -> None:
    """A stranger against a file of slow hashes costs a slow dummy check: not inline."""
    auth = auth_for(tmp_path, f"carol:{SECRET_HASHES['sha512crypt']}\n")
    with pytest.raises(WouldWait):
        auth.verify_password_now("nobody", b"x")
    auth.close()
