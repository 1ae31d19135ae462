"""Mail storage backends: where a user's mail lives and how it is read, locked and changed."""

from __future__ import annotations

from pop3d.protocol.values import MessageInfo
from pop3d.storage.base import Deliverer, Maildrop, MailStore

__all__ = ["Deliverer", "MailStore", "Maildrop", "MessageInfo"]
