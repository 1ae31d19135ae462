"""The accept path's [server] keys: proxy_protocol_from, handshake_timeout, max_tls_handshakes."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pop3d.config import from_mapping
from pop3d.errors import ConfigError
from pop3d.protocol import limits


def _server(**keys: object) -> dict[str, dict[str, object]]:
    return {"server": {"listen": ["127.0.0.1:1110"], **keys}}


def test_defaults() -> None:
    """No PROXY protocol unless asked; the deadline and the bound come from limits.py."""
    cfg = from_mapping(_server(), Path())
    assert cfg.server.proxy_protocol_from == ()
    assert cfg.server.handshake_timeout == limits.HANDSHAKE_TIMEOUT
    assert cfg.server.max_tls_handshakes == limits.MAX_TLS_HANDSHAKES


def test_values_are_read() -> None:
    """Networks are parsed (host bits allowed), numbers taken as given."""
    cfg = from_mapping(
        _server(
            proxy_protocol_from=["10.0.0.2", "192.0.2.1/24", "2001:db8::/64"],
            handshake_timeout=2.5,
            max_tls_handshakes=8,
        ),
        Path(),
    )
    assert cfg.server.proxy_protocol_from == (
        ipaddress.ip_network("10.0.0.2/32"),
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/64"),
    )
    assert cfg.server.handshake_timeout == 2.5
    assert cfg.server.max_tls_handshakes == 8


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"proxy_protocol_from": ["10.0.0.300/8"]}, "proxy_protocol_from"),
        ({"proxy_protocol_from": "10.0.0.0/8"}, "proxy_protocol_from"),
        ({"handshake_timeout": 0}, "handshake_timeout"),
        ({"handshake_timeout": "10"}, "handshake_timeout"),
        ({"max_tls_handshakes": 0}, "max_tls_handshakes"),
    ],
)
def test_bad_values_are_config_errors(keys: dict[str, object], message: str) -> None:
    """A bad value names its key."""
    with pytest.raises(ConfigError, match=message):
        from_mapping(_server(**keys), Path())
