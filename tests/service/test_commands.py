"""Commands that never guess: user, deliver, mailbox, who without --config.

They use the embedded default only when its data folder already exists (and say so on
stderr); otherwise they refuse with a message naming --config and create nothing.  No
user error ends in a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pop3d import demo

pytestmark = pytest.mark.timeout(60)

COMMANDS = [
    ("user", "add", "carol", "--password-stdin"),
    ("user", "list"),
    ("user", "del", "carol"),
    ("mailbox", "stat", "demo"),
    ("deliver", "demo"),
    ("who",),
    ("check-config",),
]


def pop3d(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pop3d", *args],
        capture_output=True, text=True, timeout=30, cwd=cwd, check=False, input=stdin,
        start_new_session=True,  # no controlling terminal, as under cron or CI
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_without_config_in_an_empty_folder_refuses(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """No --config and no ./pop3d-data: exit 78 naming --config; no folder is created."""
    done = pop3d(*command, cwd=tmp_path, stdin="pw\n")
    assert done.returncode == 78, done.stderr
    assert "--config" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_embedded_default_is_used_and_said(tmp_path: Path) -> None:
    """With ./pop3d-data present (serve made it), user add works there and says so."""
    demo.ensure_demo_data(tmp_path / "pop3d-data")
    done = pop3d("user", "add", "carol", "--password-stdin", cwd=tmp_path, stdin="pw\n")
    assert done.returncode == 0, done.stderr
    assert "embedded default" in done.stderr
    assert "carol:" in (tmp_path / "pop3d-data" / "users").read_text()
    done = pop3d("deliver", "demo", cwd=tmp_path, stdin="Subject: x\n\nbody\n")
    assert done.returncode == 0, done.stderr
    assert "embedded default" in done.stderr


def test_user_add_without_terminal_or_password_stdin(tmp_path: Path) -> None:
    """user add with no terminal and no --password-stdin: a clear message, no traceback."""
    demo.ensure_demo_data(tmp_path / "pop3d-data")
    done = pop3d("user", "add", "carol", cwd=tmp_path)
    assert done.returncode == 1
    assert "--password-stdin" in done.stderr
    assert "Traceback" not in done.stderr
    assert "carol" not in (tmp_path / "pop3d-data" / "users").read_text()
