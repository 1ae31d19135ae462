"""The scriptable test server behind the pytest fixtures and ``pop3d testserver``.

:class:`ScriptedPop3Server` is a :class:`~pop3d.testing.Pop3TestServer` (a real pop3d in a
thread of the test's process) with what a test of a mail *client* needs:

* ``srv.deliver(user, message)``: bytes, str or :class:`email.message.EmailMessage`; a
  user it names that does not exist yet is created with a random password, which
  ``srv.password(user)`` gives;
* ``srv.mailbox(user)``: the messages now in the maildrop, parsed
  (:class:`email.message.EmailMessage`, ``email.policy.default``);
* ``srv.transcript``: every session, client and server lines, passwords and SASL
  responses masked (:class:`~pop3d.testing.wire.Transcript`);
* TLS from a throwaway CA made with ``trustme``: STLS on ``srv.port``, implicit TLS on
  ``srv.tls_port``, the CA certificate a client should trust at ``srv.ca_cert_path``
  (``srv.client_context()`` is an ``ssl.SSLContext`` that trusts it);
* ``srv.faults``: the faults in force (:mod:`pop3d.testing.faults`), changeable while the
  server runs: ``srv.faults.add("login", code="IN-USE", user="alice", times=1)``;
* ``srv.reset()``: no mail, no faults, no transcript (the users stay).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import poplib
import secrets
import shutil
import ssl
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

from pop3d import config as config_mod
from pop3d.testing.backends import ScriptedContext
from pop3d.testing.embedded import Pop3TestServer
from pop3d.testing.faults import FaultTable
from pop3d.testing.wire import Recorder, Transcript

__all__ = ["ScriptedPop3Server", "as_bytes"]

#: The name the test certificates are for (and the host clients should check).
CERT_HOST = "localhost"


def as_bytes(message: bytes | str | Message) -> bytes:
    """A message as stored: bytes as given, str as UTF-8, an email message with CRLFs."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        return message.encode("utf-8")
    if isinstance(message, Message):
        return message.as_bytes(policy=email.policy.SMTP)
    raise TypeError(f"a message is bytes, str or an email message, not {type(message)}")


class _Certificates:
    """A throwaway CA and the server certificates it issues (good, expired, wrong host)."""

    def __init__(self, folder: Path) -> None:
        import trustme  # noqa: PLC0415 (only a server with TLS needs it)

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name="pop3d test CA")
        self.ca_path = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.cert_path = folder / "server.pem"
        self.key_path = folder / "server.key"
        self.current = ""
        self.install("good")

    def install(self, problem: str) -> bool:
        """Write the certificate for ``problem`` (good, expired, wrong-host); False if same."""
        if problem == self.current:
            return False
        now = datetime.now(UTC)
        if problem == "expired":
            cert = self.ca.issue_cert(
                CERT_HOST, "127.0.0.1", common_name=CERT_HOST,
                not_before=now - timedelta(days=30), not_after=now - timedelta(days=1),
            )
        elif problem == "wrong-host":
            cert = self.ca.issue_cert("wrong-host.invalid", common_name="wrong-host.invalid")
        else:
            cert = self.ca.issue_cert(CERT_HOST, "127.0.0.1", common_name=CERT_HOST)
        cert.private_key_pem.write_to_path(str(self.key_path))
        self.key_path.chmod(0o600)
        with self.cert_path.open("wb") as out:
            for blob in cert.cert_chain_pems:
                out.write(blob.bytes())
        self.current = problem
        return True


class ScriptedPop3Server(Pop3TestServer):
    """A real pop3d with mail helpers, transcripts, TLS and faults (see the module head).

    Args:
        root: folder for the passwd-file, the Maildirs and the certificates.
        users: user name -> password (more are made by :meth:`deliver`, :meth:`password`).
        tls: make a throwaway CA and serve STLS and implicit TLS (needs ``trustme``).
        port, tls_port: where to listen (0: a free port the kernel picks).
        **overrides: config keys of ``[server]``, ``[auth]``, ``[storage]`` (as
            :class:`~pop3d.testing.Pop3TestServer`).

    """

    def __init__(
        self,
        root: Path | str,
        users: Mapping[str, str] | None = None,
        *,
        tls: bool = True,
        port: int = 0,
        tls_port: int = 0,
        sections: Mapping[str, Mapping[str, object]] | None = None,
        start_timeout: float = 10.0,
        **overrides: object,
    ) -> None:
        root = Path(root)
        more: dict[str, dict[str, object]] = {k: dict(v) for k, v in (sections or {}).items()}
        self.certificates: _Certificates | None = None
        if tls:
            self.certificates = _Certificates(root / "tls")
            more.setdefault("tls", {}).update(
                cert=str(self.certificates.cert_path), key=str(self.certificates.key_path)
            )
            overrides.setdefault("tls_listen", [f"{CERT_HOST}:0"])
        super().__init__(root, users, sections=more, start_timeout=start_timeout, **overrides)
        if port or tls_port:  # fixed ports (pop3d testserver --pop3-port ...)
            server = self._sections["server"]
            server["listen"] = [f"{self.host}:{port}"]
            if tls:
                server["tls_listen"] = [f"{self.host}:{tls_port}"]
            self.config = config_mod.from_mapping(self._sections, self.root)
        #: The faults in force (:mod:`pop3d.testing.faults`).
        self.faults = FaultTable()
        self.faults.on_change = self._faults_changed
        #: Every session served, oldest first.
        self.transcript = Transcript()
        self._recorder = Recorder(self.faults, self.transcript)

    def _serve_options(self) -> dict[str, Any]:
        faults, recorder = self.faults, self._recorder

        def context(config: Any, backends: Any, tls: Any) -> ScriptedContext:
            return ScriptedContext(config, backends, tls, faults=faults, recorder=recorder)

        return {"context": context}

    # ------------------------------------------------------------------ TLS

    @property
    def ca_cert_path(self) -> Path:
        """The CA certificate (PEM) a client under test should trust."""
        if self.certificates is None:
            raise RuntimeError("this server has no TLS (tls=False)")
        return self.certificates.ca_path

    def client_context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` that trusts :attr:`ca_cert_path` (and nothing else)."""
        return ssl.create_default_context(cafile=str(self.ca_cert_path))

    def _faults_changed(self) -> None:
        certificates = self.certificates
        if certificates is None:
            return
        fault = self.faults.find("certificate")
        if not certificates.install(fault.params["problem"] if fault else "good"):
            return
        context, loop = self.context, self._loop
        if context is None or context.tls is None or loop is None:
            return  # not started yet: the server reads the files when it starts
        tls = context.tls

        async def reload() -> bool:
            return tls.reload()

        if not asyncio.run_coroutine_threadsafe(reload(), loop).result(timeout=10):
            raise RuntimeError("the test server could not load its new certificate")

    # ------------------------------------------------------------------ users and mail

    def password(self, user: str) -> str:
        """``user``'s password; a user who does not exist yet is made, with a random one."""
        known = self._users.get(user)
        if known is None:
            known = secrets.token_urlsafe(12)
            self.set_user(user, known)
        return known

    @property
    def users(self) -> dict[str, str]:
        """User name -> password."""
        return dict(self._users)

    def deliver(self, user: str, message: bytes | str | Message) -> Path:
        """Put ``message`` in ``user``'s maildrop (making the user if new); return its file."""
        self.password(user)
        return self.add_message(user, as_bytes(message))

    def mailbox(self, user: str) -> list[EmailMessage]:
        """The messages in ``user``'s maildrop now, parsed, in delivery order."""
        parsed = []
        for data in self.messages(user):
            message = email.message_from_bytes(data, policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            parsed.append(message)
        return parsed

    def delete(self, user: str, index: int | None = None) -> int:
        """Remove message ``index`` (0-based; None: all) of ``user``; return how many."""
        paths = self.message_paths(user)
        chosen = paths if index is None else [paths[index]]
        for path in chosen:
            path.unlink(missing_ok=True)
        return len(chosen)

    def reset(self) -> None:
        """Empty every maildrop, remove every fault, forget the transcript."""
        self.faults.clear()
        for user in self._users:
            root = self.maildir(user)
            for sub in ("new", "cur", "tmp"):
                shutil.rmtree(root / sub, ignore_errors=True)
            self.maildir(user)
        self.transcript.clear()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no session is open and every maildrop lock is released.

        After a client hangs up (or a fault cut it off) the server ends its session a
        moment later; a test that logs in again at once can find the maildrop still
        locked, as a real client would.
        """
        context = self.context
        if context is None:
            return
        deadline = time.monotonic() + timeout
        while context.connections or context._tasks:  # noqa: SLF001 (our own server's)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"sessions still open after {timeout} s")
            time.sleep(0.01)

    # ------------------------------------------------------------------ clients

    def client(self, user: str | None = None, *, tls: str = "none",
               timeout: float = 10.0) -> poplib.POP3:
        """A ``poplib`` client logged in as ``user`` (default: the first user).

        ``tls``: ``"none"``, ``"stls"`` (upgrade with STLS) or ``"implicit"`` (POP3S).
        """
        if user is None:
            user = next(iter(self._users), "alice")
        password = self.password(user)
        client: poplib.POP3
        if tls == "implicit":
            client = poplib.POP3_SSL(self.host, self.tls_port, timeout=timeout,
                                     context=self.client_context())
        else:
            client = poplib.POP3(self.host, self.port, timeout=timeout)
            if tls == "stls":
                client.stls(self.client_context())
        try:
            client.user(user)
            client.pass_(password)
        except BaseException:
            client.close()
            raise
        return client
