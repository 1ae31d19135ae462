"""The arithmetic of the challenge-response logins: APOP, CRAM-MD5 and SCRAM.

Pure functions of their arguments (no I/O, no randomness), so the core's SASL layer
(:mod:`pop3d.protocol.sasl`) checks proofs without importing the password-hashing
libraries of :mod:`pop3d.auth.schemes`, which makes and stores these secrets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import struct
from dataclasses import dataclass, field
from typing import Final

#: RFC 7677 §4: "the hash iteration-count announced by a server SHOULD be at least 4096";
#: it is also what Dovecot 2.3 writes.
SCRAM_ITERATIONS: Final = 4096


# --------------------------------------------------------------------------- pure MD5

# RFC 1321 §3.4: T[i] = floor(2^32 * abs(sin(i))), i = 1..64 (exact in IEEE doubles,
# and the test vectors prove it).
_MD5_T: Final = tuple(int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64))
_MD5_S: Final = (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4 + (6, 10, 15, 21) * 4
_MD5_IV: Final = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MASK: Final = 0xFFFFFFFF

_Md5State = tuple[int, int, int, int]


def _md5_block(state: _Md5State, block: bytes) -> _Md5State:
    """RFC 1321 §3.4: process one 64-octet block and return the new (A, B, C, D)."""
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | (~d & _MASK)), (7 * i) % 16
        f = (f + a + _MD5_T[i] + x[g]) & _MASK
        a, d, c = d, c, b
        b = (b + ((f << _MD5_S[i]) | (f >> (32 - _MD5_S[i])))) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def _md5_finish(state: _Md5State, data: bytes, done: int) -> bytes:
    """MD5 of ``done`` octets already folded into ``state`` followed by ``data``."""
    total = done + len(data)
    data += b"\x80" + b"\0" * ((55 - total) % 64) + struct.pack("<Q", (total * 8) & (2**64 - 1))
    for off in range(0, len(data), 64):
        state = _md5_block(state, data[off : off + 64])
    return struct.pack("<4I", *state)


def _md5(data: bytes) -> bytes:
    """Plain MD5 through the pure-Python path (only for testing it against RFC 1321)."""
    return _md5_finish(_MD5_IV, data, 0)


# --------------------------------------------------------------------------- CRAM-MD5


def cram_md5_context(password: bytes) -> bytes:
    """Return Dovecot's 32-octet CRAM-MD5 secret: HMAC-MD5's outer then inner MD5 state.

    Each state is the MD5 (A, B, C, D) after one block of ``key XOR opad`` (resp. ipad),
    as four little-endian 32-bit words (Dovecot's ``hmac_md5_get_cnt``).
    """
    key = hashlib.md5(password).digest() if len(password) > 64 else password  # noqa: S324
    key = key.ljust(64, b"\0")
    outer = _md5_block(_MD5_IV, bytes(k ^ 0x5C for k in key))
    inner = _md5_block(_MD5_IV, bytes(k ^ 0x36 for k in key))
    return struct.pack("<8I", *outer, *inner)


def cram_md5_digest(context: bytes, challenge: bytes) -> bytes:
    """Return HMAC-MD5(password, challenge) (16 octets) from a 32-octet CRAM-MD5 context.

    This is what a CRAM-MD5 (RFC 2195) server compares the client's response against.

    Raises:
        ValueError: ``context`` is not 32 octets.

    """
    if len(context) != 32:
        raise ValueError("a CRAM-MD5 context is 32 octets")
    words = struct.unpack("<8I", context)
    outer: _Md5State = words[:4]
    inner: _Md5State = words[4:]
    return _md5_finish(outer, _md5_finish(inner, challenge, 64), 64)


def verify_cram_md5(context: bytes, challenge: bytes, response_hex: str) -> bool:
    """Check a CRAM-MD5 response (lower-case hex HMAC-MD5 digest) in constant time."""
    if len(response_hex) != 32 or not _is_lower_hex(response_hex):
        return False
    expected = cram_md5_digest(context, challenge).hex()
    return hmac.compare_digest(expected.encode("ascii"), response_hex.encode("ascii"))


# --------------------------------------------------------------------------- SCRAM


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """RFC 5802 §3 server-side SCRAM credentials (Dovecot's ``{SCRAM-SHA-256}`` fields)."""

    iterations: int
    salt: bytes = field(repr=False)
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def encode(self) -> bytes:
        """Return Dovecot's form ``iter,salt_b64,storedkey_b64,serverkey_b64`` (ASCII)."""
        parts = [str(self.iterations).encode("ascii")] + [
            base64.b64encode(v) for v in (self.salt, self.stored_key, self.server_key)
        ]
        return b",".join(parts)

    @classmethod
    def decode(cls, data: bytes | str, digest_size: int = 32) -> ScramSecret | None:
        """Parse :meth:`encode`'s form; ``None`` when malformed."""
        text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
        fields = text.split(",")
        if len(fields) != 4 or not fields[0].isascii() or not fields[0].isdigit():
            return None
        try:
            salt, stored, server = (
                base64.b64decode(f.encode("ascii"), validate=True) for f in fields[1:]
            )
        except (ValueError, binascii.Error):
            return None
        iterations = int(fields[0])
        if not 1 <= iterations <= 10**7 or not salt:
            return None
        if len(stored) != digest_size or len(server) != digest_size:
            return None
        return cls(iterations, salt, stored, server)

    @classmethod
    def derive(
        cls, password: bytes, salt: bytes, iterations: int = SCRAM_ITERATIONS,
        hash_name: str = "sha256",
    ) -> ScramSecret:
        """RFC 5802 §3: SaltedPassword = Hi(password, salt, i); the two keys from it."""
        salted = hashlib.pbkdf2_hmac(hash_name, password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", hash_name)
        server_key = hmac.digest(salted, b"Server Key", hash_name)
        return cls(iterations, salt, hashlib.new(hash_name, client_key).digest(), server_key)


def _is_lower_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def verify_apop(secret: bytes, timestamp: bytes, digest: str) -> bool:
    """RFC 1939 §7 APOP: ``digest`` is the lower-case hex MD5 of timestamp + secret."""
    if len(digest) != 32 or not _is_lower_hex(digest):
        return False
    expected = hashlib.md5(timestamp + secret).hexdigest()  # noqa: S324 (RFC 1939 says MD5)
    return hmac.compare_digest(expected.encode("ascii"), digest.encode("ascii"))
