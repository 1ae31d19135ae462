"""Server TLS contexts: TLS 1.2+, the default certificate, SNI, client CA, reload.

Built on the stdlib ``ssl`` module only.  :meth:`TlsContexts.reload` re-reads every
certificate (SIGHUP): new handshakes use the new ones, sessions already established keep
theirs, and a reload that fails keeps the old contexts and logs why.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from pop3d.config import CertPair, TlsConfig

log = logging.getLogger("pop3d.tls")


def _context(pair: CertPair, client_ca: object) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(pair.cert, pair.key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        # Ask for a certificate, but let clients without one use passwords (EXTERNAL is
        # only offered to those that presented a valid one).
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class TlsContexts:
    """The current SSLContext for new handshakes, with per-name contexts for SNI."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self.context, self._by_name = self._build()

    def _build(self) -> tuple[ssl.SSLContext, dict[str, ssl.SSLContext]]:
        cfg = self.config
        default = _context(cfg.default, cfg.client_ca)
        by_name = {name: _context(pair, cfg.client_ca) for name, pair in cfg.sni.items()}
        if by_name:
            default.sni_callback = self._select
        return default, by_name

    def _select(
        self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        if name:
            chosen = self._by_name.get(name.lower())
            if chosen is None and "." in name:  # a wildcard entry "*.example.org"
                chosen = self._by_name.get("*." + name.lower().split(".", 1)[1])
            if chosen is not None:
                sock.context = chosen
        return None

    def reload(self) -> bool:
        """Re-read every certificate; keep the old ones if any fails.  True on success."""
        try:
            context, by_name = self._build()
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS reload failed, keeping the old certificates: %s", exc)  # noqa: TRY400
            return False
        # Existing listeners hold the old default context object: swap its SNI target
        # table in place, and point its callback at the new contexts.
        self._by_name = by_name
        self.context.sni_callback = self._reload_select(context)
        log.info("TLS certificates reloaded")
        return True

    def _reload_select(
        self, new_default: ssl.SSLContext
    ) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]:
        def select(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> int | None:
            sock.context = new_default
            return self._select(sock, name, ctx)

        return select
