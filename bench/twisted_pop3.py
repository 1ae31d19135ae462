"""Twisted's POP3 server (twisted.mail) over the benchmark's Maildirs: the Python peer.

Runs from bench/.venv (``make bench-venv``).  Three bugs of Twisted are fixed here, or the
load generator's checks would fail every RETR, and the figures would not compare:
- ``MaildirMailbox.getMessage`` opens the file in text mode, so on Python 3 the byte
  transforms fail and RETR sends ``+OK`` and nothing more: the fix opens it binary;
- ``transformChunk`` stuffs per chunk, so a ``.`` line that starts a chunk (or the message)
  goes out unstuffed: the fix carries the last byte of the previous chunk;
- ``MaildirMailbox.listMessages`` reports file sizes (LF) instead of the octets sent
  (CRLF, RFC 1939 §11): the fix adds one octet per line, cached per file like an index.
TCP_NODELAY is set, as any tuned deployment would.  Passwords come from the same Dovecot
passwd-file ({PLAIN} and {ARGON2ID}, the latter verified in a thread, as a Twisted
deployment would).  Listens on 127.0.0.1 only.
"""

# Twisted fixes the names and signatures of what is overridden here.
# ruff: noqa: N802, N815, ARG002

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, protocol, reactor, threads
from twisted.mail import maildir, pop3
from twisted.python import log
from zope.interface import implementer

_SIZES: dict[bytes, int] = {}


class Mailbox(maildir.MaildirMailbox):
    def _size(self, path: Any) -> int:
        if not path:
            return 0
        size = _SIZES.get(path)
        if size is None:
            data = Path(os.fsdecode(path)).read_bytes()
            size = len(data) + data.count(b"\n") - data.count(b"\r\n")
            _SIZES[path] = size
        return size

    def getMessage(self, i: int) -> Any:
        return Path(os.fsdecode(self.list[i])).open("rb")

    def listMessages(self, i: int | None = None) -> Any:
        if i is None:
            return [self._size(p) for p in self.list]
        return self._size(self.list[i])


class POP3(pop3.POP3):
    timeOut = 600

    def connectionMade(self) -> None:
        # Without this, Nagle holds the final ".\r\n" of every RETR until the client's
        # delayed ACK (40 ms): a tuned deployment turns it off, so we do.
        self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def transformChunk(self, chunk: bytes) -> bytes:
        prev = getattr(self, "_last", b"\n")
        if chunk:
            self._last = chunk[-1:]
        data = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if prev == b"\n" and data.startswith(b"."):
            data = b"." + data
        return data.replace(b"\r\n.", b"\r\n..")

    def do_RETR(self, i: Any) -> Any:
        self._last = b"\n"
        return super().do_RETR(i)


@implementer(ICredentialsChecker)
class PasswdFile:
    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, path: Path) -> None:
        self.users: dict[bytes, str] = {}
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                user, secret = line.split(":")[:2]
                self.users[user.encode()] = secret

    def requestAvatarId(self, creds: Any) -> Any:
        secret = self.users.get(creds.username)
        if secret is None:
            return defer.fail(error.UnauthorizedLogin())
        if secret.startswith("{PLAIN}"):
            ok = creds.password == secret[7:].encode()
            return defer.succeed(creds.username) if ok else defer.fail(error.UnauthorizedLogin())
        if secret.startswith("{ARGON2ID}"):
            import argon2  # noqa: PLC0415

            def verify() -> bytes:
                try:
                    argon2.PasswordHasher().verify(secret[10:], creds.password)
                except argon2.exceptions.VerificationError:
                    raise error.UnauthorizedLogin from None
                return bytes(creds.username)

            return threads.deferToThread(verify)
        return defer.fail(error.UnauthorizedLogin())


@implementer(portal.IRealm)
class Realm:
    def __init__(self, mail: Path) -> None:
        self.mail = mail

    def requestAvatar(self, avatar_id: bytes, mind: Any, *interfaces: Any) -> Any:
        path = self.mail / avatar_id.decode() / "Maildir"
        return pop3.IMailbox, Mailbox(os.fsencode(path)), lambda: None


class Factory(protocol.ServerFactory):
    def __init__(self, p: portal.Portal) -> None:
        self.portal = p

    def buildProtocol(self, addr: Any) -> POP3:
        proto = POP3()
        proto.factory = self
        proto.portal = self.portal
        return proto


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--users", type=Path, required=True)
    ap.add_argument("--mail", type=Path, required=True)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    if a.verbose:
        log.startLogging(sys.stderr)
    p = portal.Portal(Realm(a.mail), [PasswdFile(a.users)])
    reactor.listenTCP(a.port, Factory(p), backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
