"""ServerContext.settings_for: what each new connection's core is told."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from pop3d.config import from_mapping
from pop3d.server.context import ServerContext
from pop3d.session import Backends


def _context(tmp_path: Path, auth: dict[str, Any]) -> ServerContext:
    config = from_mapping({"auth": {"secure_networks": ["127.0.0.0/8"], **auth}}, tmp_path)
    # settings_for reads only the configuration: the backends are never touched here.
    return ServerContext(config, cast("Backends", None), None)


def test_default_settings_are_shared_per_kind_of_connection(tmp_path: Path) -> None:
    """No APOP, CRAM-MD5, SCRAM or client certificate: nothing unique, one object a kind."""
    ctx = _context(tmp_path, {})
    local = ctx.settings_for("127.0.0.1", implicit_tls=False)
    assert ctx.settings_for("127.0.0.2", implicit_tls=False) is local
    assert local.plaintext_allowed
    assert local.sasl_nonce == ""
    assert local.apop_timestamp is None
    remote = ctx.settings_for("192.0.2.1", implicit_tls=False)
    assert remote is not local
    assert not remote.plaintext_allowed
    tls = ctx.settings_for("192.0.2.1", implicit_tls=True)
    assert tls.tls_active
    assert tls is not remote


def test_nonce_mechanisms_get_a_fresh_nonce_per_connection(tmp_path: Path) -> None:
    """CRAM-MD5 or SCRAM configured: every connection has its own unguessable nonce."""
    ctx = _context(tmp_path, {"mechanisms": ["PLAIN", "SCRAM-SHA-256"]})
    nonces = {ctx.settings_for("127.0.0.1", implicit_tls=False).sasl_nonce for _ in range(100)}
    assert len(nonces) == 100
    assert all(nonces)


def test_apop_gets_a_fresh_timestamp_per_greeting(tmp_path: Path) -> None:
    """RFC 1939 §7: the APOP timestamp differs for every greeting."""
    ctx = _context(tmp_path, {"apop": True})
    stamps = {ctx.settings_for("127.0.0.1", implicit_tls=False).apop_timestamp for _ in range(50)}
    assert len(stamps) == 50


def test_client_identity_is_never_shared(tmp_path: Path) -> None:
    """A verified certificate's user belongs to its connection only."""
    ctx = _context(tmp_path, {})
    alice = ctx.settings_for("127.0.0.1", implicit_tls=True, client_identity="alice")
    assert alice.client_identity == "alice"
    assert ctx.settings_for("127.0.0.1", implicit_tls=True).client_identity is None
