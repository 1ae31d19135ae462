"""Certificates for the TLS tests (made by trustme) and small TLS client helpers."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.integration.helpers import WAIT, RawClient


@dataclass
class Pki:
    """A test CA, a server certificate for localhost/127.0.0.1, files on disk."""

    ca: trustme.CA
    folder: Path
    ca_file: Path
    cert_file: Path
    key_file: Path

    def issue(self, name: str, *identities: str, ca: trustme.CA | None = None,
              common_name: str | None = None) -> tuple[Path, Path]:
        """Write a certificate for ``identities`` as ``name.crt``/``name.key``; return both."""
        leaf = (ca or self.ca).issue_cert(*identities, common_name=common_name)
        cert, key = self.folder / f"{name}.crt", self.folder / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def tls_section(self, **extra: object) -> dict[str, object]:
        """The ``[tls]`` config section for this server certificate."""
        return {"cert": str(self.cert_file), "key": str(self.key_file), **extra}


def make_pki(folder: Path) -> Pki:
    """Create a CA and a server certificate under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    pki = Pki(ca, folder, ca_file, folder / "server.crt", folder / "server.key")
    pki.issue("server", "localhost", "127.0.0.1")
    return pki


class TlsRawClient(RawClient):
    """A RawClient that can upgrade its socket to TLS (after STLS) or start in TLS."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext | None = None,
        server_hostname: str | None = "localhost",
    ) -> None:
        if context is None:
            super().__init__(host, port)
            return
        raw = socket.create_connection((host, port), timeout=WAIT)
        try:
            self.sock = context.wrap_socket(raw, server_hostname=server_hostname)
        except BaseException:
            raw.close()
            raise
        self.buf = b""
        self.greeting = self.line()

    def start_tls(self, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        """Do the TLS handshake on the current socket; anything still buffered is an error."""
        assert self.buf == b"", f"unread plaintext before the handshake: {self.buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)


def assert_treated_as_tls(client: RawClient) -> None:
    """The session counts as encrypted: CAPA offers USER but no STLS, and USER/PASS works."""
    client.send(b"CAPA\r\n")
    assert client.line().startswith(b"+OK")
    capa = client.multiline()
    assert b"STLS" not in capa
    assert b"USER" in capa
    assert client.login(b"alice", b"secret").startswith(b"+OK")
