"""``pip install`` pop3d in a fresh venv, then ``pytest`` in a fresh project: fixtures there.

The venv is new and has no pop3d; the other packages it needs are links to this project's
.venv (minus pop3d itself), so the install is ``--no-deps --no-build-isolation
--no-index``: nothing is downloaded.  The project under test has no conftest and imports
nothing from pop3d: the ``pytest11`` entry point alone brings the fixtures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]

PROJECT_TEST = """
import poplib


def test_fixtures_from_the_plugin(pop3_server):
    pop3_server.deliver("ann", "Subject: fresh\\n\\nfrom a fresh venv\\n")
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    client.user("ann")
    client.pass_(pop3_server.password("ann"))
    assert client.retr(1)[1][-1] == b"from a fresh venv"
    client.quit()
    assert "C: PASS ****" in pop3_server.transcript.lines()


def test_client_fixture(pop3_client):
    assert pop3_client.stat() == (0, 0)
"""


def _own_files(target: Path) -> Path:
    """A copy of what a source distribution holds (the tree stays free of build output)."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    shutil.copytree(ROOT / "src", target / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return target


def _linked_dependencies(target: Path) -> Path:
    """This interpreter's site-packages, linked entry by entry, without pop3d."""
    target.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name.lower()
        if "pop3d" in name or name.endswith(".pth") or name == "__pycache__":
            continue
        (target / entry.name).symlink_to(entry)
    return target


def test_pip_install_then_pytest_finds_the_fixtures(tmp_path: Path) -> None:
    # The fresh venv sees only what is installed in it: not a PYTHONPATH of the caller's
    # (a run against another checkout sets one).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    source = _own_files(tmp_path / "source")
    deps = _linked_dependencies(tmp_path / "deps")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout.strip()
    Path(purelib, "linked-deps.pth").write_text(f"{deps}\n", encoding="utf-8")
    missing = subprocess.run(
        [python, "-c", "import pop3d"], capture_output=True, text=True, check=False, env=env
    )
    assert missing.returncode != 0  # the venv starts without pop3d

    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile",
         "--no-deps", "--no-build-isolation", "--no-index", str(source)],
        check=True, capture_output=True, timeout=150, env=env,
    )
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_mail.py").write_text(PROJECT_TEST, encoding="utf-8")
    run = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=project, capture_output=True, text=True, timeout=120, check=False, env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
    located = subprocess.run(
        [python, "-c", "import pop3d.testing.plugin as p; print(p.__file__)"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout
    assert located.startswith(str(env_dir))  # the installed copy, not this tree
