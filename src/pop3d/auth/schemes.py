"""Dovecot password schemes: verify ``{SCHEME}data`` strings, make new ones.

A stored password is ``{SCHEME}data`` or, with no braces, a crypt(3) string (Dovecot's
default scheme for passwd-file is CRYPT).  Scheme names are case-insensitive, and a
``.HEX``/``.B64``/``.BASE64`` suffix (``{PLAIN.B64}``, ``{SHA256.HEX}``) names the encoding
of the raw bytes.  Without a suffix, schemes with a fixed raw length guess the encoding the
way Dovecot's ``password_decode()`` does: hex when the data is exactly twice the raw length,
else base64.

Rules of this module:

* Algorithms come from libraries (libpass for the crypt family, bcrypt, libsodium via
  PyNaCl and argon2-cffi for Argon2, hashlib).  The one exception is the MD5 compression
  function behind Dovecot's CRAM-MD5 scheme, which stores HMAC-MD5's inner and outer MD5
  *states*: hashlib cannot export or resume a state, so a small pure-Python MD5 lives
  here, checked against RFC 1321.
* Every comparison of secrets is constant-time (:func:`hmac.compare_digest`).
* Nothing here logs or formats a password or a stored hash; a malformed hash is simply a
  failed verification (as in Dovecot, which answers "password mismatch").
* :func:`is_slow` says which verifications cost milliseconds (crypt, bcrypt, argon2,
  PBKDF2, SCRAM) so the authenticator can run them off the event loop; the rest (PLAIN,
  salted SHA, CRAM-MD5) cost microseconds and run inline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Final

import argon2
import bcrypt
import nacl.exceptions
import nacl.pwhash
from passlib.hash import des_crypt, md5_crypt, sha256_crypt, sha512_crypt

from pop3d.protocol.digests import (
    SCRAM_ITERATIONS,
    ScramSecret,
    cram_md5_context,
    cram_md5_digest,
    verify_apop,
    verify_cram_md5,
)

__all__ = [
    "GENERATED_SCHEMES",
    "SCRAM_ITERATIONS",
    "ScramSecret",
    "cost_class",
    "cram_md5_context",
    "cram_md5_digest",
    "cram_md5_secret",
    "dummy_verify",
    "hash_password",
    "is_slow",
    "is_supported",
    "plain_secret",
    "scheme_of",
    "scram_salt",
    "scram_sha256_secret",
    "stored_cram_md5",
    "verify",
    "verify_apop",
    "verify_cram_md5",
]

#: bcrypt reads at most 72 octets of a password; Dovecot's crypt_blowfish silently ignores
#: the rest, while bcrypt >= 5 raises on longer input.  We truncate, as Dovecot does.
_BCRYPT_MAX_PASSWORD = 72

#: Salt length of the salts we make (SSHA*, SCRAM): 128 bits, as Dovecot's SCRAM uses.
_SALT_LEN = 16

#: Parameters of the hashes we make.  ARGON2*: Dovecot's defaults (libsodium's
#: "interactive"/"moderate" limits); libsodium only verifies parallelism 1.
_ARGON2ID = argon2.PasswordHasher(
    time_cost=3, memory_cost=65536, parallelism=1, hash_len=32, salt_len=16,
    type=argon2.Type.ID,
)
_ARGON2I = argon2.PasswordHasher(
    time_cost=4, memory_cost=32768, parallelism=1, hash_len=32, salt_len=16,
    type=argon2.Type.I,
)
#: SHA*-CRYPT at glibc's default 5000 rounds (written without ``rounds=``, as Dovecot does).
_CRYPT_ROUNDS = 5000
#: bcrypt cost: the bcrypt library's default (2^12 rounds, ~0.2 s).  Dovecot writes 5.
_BCRYPT_COST = 12

_ENCODINGS: Final = {"HEX": "hex", "B64": "base64", "BASE64": "base64"}
_SUFFIXES: Final = tuple(f".{suffix}" for suffix in _ENCODINGS)


# --------------------------------------------------------------------------- parsing


def _split(stored: str) -> tuple[str, str, str | None]:
    """Return ``(SCHEME, data, encoding or None)`` of a stored password."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end > 1:
            inner = stored[1:end]
            name, encoding = _BRACES.get(inner) or _braces(inner)
            return name, stored[end + 1 :], encoding
    # Dovecot: "password: Assume CRYPT password scheme".
    return "CRYPT", stored, None


def _braces(inner: str) -> tuple[str, str | None]:
    """The scheme name and the explicit encoding (or None) of ``{inner}``."""
    name = inner.upper()
    base, dot, suffix = name.rpartition(".")
    if dot and suffix in _ENCODINGS:
        return base, _ENCODINGS[suffix]
    return name, None


def _decode(data: str, default: str, raw_len: int, explicit: str | None) -> bytes | None:
    """Decode ``data`` per Dovecot's ``password_decode()``; ``None`` when it is garbage."""
    encoding = explicit
    if encoding is None:
        encoding = default
        if default != "none" and raw_len:
            encoding = "hex" if len(data) == raw_len * 2 else "base64"
    try:
        if encoding == "hex":
            return bytes.fromhex(data)
        if encoding == "base64":
            return base64.b64decode(data.encode("ascii"), validate=True)
        return data.encode("utf-8", "surrogateescape")
    except (ValueError, binascii.Error, UnicodeError):
        return None


def scram_salt(key: bytes, username: str) -> bytes:
    """A stable per-user SCRAM salt for users whose password is stored in PLAIN.

    SCRAM needs a salt the server announces; a PLAIN password has none.  Deriving it from
    a server secret and the user name keeps it stable across logins (clients may cache
    SaltedPassword) and lets a SASL layer hand an *unknown* user an equally stable fake
    salt (RFC 5802 §5.1), so the salt does not reveal who exists.  It is never derived
    from the password: that would publish an unsalted hash of it.
    """
    return hmac.digest(key, b"pop3d scram salt\0" + username.encode("utf-8"), "sha256")[
        :_SALT_LEN
    ]


def _verify_scram(data: bytes, password: bytes, hash_name: str) -> bool:
    secret = ScramSecret.decode(data, hashlib.new(hash_name).digest_size)
    if secret is None:
        return False
    mine = ScramSecret.derive(password, secret.salt, secret.iterations, hash_name)
    return hmac.compare_digest(mine.stored_key, secret.stored_key)


# --------------------------------------------------------------------------- verifiers


def _text(data: bytes) -> str | None:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        return None


def _verify_plain(data: bytes, password: bytes) -> bool:
    return hmac.compare_digest(data, password)


def _digest_verifier(name: str) -> Callable[[bytes, bytes], bool]:
    def check(data: bytes, password: bytes) -> bool:
        return hmac.compare_digest(hashlib.new(name, password).digest(), data)

    return check


def _salted_verifier(name: str) -> Callable[[bytes, bytes], bool]:
    size = hashlib.new(name).digest_size

    def check(data: bytes, password: bytes) -> bool:
        if len(data) <= size:  # Dovecot: "password is too short" (no salt)
            return False
        digest = hashlib.new(name, password + data[size:]).digest()
        return hmac.compare_digest(digest, data[:size])

    return check


def _verify_crypt(data: bytes, password: bytes) -> bool:
    """crypt(3) by prefix: ``$1$`` ``$5$`` ``$6$`` ``$2?$`` ``$argon2*`` or 13-char DES."""
    text = _text(data)
    if text is None:
        return False
    if text.startswith(("$2a$", "$2b$", "$2y$")):
        return _verify_bcrypt(data, password)
    if text.startswith("$argon2"):
        return _verify_argon2(data, password)
    handler = {"$1$": md5_crypt, "$5$": sha256_crypt, "$6$": sha512_crypt}.get(text[:3])
    if handler is None:
        if len(text) != 13 or text.startswith("$"):
            return False  # "*", "!", "!!", an unknown prefix: locked / unsupported
        handler = des_crypt
    try:
        return bool(handler.verify(password, text))
    except (ValueError, TypeError):
        return False


def _verify_md5(data: bytes, password: bytes) -> bool:
    """Dovecot's ``{MD5}``: MD5-CRYPT when it starts ``$1$``, else PLAIN-MD5."""
    if data.startswith(b"$1$"):
        return _verify_crypt(data, password)
    text = _text(data)
    raw = None if text is None else _decode(text, "hex", 16, None)
    return raw is not None and _digest_verifier("md5")(raw, password)


def _verify_bcrypt(data: bytes, password: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], data)
    except ValueError:
        return False


#: The Argon2 hashes verified by libsodium (Dovecot's own Argon2 library): version 19, one
#: lane, a 16-octet salt and a 16- to 32-octet hash, the shape Dovecot's ``doveadm pw`` and
#: ours make.  libsodium's build is faster than argon2-cffi's (docs/performance.md), so a
#: storm of logins goes faster.  Every
#: shape in this set is checked against argon2-cffi in the tests; the rest (several
#: lanes, other lengths, which libsodium refuses or may not verify) goes to argon2-cffi.
_SODIUM_ARGON2 = re.compile(
    rb"\$argon2(?:id|i)\$v=19\$m=[0-9]{1,10},t=[0-9]{1,10},p=1"
    rb"\$[A-Za-z0-9+/]{22}\$(?:[A-Za-z0-9+/]{22}|[A-Za-z0-9+/]{32}|[A-Za-z0-9+/]{43})"
)


def _verify_argon2(data: bytes, password: bytes) -> bool:
    text = _text(data)
    if text is None:
        return False
    if _SODIUM_ARGON2.fullmatch(data):
        try:
            return bool(nacl.pwhash.verify(data, password))
        except nacl.exceptions.InvalidkeyError:  # a mismatch, or a hash it refuses
            return False
    try:
        # Both libraries read the type from the hash ($argon2i$ / $argon2id$).
        return _ARGON2ID.verify(text, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def _verify_pbkdf2(data: bytes, password: bytes) -> bool:
    """Dovecot's ``{PBKDF2}$1$salt$rounds$hex``: PBKDF2-HMAC-SHA1, 20 octets."""
    text = _text(data)
    parts = [] if text is None else text.split("$")
    if len(parts) != 5 or parts[:2] != ["", "1"] or not parts[3].isdigit():
        return False
    rounds = int(parts[3])
    if not 1 <= rounds <= 10**7:
        return False
    try:
        expected = bytes.fromhex(parts[4])
    except ValueError:
        return False
    if not expected:
        return False
    mine = hashlib.pbkdf2_hmac("sha1", password, parts[2].encode("ascii"), rounds, len(expected))
    return hmac.compare_digest(mine, expected)


def _verify_cram(data: bytes, password: bytes) -> bool:
    return hmac.compare_digest(cram_md5_context(password), data)


@dataclass(frozen=True, slots=True)
class _Scheme:
    check: Callable[[bytes, bytes], bool]
    #: Costs milliseconds: verify it off the event loop.
    slow: bool
    #: Dovecot's default encoding of the data: "none", "hex" or "base64".
    encoding: str = "none"
    #: Raw length for the hex/base64 guess (0: variable length, no guess).
    raw_len: int = 0


_PLAIN = _Scheme(_verify_plain, slow=False)
_CRYPT = _Scheme(_verify_crypt, slow=True)
_ARGON = _Scheme(_verify_argon2, slow=True)

_SCHEMES: Final[dict[str, _Scheme]] = {
    "PLAIN": _PLAIN,
    "CLEARTEXT": _PLAIN,
    "CLEAR": _PLAIN,
    "CRYPT": _CRYPT,
    "DES-CRYPT": _CRYPT,
    "MD5-CRYPT": _CRYPT,
    "SHA256-CRYPT": _CRYPT,
    "SHA512-CRYPT": _CRYPT,
    "BLF-CRYPT": _CRYPT,
    "MD5": _Scheme(_verify_md5, slow=True),
    "ARGON2I": _ARGON,
    "ARGON2ID": _ARGON,
    "PLAIN-MD5": _Scheme(_digest_verifier("md5"), slow=False, encoding="hex", raw_len=16),
    "LDAP-MD5": _Scheme(_digest_verifier("md5"), slow=False, encoding="base64", raw_len=16),
    "SHA": _Scheme(_digest_verifier("sha1"), slow=False, encoding="base64", raw_len=20),
    "SHA1": _Scheme(_digest_verifier("sha1"), slow=False, encoding="base64", raw_len=20),
    "SHA256": _Scheme(_digest_verifier("sha256"), slow=False, encoding="base64", raw_len=32),
    "SHA512": _Scheme(_digest_verifier("sha512"), slow=False, encoding="base64", raw_len=64),
    "SMD5": _Scheme(_salted_verifier("md5"), slow=False, encoding="base64"),
    "SSHA": _Scheme(_salted_verifier("sha1"), slow=False, encoding="base64"),
    "SSHA256": _Scheme(_salted_verifier("sha256"), slow=False, encoding="base64"),
    "SSHA512": _Scheme(_salted_verifier("sha512"), slow=False, encoding="base64"),
    "CRAM-MD5": _Scheme(_verify_cram, slow=False, encoding="hex", raw_len=32),
    "HMAC-MD5": _Scheme(_verify_cram, slow=False, encoding="hex", raw_len=32),
    "PBKDF2": _Scheme(_verify_pbkdf2, slow=True),
    "SCRAM-SHA-1": _Scheme(lambda d, p: _verify_scram(d, p, "sha1"), slow=True),
    "SCRAM-SHA-256": _Scheme(lambda d, p: _verify_scram(d, p, "sha256"), slow=True),
}

#: :func:`_braces` of every scheme name as it is usually written (upper case, with or
#: without an encoding suffix), made once: :func:`_split` of those is one lookup.
_BRACES: Final = {
    written: _braces(written)
    for written in [name + suffix for name in _SCHEMES for suffix in ("", *_SUFFIXES)]
}

_PLAIN_NAMES: Final = frozenset({"PLAIN", "CLEARTEXT", "CLEAR"})
_CRAM_NAMES: Final = frozenset({"CRAM-MD5", "HMAC-MD5"})


def _lookup(stored: str) -> tuple[str, _Scheme | None, bytes | None]:
    """Return the scheme name, its entry (``None``: unknown) and the decoded data."""
    name, data, explicit = _split(stored)
    scheme = _SCHEMES.get(name)
    if scheme is None:
        return name, None, None
    return name, scheme, _decode(data, scheme.encoding, scheme.raw_len, explicit)


# --------------------------------------------------------------------------- public API


def scheme_of(stored: str) -> str:
    """Return the upper-case scheme name of a stored password (``CRYPT`` without braces).

    Safe to log: the name only, never the data.
    """
    return _split(stored)[0]


def is_supported(stored: str) -> bool:
    """Whether ``stored`` names a scheme we verify and its data decodes."""
    _, scheme, data = _lookup(stored)
    return scheme is not None and data is not None


def is_slow(stored: str) -> bool:
    """Whether verifying ``stored`` costs milliseconds (run it off the event loop).

    Slow: the crypt family, bcrypt, argon2, PBKDF2, SCRAM.  Fast: PLAIN, (salted) MD5 and
    SHA digests, CRAM-MD5.  Unknown schemes count as fast (they fail at once).
    """
    scheme = _SCHEMES.get(_split(stored)[0])
    return scheme is not None and scheme.slow


#: The cost parameters of a slow hash, as they appear in its data: bcrypt's cost, crypt's
#: rounds, Argon2's m/t/p.
_COST_PARAMS: Final = re.compile(
    r"^\$(?:2[aby]\$[0-9]+|argon2(?:id|i|d)\$v=[0-9]+\$m=[0-9]+,t=[0-9]+,p=[0-9]+"
    r"|[156]\$(?:rounds=[0-9]+)?)"
)


def cost_class(stored: str) -> str:
    """Which stored passwords cost the same to verify: equal classes, equal work.

    ``"fast"`` for every scheme that costs microseconds (PLAIN, digests, CRAM-MD5);
    ``""`` for one that fails at once (unknown scheme, undecodable data); for slow ones the
    algorithm with its cost parameters (``$2b$12``, ``$argon2id$v=19$m=65536,t=3,p=1``,
    ``$6$``, ``$6$rounds=10000``, ``PBKDF2$5000``, ``SCRAM-SHA-256$4096``).  An
    authenticator verifies one hash of each class on every refusal (see
    :mod:`pop3d.auth.passwd_file`).  Safe to log: no salt, no hash.
    """
    name, scheme, data = _lookup(stored)
    if scheme is None or data is None:
        return ""
    if not scheme.slow:
        return "fast"
    if name.startswith("SCRAM-"):
        digest = hashlib.new("sha1" if name == "SCRAM-SHA-1" else "sha256").digest_size
        secret = ScramSecret.decode(data, digest)
        return "" if secret is None else f"{name}${secret.iterations}"
    text = data.decode("ascii", "replace")
    if name == "PBKDF2":
        parts = text.split("$")
        return f"PBKDF2${parts[3]}" if len(parts) == 5 else ""
    found = _COST_PARAMS.match(text)
    if found is not None:
        return found.group(0)
    if len(text) == 13 and not text.startswith("$"):
        return "des"
    return "fast"  # {MD5} as a digest, or a locked crypt string ("*", "!"): no work


def verify(stored: str, password: bytes) -> bool:
    """Whether ``password`` matches the stored ``{SCHEME}data`` (or bare crypt string).

    An unknown scheme or malformed data is ``False``, never an exception.
    """
    _, scheme, data = _lookup(stored)
    if scheme is None or data is None:
        return False
    return scheme.check(data, password)


@cache
def _dummy_hash() -> str:
    return "{ARGON2ID}" + _ARGON2ID.hash(os.urandom(16))


def dummy_verify(password: bytes, like: str | None = None) -> None:
    """Spend the work of a real verification, for a user that does not exist.

    Args:
        password: the password the client sent.
        like: a representative stored hash (say, another user's, of the scheme most of
            the file uses) so the cost matches real users' exactly; its outcome is
            discarded.  Without it, an ARGON2ID hash with Dovecot's default cost.

    """
    verify(like if like is not None else _dummy_hash(), password)


def plain_secret(stored: str) -> bytes | None:
    """The clear-text password when stored as PLAIN/CLEARTEXT/CLEAR (any encoding)."""
    name, scheme, data = _lookup(stored)
    if name not in _PLAIN_NAMES or scheme is None:
        return None
    return data


def stored_cram_md5(stored: str) -> bytes | None:
    """The 32-octet CRAM-MD5 context stored as ``{CRAM-MD5}``/``{HMAC-MD5}``, else ``None``."""
    name, _, data = _lookup(stored)
    return data if name in _CRAM_NAMES and data is not None and len(data) == 32 else None


def cram_md5_secret(stored: str) -> bytes | None:
    """The 32-octet CRAM-MD5 context, from ``{CRAM-MD5}`` or computed from a PLAIN password."""
    name, _, data = _lookup(stored)
    if name in _CRAM_NAMES and data is not None and len(data) == 32:
        return data
    plain = plain_secret(stored)
    return None if plain is None else cram_md5_context(plain)


def scram_sha256_secret(
    stored: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS,
) -> ScramSecret | None:
    """SCRAM-SHA-256 credentials, from ``{SCRAM-SHA-256}`` or derived from a PLAIN password.

    For PLAIN storage the salt is ``salt`` (pass :func:`scram_salt` so that it is stable per
    user), or a random one when ``None``.  The derivation costs one PBKDF2 (slow).
    """
    name, _, data = _lookup(stored)
    if name == "SCRAM-SHA-256":
        return None if data is None else ScramSecret.decode(data)
    plain = plain_secret(stored)
    if plain is None:
        return None
    return ScramSecret.derive(plain, salt if salt is not None else os.urandom(_SALT_LEN),
                              iterations)


# --------------------------------------------------------------------------- hashing


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _hash_plain(password: bytes) -> str:
    # A passwd-file field cannot hold ':' or a line end, and the file is UTF-8 text:
    # anything else is written base64-encoded, which Dovecot reads just the same.
    try:
        text = password.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and text.isprintable() and ":" not in text and not text.startswith("{"):
        return "{PLAIN}" + text
    return "{PLAIN.B64}" + _b64(password)


def _hash_salted(name: str, scheme: str) -> Callable[[bytes], str]:
    def make(password: bytes) -> str:
        salt = os.urandom(_SALT_LEN)
        return f"{{{scheme}}}" + _b64(hashlib.new(name, password + salt).digest() + salt)

    return make


def _hash_scram(password: bytes) -> str:
    return "{SCRAM-SHA-256}" + ScramSecret.derive(password, os.urandom(_SALT_LEN)).encode().decode()


_GENERATORS: Final[dict[str, Callable[[bytes], str]]] = {
    "ARGON2ID": lambda p: "{ARGON2ID}" + _ARGON2ID.hash(p),
    "ARGON2I": lambda p: "{ARGON2I}" + _ARGON2I.hash(p),
    "SHA512-CRYPT": lambda p: "{SHA512-CRYPT}"
    + sha512_crypt.using(rounds=_CRYPT_ROUNDS).hash(p),
    "SHA256-CRYPT": lambda p: "{SHA256-CRYPT}"
    + sha256_crypt.using(rounds=_CRYPT_ROUNDS).hash(p),
    "BLF-CRYPT": lambda p: "{BLF-CRYPT}"
    + bcrypt.hashpw(p[:_BCRYPT_MAX_PASSWORD], bcrypt.gensalt(_BCRYPT_COST)).decode("ascii"),
    "SSHA512": _hash_salted("sha512", "SSHA512"),
    "SSHA256": _hash_salted("sha256", "SSHA256"),
    "PLAIN": _hash_plain,
    "SCRAM-SHA-256": _hash_scram,
    "CRAM-MD5": lambda p: "{CRAM-MD5}" + cram_md5_context(p).hex(),
}

#: Schemes :func:`hash_password` can write.
GENERATED_SCHEMES: Final = tuple(_GENERATORS)


def hash_password(scheme: str, password: bytes) -> str:
    """Hash ``password`` as ``{SCHEME}data`` that Dovecot (and :func:`verify`) accept.

    Args:
        scheme: one of :data:`GENERATED_SCHEMES` (case-insensitive).
        password: the password octets.

    Raises:
        ValueError: the scheme is not one we write.

    """
    make = _GENERATORS.get(scheme.upper())
    if make is None:
        raise ValueError(f"cannot hash with scheme {scheme!r}")
    return make(password)
