"""The asyncio transport: listeners, one protocol object per client, TLS contexts."""

from __future__ import annotations
