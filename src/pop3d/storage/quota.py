"""Per-user storage quota: which limit applies to a delivery.

Rules of this file:

* The store's default (``[storage] quota``, octets, ``None`` = unlimited) applies unless
  the user's record overrides it with an extra field ``quota``, ``quota_rule`` or
  ``userdb_quota_rule`` (the first present wins).
* An override is a plain size (``100M``, ``1048576``) or Dovecot's rule form
  ``*:storage=100M``; Dovecot's ``*:ignore``, ``*:storage=0``, ``0``, ``none`` and
  ``unlimited`` mean no limit.  Sizes are octets with optional K/M/G/T suffixes, as
  :func:`pop3d.config.parse_size` reads them (Dovecot 2.x also counts bare numbers in octets).
* A field that cannot be read is a :class:`TemporaryBackendError`: the MTA retries while
  the operator fixes the record, and no mail is bounced or accepted over an unknown limit.
* Usage is counted in wire octets (what LIST/STAT report), so what a user sees in STAT is
  what the quota limits.
"""

from __future__ import annotations

from collections.abc import Mapping

from pop3d.config import parse_size
from pop3d.errors import ConfigError, TemporaryBackendError

#: Extra fields of a user record that carry a quota, in order of precedence.
QUOTA_FIELDS = ("quota", "quota_rule", "userdb_quota_rule")

_UNLIMITED = frozenset({"", "0", "none", "unlimited", "ignore", "noenforcing"})


def parse_quota(value: str) -> int | None:
    """Read a quota field: octets, or ``None`` for no limit.

    Raises:
        TemporaryBackendError: the value is neither a size nor a Dovecot storage rule.

    """
    text = value.strip()
    if text.startswith("*:"):
        text = text[2:].strip()
        if text.lower().startswith("storage="):
            text = text[len("storage=") :]
        elif text.lower() not in _UNLIMITED:
            raise TemporaryBackendError("unreadable quota rule in the user record")
    if text.lower() in _UNLIMITED:
        return None
    try:
        limit = parse_size(text, "quota")
    except ConfigError:
        raise TemporaryBackendError("unreadable quota in the user record") from None
    return limit or None


def quota_for(attributes: Mapping[str, str], default: int | None) -> int | None:
    """Return the limit in octets for a user with these record fields; ``None`` = unlimited.

    Raises:
        TemporaryBackendError: the user's quota field cannot be read.

    """
    for name in QUOTA_FIELDS:
        if name in attributes:
            return parse_quota(attributes[name])
    return default
