r"""The authentication audit line: one fixed shape for every failure, for fail2ban and SIEMs.

Every refused authentication, whatever the mechanism or the reason, is logged by
:func:`auth_failed` at the moment the verdict is reached (not after the failure delay, which
a client can cut short by hanging up), as one WARNING line of the ``pop3d.auth`` logger::

    auth failed: user="alice" rip=192.0.2.7 mech=PLAIN reason=bad-password tls=no

``user`` is quoted with ``"`` and ``\\`` escaped and control characters shown as ``\\xNN``
(the name is client input); ``rip`` is the client's address (from the PROXY header when
there is one); ``mech`` is ``USER``, ``APOP`` or the SASL mechanism name; ``reason`` is one
word: ``bad-password``, ``unknown-mech``, ``cleartext-refused``, ``too-many-attempts``,
``malformed``, ``cancelled``, ``tempfail``; ``tls`` is ``no`` or the protocol version
(``TLSv1.3``).  The shape is stable across versions: tools parse it.
"""

from __future__ import annotations

from pop3d import logsetup

log = logsetup.get_logger("pop3d.auth")


def quote(text: str) -> str:
    """``text`` in double quotes, safe to put on one log line."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and ch not in "\r\n":
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return '"' + "".join(out) + '"'


def auth_failed(user: str, rip: str, mech: str, reason: str, tls: str | None) -> None:
    """Log one refused authentication (see the module's docstring for the shape).

    The fields also travel with the record (``audit``), for the JSON lines of
    ``[log] format = "json"``.  A WARNING is written at once, never held for a batch.
    """
    log.warning(
        "auth failed: user=%s rip=%s mech=%s reason=%s tls=%s",
        quote(user),
        rip,
        mech,
        reason,
        tls or "no",
        extra={
            "audit": {
                "event": "auth_failed",
                "user": user,
                "rip": rip,
                "mech": mech,
                "reason": reason,
                "tls": tls or "no",
            }
        },
    )
