"""Authentication backends: who the client is (not where its mail lives)."""

from __future__ import annotations

from pop3d.auth.base import Authenticator
from pop3d.protocol.values import Principal

__all__ = ["Authenticator", "Principal"]
