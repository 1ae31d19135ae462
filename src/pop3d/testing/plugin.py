r"""pytest plugin of pop3d (entry point ``pytest11``): a real POP3 server for your tests.

Installed with pop3d; pytest loads it by itself.  Fixtures:

* ``pop3_server``: a fresh :class:`~pop3d.testing.scripted.ScriptedPop3Server` for each
  test (its files under the test's ``tmp_path``);
* ``pop3_server_session``: one server for the whole session (reset it with
  ``srv.reset()`` where a test needs an empty one);
* ``pop3_client``: a ``poplib.POP3`` logged in to ``pop3_server`` as ``alice`` (made if
  missing); the maildrop is the one at login: deliver before asking for the fixture, or
  use ``pop3_server.client(user)`` after delivering.

Configure a test's server with the marker ``@pytest.mark.pop3_server(users={...},
tls=True, **config_overrides)`` (``apop=True``, ``login_delay=30``, ``mechanisms=[...]``).

Example::

    def test_fetcher_deletes(pop3_server):
        pop3_server.deliver("alice", "Subject: hi\n\nhello\n")
        fetch(host=pop3_server.host, port=pop3_server.port,
              user="alice", password=pop3_server.password("alice"))
        assert pop3_server.mailbox("alice") == []
"""

from __future__ import annotations

import poplib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the server is imported when a fixture is first used, not by pytest
    from pop3d.testing.scripted import ScriptedPop3Server

__all__ = ["pop3_client", "pop3_server", "pop3_server_session"]

#: The user ``pop3_client`` logs in as.
DEFAULT_USER = "alice"


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``pop3_server`` marker."""
    config.addinivalue_line(
        "markers",
        "pop3_server(users=None, tls=True, **overrides): configure the pop3_server fixture",
    )


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("pop3_server")
    return dict(marker.kwargs) if marker is not None else {}


@pytest.fixture
def pop3_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ScriptedPop3Server]:
    """A real pop3d of its own for this test (see the module head)."""
    from pop3d.testing.scripted import ScriptedPop3Server  # noqa: PLC0415

    with ScriptedPop3Server(tmp_path / "pop3d", **_options(request)) as srv:
        yield srv


@pytest.fixture(scope="session")
def pop3_server_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ScriptedPop3Server]:
    """One real pop3d for the whole test session; ``srv.reset()`` empties it."""
    from pop3d.testing.scripted import ScriptedPop3Server  # noqa: PLC0415

    with ScriptedPop3Server(tmp_path_factory.mktemp("pop3d")) as srv:
        yield srv


@pytest.fixture
def pop3_client(pop3_server: ScriptedPop3Server) -> Iterator[poplib.POP3]:
    """A ``poplib.POP3`` logged in to ``pop3_server`` as ``alice``; QUIT at the end."""
    client = pop3_server.client(DEFAULT_USER)
    yield client
    if client.sock is None:  # the test quit already
        return
    try:
        client.quit()
    except (OSError, poplib.error_proto):
        client.close()
