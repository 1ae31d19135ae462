"""Shared fixtures: a real pop3d in-process (``pop3_server``) or as a subprocess (``serve``).

Both come from :mod:`pop3d.testing`, the helper we publish for developers who test
mail-fetching code; using it here is how we know it works.  ``free_port`` and
``wait_for_port`` are re-exported for tests that start other servers (Dovecot).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pop3d.testing import Pop3ServeProcess, Pop3TestServer, free_port, wait_for_port

__all__ = ["free_port", "wait_for_port"]

#: The users every fixture server knows.
USERS = {"alice": "secret", "bob": "hunter2"}

ServerFactory = Callable[..., Pop3TestServer]
ServeFactory = Callable[..., Pop3ServeProcess]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Give each run its own ``--basetemp`` unless one was asked for.

    pytest's numbered ``pytest-N`` folders are pruned by a generator that leaves an
    ``os.scandir`` iterator open (``_pytest.pathlib.find_prefixed``, pytest 9.2); the
    ResourceWarning surfaces at exit and, with warnings as errors, fails a run that
    passed.  A fresh folder per run skips that machinery, and concurrent runs never
    share one.
    """
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="pop3d-tests-")
        config.stash[_OWN_BASETEMP] = True


#: Set on runs whose --basetemp this conftest made; _PASSED once the session passed.
_OWN_BASETEMP = pytest.StashKey[bool]()
_PASSED = pytest.StashKey[bool]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_PASSED] = exitstatus == 0


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the run's own folder when every test passed (kept to look at otherwise)."""
    if config.stash.get(_OWN_BASETEMP, False) and config.stash.get(_PASSED, False):
        shutil.rmtree(config.option.basetemp, ignore_errors=True)


@pytest.fixture
def pop3_server(tmp_path: Path) -> Iterator[Pop3TestServer]:
    """An in-process pop3d on 127.0.0.1 with users alice/secret and bob/hunter2."""
    with Pop3TestServer(tmp_path / "pop3d", users=USERS) as srv:
        yield srv


@pytest.fixture
def pop3_server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start in-process servers with config overrides: ``factory(idle_timeout=1)``.

    Every server gets its own folder and alice/bob (unless ``users=`` says otherwise),
    and is stopped at teardown.
    """
    started: list[Pop3TestServer] = []

    def factory(**kwargs: object) -> Pop3TestServer:
        users = kwargs.pop("users", USERS)
        assert isinstance(users, dict)
        srv = Pop3TestServer(
            tmp_path / f"pop3d-{len(started)}", users=users, **kwargs  # type: ignore[arg-type]
        )
        started.append(srv)
        return srv.start()

    yield factory
    for srv in started:
        srv.stop()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeFactory]:
    """Run ``pop3d serve --config FILE`` subprocesses: ``proc = serve(idle_timeout=2)``.

    The factory writes the config (users alice/bob unless ``users=``), starts the process,
    waits (bounded) until its port greets, and kills it by PID at teardown.  Pass
    ``root=`` to reuse a folder (a restart over the same Maildirs).
    """
    started: list[Pop3ServeProcess] = []

    def factory(**kwargs: object) -> Pop3ServeProcess:
        users = kwargs.pop("users", USERS)
        root = kwargs.pop("root", tmp_path / f"serve-{len(started)}")
        assert isinstance(users, dict)
        assert isinstance(root, Path)
        proc = Pop3ServeProcess(root, users=users, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc.start()

    yield factory
    for proc in started:
        proc.kill()
