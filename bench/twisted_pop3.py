"""Twisted's POP3 server (twisted.mail) over the benchmark's Maildirs: the Python peer.

Runs from bench/.venv (``make bench-venv``).  Stock Twisted: the protocol
(``twisted.mail.pop3.POP3``), the portal, ``MaildirMailbox`` but for the fixes below, and by
default (``--checker twisted``) the password check, ``twisted.cred.checkers.FilePasswordDB``
with its defaults: it re-reads the passwd-file at every login (``cache=False``), which is
how it picks up a changed password, as pop3d notices a changed file.  ``--log FILE`` starts
Twisted's logging to FILE as twistd does (twistd.log), and Twisted's POP3 writes its own
lines per session there ("New connection from ...", "Authenticated login for ...").

Three bugs of Twisted are fixed here, or the load generator's checks would fail every RETR,
and the figures would not compare:
- ``MaildirMailbox.getMessage`` opens the file in text mode, so on Python 3 the byte
  transforms fail and RETR sends ``+OK`` and nothing more: the fix opens it binary;
- ``transformChunk`` stuffs per chunk, so a ``.`` line that starts a chunk (or the message)
  goes out unstuffed: the fix carries the last byte of the previous chunk;
- ``MaildirMailbox.listMessages`` reports file sizes (LF) instead of the octets sent
  (CRLF, RFC 1939 §11): the fix adds one octet per line, cached per file like an index.
Ours as well: TCP_NODELAY is set, as any tuned deployment would; the realm maps a user to
its Maildir; the passwd-file is Dovecot's (``user:{SCHEME}secret:...``): ``{PLAIN}``
goes through FilePasswordDB's stock ``hash`` comparison, ``{ARGON2ID}`` (which Twisted does
not know) is verified with argon2-cffi in a thread, off the reactor, as a Twisted deployment
would.  ``--checker cached`` swaps FilePasswordDB for ``PasswdFile``, ours, parsed once at
start; with no ``--log`` that is the best case (``twisted-tuned`` in the table).  Listens on
127.0.0.1 only.
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
from twisted.cred.checkers import FilePasswordDB, ICredentialsChecker
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


def _verify_argon2id(secret: bytes, username: bytes, password: bytes) -> Any:
    """Check ``password`` against an ``{ARGON2ID}`` secret in a thread, off the reactor."""
    import argon2  # noqa: PLC0415

    def verify() -> bytes:
        try:
            argon2.PasswordHasher().verify(secret[10:], password)
        except argon2.exceptions.VerificationError:
            raise error.UnauthorizedLogin from None
        return bytes(username)

    return threads.deferToThread(verify)


def _plain(_username: bytes, password: bytes, _stored: bytes) -> bytes:
    """FilePasswordDB's ``hash``: the network password as a ``{PLAIN}`` passwd-file field."""
    return b"{PLAIN}" + password


class DovecotFilePasswordDB(FilePasswordDB):
    """Twisted's FilePasswordDB (stock file read at every login, stock comparison), with
    ``{ARGON2ID}`` secrets verified in a thread."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), hash=_plain)

    def requestAvatarId(self, creds: Any) -> Any:
        try:
            u, p = self.getUser(creds.username)
        except KeyError:
            return defer.fail(error.UnauthorizedLogin())
        if p.startswith(b"{ARGON2ID}"):
            return _verify_argon2id(p, u, creds.password)
        # FilePasswordDB.requestAvatarId's own comparison, on the line just read (calling it
        # would read the file a second time)
        up = credentials.IUsernamePassword(creds, None)
        matched = up is not None and self.hash(up.username, up.password, p) == p
        return defer.succeed(matched).addCallback(self._cbPasswordMatch, u)


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
            return _verify_argon2id(secret.encode(), creds.username, creds.password)
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
    ap.add_argument(
        "--checker",
        choices=("twisted", "cached"),
        default="twisted",
        help="twisted: FilePasswordDB, the file read at every login (default); "
        "cached: PasswdFile, parsed once at start",
    )
    ap.add_argument(
        "--log", type=Path, metavar="FILE", help="Twisted's log, appended to FILE (as twistd.log)"
    )
    ap.add_argument("--verbose", action="store_true", help="log to stderr as well")
    a = ap.parse_args()
    if a.log:
        log.startLogging(a.log.open("a"), setStdout=False)
        if a.verbose:
            log.addObserver(log.FileLogObserver(sys.stderr).emit)
    elif a.verbose:
        log.startLogging(sys.stderr)
    checker = DovecotFilePasswordDB(a.users) if a.checker == "twisted" else PasswdFile(a.users)
    p = portal.Portal(Realm(a.mail), [checker])
    reactor.listenTCP(a.port, Factory(p), backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
