"""The %u/%n/%d path template, and which user names may become paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from pop3d.errors import ConfigError, TemporaryBackendError
from pop3d.storage.locking import TABLE_NAME, default_table_path
from pop3d.storage.template import (
    UnsafeUserName,
    check_template,
    check_username,
    expand,
    mail_path,
    mail_rel,
    mail_root,
    static_prefix,
)

BASE = Path("/srv/pop3d")


@pytest.mark.parametrize(
    ("template", "username", "expected"),
    [
        ("mail/%u/Maildir", "alice", "mail/alice/Maildir"),
        ("mail/%u/Maildir", "alice@example.org", "mail/alice@example.org/Maildir"),
        ("mail/%d/%n", "alice@example.org", "mail/example.org/alice"),
        ("mail/%n", "alice", "mail/alice"),
        ("100%%/%u", "bob", "100%/bob"),
        ("%n@%d", "a@b@c", "a@b@c"),
        ("mail/%u", "Ünïcødé", "mail/Ünïcødé"),
        ("mail/%u", "with space", "mail/with space"),
        ("mail/%u", "dots.in.name", "mail/dots.in.name"),
    ],
)
def test_escapes_expand_as_dovecot_does(template: str, username: str, expected: str) -> None:
    """%u is the name, %n the part before the first @, %d the part after it, %% a percent."""
    assert expand(template, username) == expected


def test_relative_paths_resolve_against_base() -> None:
    """A relative template is resolved against the config file's folder."""
    assert mail_path("mail/%u/Maildir", "alice", BASE) == BASE / "mail/alice/Maildir"


def test_absolute_paths_ignore_base() -> None:
    """An absolute template is used as written."""
    assert mail_path("/var/vmail/%d/%n", "a@b.org", BASE) == Path("/var/vmail/b.org/a")


def test_tilde_is_not_expanded() -> None:
    """No home directory can redirect a template: ~ is an ordinary character."""
    assert mail_path("~/%u", "alice", BASE) == BASE / "~/alice"


@pytest.mark.parametrize(
    "username",
    [
        "",
        ".",
        "..",
        "../etc",
        "a/../../b",
        "/abs",
        "a\\b",
        "nul\x00",
        "tab\tname",
        "new\nline",
        "cr\rname",
        "del\x7f",
        "c1\x85ctl",
        "zero\u200bwidth",
        "bidi\u202eoverride",
        "nbsp\u00a0name",
        ".hidden",
        "alice@..",
        "alice@.",
        "..@example.org",
        ".@example.org",
        "alice@.example.org",
        ".alice@example.org",
        "@example.org",
        "alice@",
        "x" * 256,
        "é" * 128,
    ],
)
def test_unsafe_names_never_become_paths(username: str) -> None:
    """Names that could escape the mail root raise UnsafeUserName (a TemporaryBackendError)."""
    with pytest.raises(UnsafeUserName):
        check_username(username)
    with pytest.raises(TemporaryBackendError):
        mail_path("mail/%u/Maildir", username, BASE)


def test_unsafe_name_is_a_temporary_backend_error() -> None:
    """The refusal is answered -ERR [SYS/TEMP]: UnsafeUserName subclasses TemporaryBackendError."""
    assert issubclass(UnsafeUserName, TemporaryBackendError)


def test_longest_allowed_name() -> None:
    """A name of 255 UTF-8 octets (one path component) is accepted."""
    check_username("x" * 255)


def test_empty_expansion_is_refused() -> None:
    """%d of a name without a domain is refused rather than collapsing the path."""
    with pytest.raises(UnsafeUserName):
        mail_path("mail/%d/%n", "alice", BASE)
    assert mail_path("mail/%n", "alice", BASE) == BASE / "mail/alice"


@pytest.mark.parametrize("template", ["mail/%x", "mail/%", "%U/x", "", "mail/%h"])
def test_unknown_escapes_are_config_errors(template: str) -> None:
    """A template with an unknown or trailing % (or empty) is a ConfigError."""
    with pytest.raises(ConfigError):
        check_template(template)
    with pytest.raises(ConfigError):
        mail_path(template, "alice", BASE)


def test_expanded_path_stays_under_the_root() -> None:
    """Every accepted name lands strictly inside the template's folder."""
    for name in ["alice", "a.b", "a..b", "a@b", "a@b.c", "a-b_c+d", "x" * 255]:
        path = mail_path("mail/%u/Maildir", name, BASE)
        assert path.parent.parent == BASE / "mail"
        assert ".." not in path.parts


@pytest.mark.parametrize("template", ["mail/%u/Maildir", "/var/mail/%u", "mail/%d/%n", "m/x%u"])
@pytest.mark.parametrize(
    "username", [TABLE_NAME, f"{TABLE_NAME}@example.org", f"alice@{TABLE_NAME}"]
)
def test_no_user_name_lands_on_the_lock_table(template: str, username: str) -> None:
    """The default lock table (``.pop3d-locks`` beside the users' folders) is no one's mail.

    Its name starts with a dot, and no name (nor its local or domain part) may.
    """
    assert default_table_path(template, BASE) is not None
    with pytest.raises(UnsafeUserName):
        mail_path(template, username, BASE)
    for name in ["pop3d-locks@example.org", "alice@pop3d-locks", "a@b"]:
        assert mail_path(template, name, BASE) != default_table_path(template, BASE)


@pytest.mark.parametrize(
    ("template", "prefix"),
    [
        ("mail/%u/Maildir", "mail/"),
        ("/var/mail/%d/%n", "/var/mail/"),
        ("/srv/100%%/mail/%u", "/srv/100%/mail/"),
        ("%u/Maildir", ""),
        ("/var/mail/shared", "/var/mail/shared"),
        ("mail/.%u", "mail/."),
    ],
)
def test_static_prefix_stops_at_the_first_variable(template: str, prefix: str) -> None:
    """The text every user's path shares (where the default lock table goes)."""
    assert static_prefix(template) == prefix


def test_static_prefix_refuses_an_unknown_escape() -> None:
    with pytest.raises(ConfigError):
        static_prefix("mail/%x/%u")


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("shared/Maildir", "no per-user variable"),
        ("/var/mail/shared", "no per-user variable"),
        ("mail/%d/Maildir", "of a domain"),
        ("mail/%%u/Maildir", "no per-user variable"),
        ("mail/%u/../shared", "'..'"),
        ("../mail/%u", "'..'"),
        ("mail/./%u", "'.'"),
    ],
)
def test_templates_that_could_share_mail_are_refused(template: str, why: str) -> None:
    """A template without %u/%n, or with a '.'/'..' component, is refused and says why."""
    with pytest.raises(ConfigError, match=why) as info:
        check_template(template, "pop3d.toml: [storage] maildir")
    assert "pop3d.toml: [storage] maildir" in str(info.value)


def test_config_load_names_the_file_and_key(tmp_path: Path) -> None:
    """The refusal comes at config load, naming the file and the key."""
    from pop3d import config  # noqa: PLC0415

    conf = tmp_path / "pop3d.toml"
    conf.write_text('[storage]\nmbox = "/var/mail/everyone"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"pop3d\.toml: \[storage\] mbox") as info:
        config.load(conf)
    assert "per-user" in str(info.value)


@pytest.mark.parametrize(
    ("template", "root", "rel"),
    [
        ("mail/%u/Maildir", BASE / "mail", "alice/Maildir"),
        ("/var/mail/%u", Path("/var/mail"), "alice"),
        ("%u/Maildir", BASE, "alice/Maildir"),
        ("/srv/100%%/m/x%u", Path("/srv/100%/m"), "xalice"),
        ("mail//%d//%n/", BASE / "mail", "example.org/alice"),
    ],
)
def test_mail_root_and_the_user_part_below_it(template: str, root: Path, rel: str) -> None:
    """The operator's root and the user's part below it make the whole path."""
    name = "alice@example.org" if "%d" in template else "alice"
    assert mail_root(template, BASE) == root
    assert mail_rel(template, name) == rel
    assert mail_path(template, name, BASE) == root / rel
