"""The plugin's own fixtures here, over tests/conftest.py's older ``pop3_server``.

Other projects get them from the ``pytest11`` entry point alone (test_install.py shows it).
A collection after each test makes a socket or transport left open show at the test that
left it (``filterwarnings = error`` turns its ResourceWarning into a failure).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pop3d.testing.plugin import pop3_client, pop3_server, pop3_server_session

__all__ = ["pop3_client", "pop3_server", "pop3_server_session"]


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    yield
    gc.collect()
