"""What pop3d counts, as one small API every part of the server calls.

The transport, the accept path and the LMTP listener report what happened through these
functions and nothing else; how the figures are kept and exposed (Prometheus text at
``[metrics] listen``, correct across worker processes) is this module's business alone.
Until metrics are enabled every function does nothing, at the cost of one call.

Labels are fixed vocabularies (never a user name or an address), so a hostile client
cannot grow the series without bound:

- ``connection_refused(cap)``: ``total``, ``per_ip``, ``handshakes``, ``proxy``.
- ``login(mechanism, result, seconds)``: ``mechanism`` as in the audit line (``USER``,
  ``APOP``, a SASL name); ``result`` ``ok``, ``failed`` or ``tempfail``; ``seconds`` from
  the credentials' arrival to the verdict.
- ``session_ended(result)``: ``quit`` (UPDATE done), ``quit_auth`` (QUIT before login),
  ``timeout``, ``disconnect``, ``error``, ``shutdown``, ``kicked``.
- ``lmtp_delivery(result)``: ``ok``, ``unknown_user``, ``over_quota``, ``tempfail``.
"""

from __future__ import annotations


def connection_refused(cap: str) -> None:
    """A connection was refused at accept by ``cap``."""


def tls_handshake(ok: bool) -> None:
    """A TLS handshake (POP3S or after STLS) ended, successfully or not."""


def login(mechanism: str, result: str, seconds: float) -> None:
    """An authentication reached its verdict."""


def session_ended(result: str) -> None:
    """A session ended."""


def retrieved(octets: int) -> None:
    """One message (RETR, or TOP) of ``octets`` wire octets was sent in full."""


def deleted(count: int) -> None:
    """UPDATE removed ``count`` messages."""


def lock_conflict() -> None:
    """A login found its maildrop locked by another session ([IN-USE])."""


def lmtp_delivery(result: str) -> None:
    """One LMTP recipient was answered."""
