"""Server TLS contexts: TLS 1.2+, the default certificate, SNI, client CA, reload.

Built on the stdlib ``ssl`` module only.  Rules:

* One *front* context object (:attr:`TlsContexts.context`) is handed to every listener
  and to every STLS upgrade, for the life of the process.  Its SNI callback runs on every
  ClientHello (with ``None`` when the client sent no name) and switches the handshake to
  the context of the current certificate for that name.  That is what makes
  :meth:`TlsContexts.reload` (SIGHUP) reach listeners started before it: new handshakes
  get the new certificates, sessions already established keep theirs, and a reload that
  fails keeps the old contexts and logs why.
* Contexts are built from ``PROTOCOL_TLS_SERVER``, not ``create_default_context``: the
  latter trusts the system CA store for client certificates, and a client certificate
  from *any* public CA would then pass for SASL EXTERNAL.  Only ``client_ca`` is trusted.
* With a client CA, a certificate is requested but optional (``CERT_OPTIONAL``): clients
  without one still log in with passwords; one that is presented must verify, or the
  handshake fails.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pop3d.config import CertPair, TlsConfig

log = logging.getLogger("pop3d.tls")


def _context(pair: CertPair, client_ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= (
        ssl.OP_NO_COMPRESSION  # CRIME
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a cheap DoS
    )
    ctx.load_cert_chain(pair.cert, pair.key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def certificate_identity(peercert: Mapping[str, Any] | None) -> str | None:
    """Return the user name of a verified client certificate, or ``None``.

    The subject's commonName, as Dovecot's default ``ssl_cert_username_field``; failing
    that, the first e-mail subjectAltName.  ``peercert`` is ``getpeercert()``'s dict,
    which the ``ssl`` module only fills for a certificate that verified against the
    client CA (it is empty when no CA is configured).
    """
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "email" and value:
            return str(value)
    return None


class TlsContexts:
    """The front SSLContext for new handshakes, switching to per-name contexts (SNI)."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self._default, self._by_name = self._build()
        #: The context listeners and STLS use; never replaced (see the module rules).
        self.context = self._default
        self.context.sni_callback = self._select

    def _build(self) -> tuple[ssl.SSLContext, dict[str, ssl.SSLContext]]:
        cfg = self.config
        default = _context(cfg.default, cfg.client_ca)
        by_name = {name: _context(pair, cfg.client_ca) for name, pair in cfg.sni.items()}
        return default, by_name

    def context_for(self, name: str | None) -> ssl.SSLContext:
        """Return the context whose certificate serves ``name`` (the default without one)."""
        if name:
            name = name.lower().rstrip(".")
            chosen = self._by_name.get(name)
            if chosen is None and "." in name:  # a wildcard entry "*.example.org"
                chosen = self._by_name.get("*." + name.split(".", 1)[1])
            if chosen is not None:
                return chosen
        return self._default

    def _select(
        self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        chosen = self.context_for(name)
        if sock.context is not chosen:
            sock.context = chosen
        return None

    def reload(self) -> bool:
        """Re-read every certificate; keep the old ones if any fails.  True on success."""
        try:
            default, by_name = self._build()
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS reload failed, keeping the old certificates: %s", exc)  # noqa: TRY400
            return False
        self._default, self._by_name = default, by_name
        log.info("TLS certificates reloaded")
        return True
