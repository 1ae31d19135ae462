"""The plugin's own fixtures here, over tests/conftest.py's older ``pop3_server``.

Other projects get them from the ``pytest11`` entry point alone (test_install.py shows it).
"""

from pop3d.testing.plugin import pop3_client, pop3_server, pop3_server_session

__all__ = ["pop3_client", "pop3_server", "pop3_server_session"]
