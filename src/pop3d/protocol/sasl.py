"""SASL mechanisms (RFC 4422) as sans-I/O step machines: PLAIN, LOGIN, CRAM-MD5, SCRAM, EXTERNAL.

A mechanism object lives for one ``AUTH`` exchange.  The core feeds it the decoded client
messages and performs what each step returns:

* :class:`Challenge` — send ``+ base64(data)`` and wait for the client's next line;
* :class:`CheckPassword` — the mechanism carried a password (PLAIN, LOGIN): verify it;
* :class:`NeedSecret` — look up the user's stored secret in ``scheme`` and hand it to
  :meth:`Mechanism.secret` (CRAM-MD5, SCRAM-SHA-256);
* :class:`Outcome` — the mechanism has decided (``success``) who the client is;
* :class:`Failed` — the client's message was malformed: answer ``-ERR``, exchange over.

Rules this file keeps:

* No clock, no randomness, no I/O: challenges and nonces are given to the constructor by
  the core, which gets them from its settings (the driver makes them).
* Every comparison of a proof is constant-time (``hmac.compare_digest``).
* No secret or client message is kept in a ``repr`` or in a reason text.
* Authorization identities: a client may only act as itself.  PLAIN's authzid and SCRAM's
  ``a=`` must be empty or equal the authentication identity; EXTERNAL's must be empty or
  equal the certificate identity.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import ClassVar

from pop3d.protocol.digests import ScramSecret, verify_cram_md5
from pop3d.protocol.limits import MAX_USERNAME

# --------------------------------------------------------------------------- steps


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` to the client as a ``+`` continuation and wait for its response."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CheckPassword:
    """Verify ``password`` for ``username`` (the exchange is over)."""

    username: str
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class NeedSecret:
    """Look up ``username``'s secret in ``scheme``; report it to :meth:`Mechanism.secret`."""

    username: str
    scheme: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """The mechanism's verdict on ``username`` (the exchange is over)."""

    username: str
    success: bool
    #: Why it failed, for the log (never sent, never holds client bytes).
    reason: str = ""

    @property
    def audit_reason(self) -> str:
        """The audit line's ``reason=`` word (:mod:`pop3d.audit`) for a refusal.

        Every refusal a mechanism judges (wrong digest or proof, an unknown user's decoy,
        a foreign authorization identity) is ``bad-password``: which one it was is for
        the server log (:attr:`reason`), never for the client or fail2ban to tell apart.
        """
        return "bad-password"


@dataclass(frozen=True, slots=True)
class Failed:
    """The client's message is malformed; ``reason`` is our ``-ERR`` text."""

    reason: str


Step = Challenge | CheckPassword | NeedSecret | Outcome | Failed


def _username(raw: bytes) -> str | None:
    """Decode an identity: UTF-8, 1..MAX_USERNAME octets, no control characters."""
    if not raw or len(raw) > MAX_USERNAME:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


# --------------------------------------------------------------------------- the base


@dataclass(frozen=True, slots=True)
class Setting:
    """What a connection gives a new exchange (see :meth:`Mechanism.create`)."""

    #: Unique to the exchange and unguessable (the core's ``sasl_nonce``, plus a counter).
    nonce: str
    #: The server's host name (CRAM-MD5's challenge).
    hostname: str
    #: The verified TLS client certificate's user name, if any.
    client_identity: str | None


class Mechanism:
    """One SASL exchange.  Subclasses implement :meth:`start` and :meth:`step`.

    Each class declares what it needs of the connection (:attr:`plaintext`,
    :attr:`needs_nonce`, :attr:`needs_certificate`); the core offers a mechanism where
    those are met (:func:`usable`).  :data:`REGISTRY` names them all.
    """

    #: The IANA name, as in ``AUTH name`` and in CAPA's ``SASL`` line.
    name: ClassVar[str] = ""
    #: Whether the mechanism sends a password the server sees in the clear (RFC 4616 §4:
    #: such mechanisms need a protected channel: the plaintext policy applies to them).
    plaintext: ClassVar[bool] = False
    #: Whether its challenge must be unique to the exchange (CRAM-MD5, SCRAM).
    needs_nonce: ClassVar[bool] = False
    #: Whether it authenticates by the verified TLS client certificate (EXTERNAL).
    needs_certificate: ClassVar[bool] = False

    @classmethod
    def create(cls, setting: Setting) -> Mechanism:
        """A new exchange on a connection with ``setting``."""
        del setting
        return cls()

    def start(self, initial: bytes | None) -> Step:
        """Begin; ``initial`` is the decoded initial response (``None``: none was sent)."""
        raise NotImplementedError

    def step(self, response: bytes) -> Step:
        """Take the client's decoded response to the last :class:`Challenge`."""
        raise NotImplementedError

    def secret(self, secret: bytes | None) -> Step:  # noqa: ARG002
        """Take the secret a :class:`NeedSecret` asked for (``None``: there is none)."""
        return Failed("unexpected secret")


# --------------------------------------------------------------------------- PLAIN


class Plain(Mechanism):
    """RFC 4616: ``[authzid] NUL authcid NUL passwd`` in one message."""

    name = "PLAIN"
    plaintext = True

    def start(self, initial: bytes | None) -> Step:
        """PLAIN is client-first: without an initial response, send an empty challenge."""
        return Challenge(b"") if initial is None else self.step(initial)

    def step(self, response: bytes) -> Step:
        """Parse the message; the password is for the core to verify."""
        parts = response.split(b"\x00")
        if len(parts) != 3:
            return Failed("malformed PLAIN message")
        authzid, authcid, passwd = parts
        username = _username(authcid)
        if username is None or not passwd:
            return Failed("malformed PLAIN message")
        if authzid and authzid != authcid:
            return Outcome(username, success=False, reason="authzid differs from authcid")
        return CheckPassword(username, passwd)


# --------------------------------------------------------------------------- LOGIN


class Login(Mechanism):
    """The LOGIN mechanism (draft-murchison-sasl-login): user name, then password."""

    name = "LOGIN"
    plaintext = True
    USERNAME_PROMPT: ClassVar[bytes] = b"Username:"
    PASSWORD_PROMPT: ClassVar[bytes] = b"Password:"

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> Step:
        """Ask for the user name, or take it from the initial response (curl does)."""
        return Challenge(self.USERNAME_PROMPT) if initial is None else self.step(initial)

    def step(self, response: bytes) -> Step:
        """First the user name, then the password."""
        if self._username is None:
            username = _username(response)
            if username is None:
                return Failed("malformed LOGIN user name")
            self._username = username
            return Challenge(self.PASSWORD_PROMPT)
        if not response:
            return Failed("empty LOGIN password")
        return CheckPassword(self._username, response)


# --------------------------------------------------------------------------- CRAM-MD5

#: What a CRAM-MD5 digest is checked against when there is no secret: MD5 states no
#: password yields in practice; the check's outcome is discarded anyway.
_NO_CRAM_CONTEXT = bytes(32)


class CramMd5(Mechanism):
    """RFC 2195: the server sends a unique challenge; the client answers ``user hexdigest``."""

    name = "CRAM-MD5"
    needs_nonce = True

    @classmethod
    def create(cls, setting: Setting) -> Mechanism:
        """The challenge is ``<nonce@hostname>`` (RFC 2195)."""
        return cls(f"<{setting.nonce}@{setting.hostname}>".encode())

    def __init__(self, challenge: bytes) -> None:
        #: ``<unique.timestamp@host>``, made by the core from its nonce.
        self.challenge = challenge
        self._username: str | None = None
        self._digest = ""

    def start(self, initial: bytes | None) -> Step:
        """CRAM-MD5 is server-first: an initial response is a protocol error."""
        if initial is not None:
            return Failed("CRAM-MD5 takes no initial response")
        return Challenge(self.challenge)

    def step(self, response: bytes) -> Step:
        """Parse ``user SP digest``; the digest is checked against the stored secret."""
        if self._username is not None:
            return Failed("unexpected CRAM-MD5 message")
        user, sep, digest = response.rpartition(b" ")
        username = _username(user)
        if not sep or username is None or len(digest) != 32:
            return Failed("malformed CRAM-MD5 response")
        self._username = username
        self._digest = digest.decode("ascii", "replace")
        return NeedSecret(username, "CRAM-MD5")

    def secret(self, secret: bytes | None) -> Step:
        """Compare the client's digest with HMAC-MD5(secret, challenge).

        Without a secret (``None``: an authenticator that has no decoys) the digest is
        still computed, against a context that matches nothing, so that an unknown user
        costs what a wrong digest costs.
        """
        assert self._username is not None
        usable = secret is not None and len(secret) == 32
        context = secret if secret is not None and usable else _NO_CRAM_CONTEXT
        good = verify_cram_md5(context, self.challenge, self._digest) and usable
        return Outcome(self._username, success=good, reason="" if good else "wrong digest")


# --------------------------------------------------------------------------- SCRAM


def _scram_attributes(message: bytes) -> list[tuple[str, str]] | None:
    """Split ``a=x,b=y`` into (name, value) pairs; None when malformed or not ASCII."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        return None
    out = []
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if not eq or len(name) != 1 or not name.isalpha() or not name.isascii():
            return None
        out.append((name, value))
    return out


def _saslname(value: str) -> str | None:
    """RFC 5802 §5.1: ``=2C`` is a comma and ``=3D`` an equals sign; any other ``=`` is bad."""
    out = value.replace("=2C", ",").replace("=3D", "=")
    if "=" in value.replace("=2C", "").replace("=3D", ""):
        return None
    return out


class _Scram(enum.Enum):
    """Where a SCRAM exchange is: what it waits for next."""

    FIRST = enum.auto()  # the client-first message
    SECRET = enum.auto()  # the user's secret (NeedSecret)
    FINAL = enum.auto()  # the client-final message
    VERIFIED = enum.auto()  # the client's empty answer to the server-final message
    DONE = enum.auto()


class ScramSha256(Mechanism):
    """RFC 5802 with SHA-256 (RFC 7677), without channel binding (no ``-PLUS``)."""

    name = "SCRAM-SHA-256"
    needs_nonce = True
    hash_name: ClassVar[str] = "sha256"

    @classmethod
    def create(cls, setting: Setting) -> Mechanism:
        """The server nonce is the connection's."""
        return cls(setting.nonce)

    def __init__(self, server_nonce: str) -> None:
        #: Printable, no comma (RFC 5802 §5.1 ``r=``); made by the core from its nonce.
        self.server_nonce = server_nonce
        self._state = _Scram.FIRST
        self._username = ""
        self._gs2_header = b""
        self._client_first_bare = b""
        self._server_first = b""
        self._nonce = ""
        self._secret: ScramSecret | None = None

    def start(self, initial: bytes | None) -> Step:
        """SCRAM is client-first: without an initial response, send an empty challenge."""
        return Challenge(b"") if initial is None else self.step(initial)

    def step(self, response: bytes) -> Step:
        """client-first, then client-final, then the empty answer to the server-final."""
        match self._state:
            case _Scram.FIRST:
                return self._client_first(response)
            case _Scram.FINAL:
                return self._client_final(response)
            case _Scram.VERIFIED:
                # RFC 5034 has no "additional data with success": the server-final went
                # out as a challenge, and the client acknowledges it with an empty line.
                if response:
                    return Failed("unexpected SCRAM message")
                self._state = _Scram.DONE
                return Outcome(self._username, success=True)
        return Failed("unexpected SCRAM message")

    def _client_first(self, message: bytes) -> Step:
        # gs2-header: cbind-flag "," [authzid] ","
        flag, _, rest = message.partition(b",")
        authzid_field, sep, bare = rest.partition(b",")
        if not sep or flag not in (b"n", b"y"):
            # "p=..." asks for channel binding, which we do not offer.
            return Failed("unsupported SCRAM channel binding")
        attrs = _scram_attributes(bare)
        if attrs is None or len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            return Failed("malformed SCRAM client-first message")
        if any(name == "m" for name, _ in attrs):  # RFC 5802: mandatory extensions we lack
            return Failed("unsupported SCRAM extension")
        user = _saslname(attrs[0][1])
        username = _username(user.encode()) if user is not None else None
        client_nonce = attrs[1][1]
        if username is None or not client_nonce or not client_nonce.isprintable():
            return Failed("malformed SCRAM client-first message")
        if authzid_field:
            authz = _saslname(authzid_field.decode("utf-8", "replace").removeprefix("a="))
            if not authzid_field.startswith(b"a=") or authz is None:
                return Failed("malformed SCRAM client-first message")
            if authz != username:
                return Outcome(username, success=False, reason="authzid differs from authcid")
        self._username = username
        self._gs2_header = flag + b"," + authzid_field + b","
        self._client_first_bare = bare
        self._nonce = client_nonce + self.server_nonce
        self._state = _Scram.SECRET
        return NeedSecret(username, self.name)

    def secret(self, secret: bytes | None) -> Step:
        """Send the server-first message with the user's salt and iteration count.

        Unknown users never get here with ``None`` from pop3d's driver: it hands over a
        fake secret with a stable salt (RFC 5802 §5.1), so the challenge does not tell
        who exists.  ``None`` is still handled: the exchange fails at once.
        """
        if self._state is not _Scram.SECRET:
            return Failed("unexpected secret")
        parsed = (
            ScramSecret.decode(secret, hashlib.new(self.hash_name).digest_size)
            if secret is not None
            else None
        )
        if parsed is None:
            return Outcome(self._username, success=False, reason="no SCRAM secret")
        self._secret = parsed
        self._server_first = (
            f"r={self._nonce},s={base64.b64encode(parsed.salt).decode('ascii')},"
            f"i={parsed.iterations}"
        ).encode()
        self._state = _Scram.FINAL
        return Challenge(self._server_first)

    def _client_final(self, message: bytes) -> Step:
        assert self._secret is not None
        without_proof, sep, proof_attr = message.rpartition(b",p=")
        attrs = _scram_attributes(without_proof) if sep else None
        if attrs is None or len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            return Failed("malformed SCRAM client-final message")
        try:
            binding = base64.b64decode(attrs[0][1], validate=True)
            proof = base64.b64decode(proof_attr, validate=True)
        except (binascii.Error, ValueError):
            return Failed("malformed SCRAM client-final message")
        if not hmac.compare_digest(binding, self._gs2_header):
            return Failed("SCRAM channel binding mismatch")
        if not hmac.compare_digest(attrs[1][1].encode(), self._nonce.encode()):
            return Failed("SCRAM nonce mismatch")
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof
        secret = self._secret
        signature = hmac.digest(secret.stored_key, auth_message, self.hash_name)
        if len(proof) != len(signature):
            return Outcome(self._username, success=False, reason="wrong proof")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        stored = hashlib.new(self.hash_name, client_key).digest()
        if not hmac.compare_digest(stored, secret.stored_key):
            return Outcome(self._username, success=False, reason="wrong proof")
        server_signature = hmac.digest(secret.server_key, auth_message, self.hash_name)
        self._state = _Scram.VERIFIED
        return Challenge(b"v=" + base64.b64encode(server_signature))


# --------------------------------------------------------------------------- EXTERNAL


class External(Mechanism):
    """RFC 4422 Appendix A: the identity is the verified TLS client certificate's."""

    name = "EXTERNAL"
    needs_certificate = True

    @classmethod
    def create(cls, setting: Setting) -> Mechanism:
        """The identity is the certificate's (offered only with one: :func:`usable`)."""
        if setting.client_identity is None:
            raise ValueError("EXTERNAL needs a verified client certificate")
        return cls(setting.client_identity)

    def __init__(self, identity: str) -> None:
        #: The user name the driver took from the verified client certificate.
        self.identity = identity

    def start(self, initial: bytes | None) -> Step:
        """The message is the requested authzid (empty: act as the certificate's user)."""
        return Challenge(b"") if initial is None else self.step(initial)

    def step(self, response: bytes) -> Step:
        """Accept an empty authzid or the certificate identity itself."""
        if not response:
            return Outcome(self.identity, success=True)
        authzid = _username(response)
        if authzid is None:
            return Failed("malformed EXTERNAL authorization identity")
        if authzid != self.identity:
            return Outcome(self.identity, success=False, reason="authzid differs from certificate")
        return Outcome(self.identity, success=True)


#: Every mechanism pop3d implements, by name.
REGISTRY: dict[str, type[Mechanism]] = {
    m.name: m for m in (ScramSha256, CramMd5, Plain, Login, External)
}


def usable(
    mechanism: type[Mechanism], *, plaintext_ok: bool, nonce: bool, certificate: bool
) -> bool:
    """Whether ``mechanism`` can run on a connection with these properties."""
    return (
        (plaintext_ok or not mechanism.plaintext)
        and (nonce or not mechanism.needs_nonce)
        and (certificate or not mechanism.needs_certificate)
    )


def decode_response(line: bytes) -> bytes | None:
    """Decode one client line of an exchange (or an initial response) from base64.

    ``=`` is the empty response (RFC 5034 §4 for initial responses; curl also sends it on
    a continuation line).  Returns ``None`` for invalid base64.
    """
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


def encode_challenge(data: bytes) -> bytes:
    """Return the ``+ base64`` continuation line for ``data`` (``+ `` when empty)."""
    return b"+ " + base64.b64encode(data) + b"\r\n"
