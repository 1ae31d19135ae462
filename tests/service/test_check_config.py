"""``pop3d check-config``: 0 when serve would start, 78 naming file, key, expected and found.

Each broken config of issue 16 is caught with a message that names it; ``serve`` reports
the same problems the same way (78; a busy port names its address, 71).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pop3d.testing import free_port

pytestmark = pytest.mark.timeout(60)


def pop3d(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pop3d", *args],
        capture_output=True, text=True, timeout=30, cwd=cwd, check=False,
    )


class Site:
    """A good config with TLS in a folder; tests break one thing at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost")
        leaf.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
        leaf.private_key_pem.write_to_path(str(root / "key.pem"))
        other = ca.issue_cert("other.example")
        other.private_key_pem.write_to_path(str(root / "other-key.pem"))
        (root / "users").write_text("alice:{PLAIN}secret\n")
        self.port = free_port()
        self.keys = {
            "server": {"listen": f'["127.0.0.1:{self.port}"]', "idle_timeout": "600"},
            "tls": {"cert": '"cert.pem"', "key": '"key.pem"'},
            "auth": {"passwd_file": '"users"'},
            "storage": {"maildir": '"mail/%u/Maildir"'},
        }
        self.config = root / "pop3d.toml"

    def write(self) -> Path:
        text = ""
        for section, keys in self.keys.items():
            text += f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
        self.config.write_text(text)
        return self.config

    def check(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return pop3d("check-config", "--config", str(self.write()), *extra)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_good_config_exits_0(site: Site) -> None:
    """A config serve would start with: exit 0, nothing on stdout without --show."""
    done = site.check()
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


def _assert_names(done: subprocess.CompletedProcess[str], site: Site, *parts: str) -> None:
    assert done.returncode == 78, done.stderr
    assert str(site.config) in done.stderr
    for part in parts:
        assert part in done.stderr, (part, done.stderr)
    assert "Traceback" not in done.stderr


def test_missing_certificate_names_key_and_path(site: Site) -> None:
    """A missing certificate: [tls] cert, the path, and why (not a bare [Errno 2])."""
    site.keys["tls"]["cert"] = '"nope.pem"'
    _assert_names(
        site.check(), site, "[tls] cert: expected a readable PEM certificate",
        str(site.root / "nope.pem"), "No such file or directory",
    )


def test_garbage_pem_is_named(site: Site) -> None:
    """A certificate file with no PEM in it: [tls] cert names the file and what is missing."""
    (site.root / "cert.pem").write_text("garbage\n")
    _assert_names(site.check(), site, "[tls] cert:", "BEGIN CERTIFICATE")


def test_key_not_matching_certificate(site: Site) -> None:
    """A key of another certificate: [tls] key says it does not match."""
    site.keys["tls"]["key"] = '"other-key.pem"'
    _assert_names(site.check(), site, "[tls] key:", "does not match")


def test_busy_port_names_the_address(site: Site) -> None:
    """A port in use: [server] listen, the address, and the reason."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        site.keys["server"]["listen"] = f'["127.0.0.1:{port}"]'
        _assert_names(
            site.check(), site, "[server] listen", f"127.0.0.1:{port}", "Address already in use"
        )
        # --no-bind: for a config whose server is running.
        assert site.check("--no-bind").returncode == 0
        # serve names the address too (71: cannot bind).
        done = pop3d("serve", "--config", str(site.config))
        assert done.returncode == 71, done.stderr
        assert f"127.0.0.1:{port} ([server] listen)" in done.stderr


def test_wrong_type_says_what_was_expected(site: Site) -> None:
    """idle_timeout = "10": expected a number, got a string."""
    site.keys["server"]["idle_timeout"] = '"10"'
    _assert_names(site.check(), site, "[server] idle_timeout: expected a number, got a string")


@pytest.mark.parametrize(
    ("section", "key", "value", "parts"),
    [
        ("auth", "passwd_file", '"absent"', ("[auth] passwd_file", "No such file")),
        ("storage", "maildir", '"mail/%x"', ("[storage] maildir", "unknown escape")),
        ("server", "user", '"no-such-user-x"', ("[server] user", "no-such-user-x")),
        ("server", "listen", '["localhost"]', ("[server] listen", "localhost")),
        ("log", "target", '"paper"', ("[log] target", "paper")),
        ("metrics", "listen", '"nowhere"', ("[metrics] listen", "nowhere")),
    ],
)
def test_each_broken_key_is_named(
    site: Site, section: str, key: str, value: str, parts: tuple[str, ...]
) -> None:
    """Every broken key is named with what was found."""
    site.keys.setdefault(section, {})[key] = value
    _assert_names(site.check(), site, *parts)


def test_malformed_passwd_line_is_named(site: Site) -> None:
    """A passwd-file line that does not parse: a warning naming the file and line (serve
    starts and skips it, so the exit is 0); an unreadable passwd-file is an error."""
    (site.root / "users").write_text("alice:{PLAIN}secret\n\nno colon here\n")
    done = site.check()
    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stderr
    assert str(site.root / "users") in done.stderr
    assert "line 3" in done.stderr
    (site.root / "users").write_bytes(b"")
    (site.root / "users").unlink()
    (site.root / "users").mkdir()
    _assert_names(site.check(), site, "[auth] passwd_file", "expected a readable passwd-file")


def test_serve_reports_config_problems_the_same_way(site: Site) -> None:
    """serve exits 78 with the check-config message (file, key, path), no traceback."""
    site.keys["tls"]["cert"] = '"nope.pem"'
    site.write()
    done = pop3d("serve", "--config", str(site.config))
    _assert_names(done, site, "[tls] cert", str(site.root / "nope.pem"))


def test_show_prints_effective_settings_with_defaults_marked(site: Site) -> None:
    """--show: every key with its value; defaults marked, set values not."""
    site.keys["server"]["idle_timeout"] = "120"
    done = site.check("--show")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "idle_timeout = 120.0" in lines
    assert f'listen = ["127.0.0.1:{site.port}"]' in lines
    assert any(line.startswith("max_connections = ") and "# default" in line for line in lines)
    assert any(line.startswith("greeting = ") and "# default" in line for line in lines)
    assert any(line.startswith("default_scheme = ") for line in lines)
    assert f'cert = "{site.root / "cert.pem"}"' in lines
    for section in ("[server]", "[tls]", "[auth]", "[storage]", "[lmtp]", "[metrics]", "[log]"):
        assert section in lines


@pytest.fixture
def empty_folder(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "empty"
    folder.mkdir()
    yield folder
    assert not (folder / "pop3d-data").exists()


def test_check_config_without_config_never_guesses(empty_folder: Path) -> None:
    """No --config and no embedded default's data: 78 naming --config, nothing created."""
    done = pop3d("check-config", cwd=empty_folder)
    assert done.returncode == 78
    assert "--config" in done.stderr
