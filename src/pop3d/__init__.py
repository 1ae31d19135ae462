"""pop3d: a POP3 server (RFC 1939, 2449, 2595, 5034, 8314) with a sans-I/O protocol core."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
