"""Password schemes: Dovecot's vectors, our hashes, the challenge-response secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import subprocess

import pytest

from pop3d.auth import schemes
from pop3d.protocol import digests

#: The password of every vector below (non-ASCII, a space and a ':' on purpose).
PASSWORD = "p@ss wörd:x".encode()

#: Made once with `doveadm pw -s SCHEME -p 'p@ss wörd:x'` (Dovecot 2.3).
DOVEADM_VECTORS = [
    "{PLAIN}p@ss wörd:x",
    "{CLEARTEXT}p@ss wörd:x",
    "{CLEAR}p@ss wörd:x",
    "{PLAIN.B64}cEBzcyB3w7ZyZDp4",
    "{PLAIN.HEX}704073732077c3b672643a78",
    "{PLAIN-MD5}a37b5cf9098a19936a494892c67d8bd9",
    "{LDAP-MD5}o3tc+QmKGZNqSUiSxn2L2Q==",
    "{MD5}a37b5cf9098a19936a494892c67d8bd9",
    "{CRYPT}$2y$05$5VaNgBDkcxAnyWz6rjosKuzKc2rq9sPLqEUoA7l7wYWR71OipHvFe",
    "{DES-CRYPT}pLN0GiUTTyAVw",
    "{MD5-CRYPT}$1$yNgEXOJd$Y68gUB0Oh7AWSZRBrHDpe.",
    "{MD5}$1$fH2zW8hh$tiF/x/Vnt28fYCaHrrR4b1",
    "{SHA256-CRYPT}$5$VlYhBj/4MQ0KxUcC$DmjRmxBYDTrT53u5UHikbCLv38eaCkUnLrmdfDYEHq3",
    ("{SHA512-CRYPT}$6$0w2DK7Gh9PPASbud$n2nrxV7lOuPEKHDyqicZAh.6j6J0W7gMfLj1rqwYTcZLlYOuGlLQ"
    "Ke1JC50hkf53ybPEn0vTnrFb6X2lPhpco1"),
    "{BLF-CRYPT}$2y$05$QL7N8flzCE6CE0mFlS5acuYxvol07pHoXkMt1JysfppAR06EAw/B2",
    ("{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$cXBPXaDWmjqrNkSqSdASQQ$fVfvMLEAqj6ZnK9Flr3HdyybkoaU"
    "7Ri4gCY7jRkxS54"),
    ("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$wZN08vEvHqjiOMJgVnoqrA$X10Srq05gG90Em8ZIRmr0Zy6FWn"
    "7n9cq12nex7hRX4c"),
    "{SHA}s2yV2ga+hJO2dTBfIvH2Mi4GV2A=",
    "{SHA1}s2yV2ga+hJO2dTBfIvH2Mi4GV2A=",
    "{SSHA}Y6RqFQNHfscJg+u3BaBTmLVMDDKVfeaA",
    "{SHA256}jeNqNXSEySO2YjU8bdW8T74lVao3Pkci7oak60KtGWI=",
    "{SHA256.HEX}8de36a357484c923b662353c6dd5bc4fbe2555aa373e4722ee86a4eb42ad1962",
    "{SSHA256}gsc65Cfea7/qRKFiwdFZXY44wofhtQB30vQbqKw3yK6tUesB",
    "{SSHA256.HEX}d1a7569eefe1b8f4ec292bca4f91d5feaaf6dfe8048ba3afc5e42152ca769ab9e44649d3",
    ("{SHA512}7eufL+fGGjLD46s2C+bk8l/KleHKV2MGkIquBK78VVQsh67pmtojwKRpzG4ZCqWeYsR1l9uDrxJW8y4Jl2F"
    "NUA=="),
    ("{SSHA512}/J4FBnvPicm5cBQA/rcEF208BOh2FxdGrXoQsHAtBg2copdDYhuRVQGl5ytKB7vWvUPE/gzPzWMN0+wLC"
    "XOFFdJjEC4="),
    "{SMD5}8dgbF12oOs1Mgyd4jBIhJqqeMr0=",
    "{CRAM-MD5}ef7c0a881b825688859651501044154e5d2e79fe2bf56e4b1f6ccf01c687f088",
    "{HMAC-MD5}ef7c0a881b825688859651501044154e5d2e79fe2bf56e4b1f6ccf01c687f088",
    ("{SCRAM-SHA-1}4096,HYdcD0yoWiqSKMbcAb9owg==,5LpnYDNxdSzpGHXFB7V0qMOhTGQ=,ys8NFtM7uDvM/eioJS3Q"
    "/H6Zb+E="),
    ("{SCRAM-SHA-256}4096,sbVBZCpfYF3gXFDn9AUHyg==,0rN3Az6ieHwkBm/awH4ZwXFOjEC7WeH60Op2RKhEiDU=,"
    "zWq/aMTUPFfLXP5dDbZL9QDYRymWiBGoFMB1ICoMULA="),
    "{PBKDF2}$1$4QTtil/fPbJYsAkn$5000$562179fcdc5e8eac6904e2a20c695065b59fc7c5",
    # bare crypt(3) strings (passwd-file's default scheme is CRYPT) and bcrypt's $2a$
    ("$6$0w2DK7Gh9PPASbud$n2nrxV7lOuPEKHDyqicZAh.6j6J0W7gMfLj1rqwYTcZLlYOuGlLQKe1JC50hkf53ybPEn0vT"
    "nrFb6X2lPhpco1"),
    "$1$yNgEXOJd$Y68gUB0Oh7AWSZRBrHDpe.",
    "pLN0GiUTTyAVw",
    "$2a$04$XqJR7OVM9RfVC3OhjT4qAuhus5bfJMNxSbO1PLg7HwqINbx83mTya",
    # scheme names are case-insensitive
    "{plain}p@ss wörd:x",
    "{ssha256}gsc65Cfea7/qRKFiwdFZXY44wofhtQB30vQbqKw3yK6tUesB",
]

DES_VECTORS = {"{DES-CRYPT}pLN0GiUTTyAVw", "pLN0GiUTTyAVw"}

#: `doveadm pw -s CRAM-MD5 -p secret`
CRAM_MD5_SECRET = "{CRAM-MD5}cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56"

#: `doveadm pw -s BLF-CRYPT -r 4 -p` with 100 x's: Dovecot reads only 72 octets.
BCRYPT_LONG = "{BLF-CRYPT}$2y$04$soK5idRCVO8aUmf9qYhww.LIqOucgnTPN8/S9pPWo9iahY5tWv8A6"

SLOW = {"CRYPT", "DES-CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT", "MD5",
        "ARGON2I", "ARGON2ID", "PBKDF2", "SCRAM-SHA-1", "SCRAM-SHA-256"}

LIVE_SCHEMES = [
    "PLAIN", "CLEARTEXT", "PLAIN.b64", "PLAIN.hex", "PLAIN-MD5", "LDAP-MD5", "MD5", "CRYPT",
    "DES-CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT", "ARGON2I", "ARGON2ID",
    "SHA", "SSHA", "SHA256", "SSHA256", "SHA512", "SSHA512", "SMD5", "SHA256.hex", "CRAM-MD5",
    "SCRAM-SHA-1", "SCRAM-SHA-256", "PBKDF2",
]

DOVEADM = shutil.which("doveadm")
needs_doveadm = pytest.mark.skipif(DOVEADM is None, reason="doveadm is not installed")


def _id(stored: str) -> str:
    return stored[:20]


@pytest.mark.parametrize("stored", DOVEADM_VECTORS, ids=_id)
def test_doveadm_vector_verifies(stored: str) -> None:
    """A hash doveadm pw made verifies with its password."""
    assert schemes.is_supported(stored)
    assert schemes.verify(stored, PASSWORD) is True


@pytest.mark.parametrize("stored", DOVEADM_VECTORS, ids=_id)
def test_doveadm_vector_rejects_wrong_password(stored: str) -> None:
    """A wrong password (empty, changed, extended, truncated) never verifies."""
    wrongs = [b"", b"wrong", PASSWORD + b"x", PASSWORD[:-1], PASSWORD.upper()]
    if stored in DES_VECTORS:  # DES crypt(3) reads 8 octets: that is the algorithm
        wrongs = [w for w in wrongs if w[:8] != PASSWORD[:8]]
    for wrong in wrongs:
        assert schemes.verify(stored, wrong) is False


def test_bcrypt_reads_72_octets_like_dovecot() -> None:
    """bcrypt hashes of long passwords verify as Dovecot does (first 72 octets), no error."""
    assert schemes.verify(BCRYPT_LONG, b"x" * 100)
    assert schemes.verify(BCRYPT_LONG, b"x" * 72 + b"anything")
    assert not schemes.verify(BCRYPT_LONG, b"x" * 71)


@pytest.mark.parametrize(
    "stored",
    [
        "", "*", "!", "!!", "{SHA256}!!!notbase64", "{SHA256}c2hvcnQ=", "{SSHA256}c2hvcnQ=",
        "{ARGON2ID}garbage", "{ARGON2ID}$argon2id$v=19$m=1,t=1,p=1$x$y", "{BLF-CRYPT}$2y$xx",
        "{CRYPT}$9$salt$hash", "{SHA512-CRYPT}$6$", "{PBKDF2}$1$salt$notdigits$00",
        "{PBKDF2}$1$salt$99999999999$00", "{PBKDF2}$1$salt$5000$", "{SCRAM-SHA-256}1,2,3",
        "{SCRAM-SHA-256}0,AA==,AA==,AA==", "{CRAM-MD5}abc", "{NO-SUCH-SCHEME}x", "{}x", "{PLAIN",
        "{PLAIN.HEX}zz", "{MD5}$1$", "{DES-CRYPT}short", "{MD5}\u00e9",
    ],
)
def test_malformed_or_unknown_is_false_never_raises(stored: str) -> None:
    """Garbage in the password field is a failed login, not an exception."""
    assert schemes.verify(stored, b"") is False
    assert schemes.verify(stored, b"p") is False


def test_unknown_scheme_is_unsupported_and_named() -> None:
    """An unknown scheme is reported (by name only) so the operator can be warned."""
    assert not schemes.is_supported("{NO-SUCH}x")
    assert schemes.scheme_of("{no-such}secretdata") == "NO-SUCH"
    assert schemes.scheme_of("$6$abc$def") == "CRYPT"
    assert schemes.scheme_of("{PLAIN.b64}c2VjcmV0") == "PLAIN"


@pytest.mark.parametrize("stored", DOVEADM_VECTORS, ids=_id)
def test_slow_schemes_are_flagged(stored: str) -> None:
    """Crypt, bcrypt, argon2, PBKDF2 and SCRAM are slow (off the loop); digests are fast."""
    assert schemes.is_slow(stored) == (schemes.scheme_of(stored) in SLOW)


# ------------------------------------------------------------------ pure MD5 (CRAM-MD5)

RFC1321_VECTORS = [
    (b"", "d41d8cd98f00b204e9800998ecf8427e"),
    (b"a", "0cc175b9c0f1b6a831c399e269772661"),
    (b"abc", "900150983cd24fb0d6963f7d28e17f72"),
    (b"message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
    (b"abcdefghijklmnopqrstuvwxyz", "c3fcd3d76192e4007dfb496cca67e13b"),
    (
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
        "d174ab98d277d9f5a5611c2c9f419d9f",
    ),
    (b"1234567890" * 8, "57edf4a22be3c955ac49da2e2107b67a"),
]


@pytest.mark.parametrize(("data", "digest"), RFC1321_VECTORS)
def test_pure_md5_matches_rfc1321(data: bytes, digest: str) -> None:
    """The pure-Python MD5 block function reproduces RFC 1321 appendix A.5."""
    assert digests._md5(data).hex() == digest


def test_pure_md5_matches_hashlib_at_block_boundaries() -> None:
    """Padding is right for every length around the 56/64-octet boundaries."""
    for n in range(130):
        data = os.urandom(n)
        assert digests._md5(data) == hashlib.md5(data).digest()


def test_cram_md5_context_matches_dovecot() -> None:
    """Our CRAM-MD5 context is byte for byte the one doveadm stores (outer, then inner)."""
    assert schemes.hash_password("CRAM-MD5", b"secret") == CRAM_MD5_SECRET
    assert schemes.cram_md5_secret(CRAM_MD5_SECRET) == schemes.cram_md5_context(b"secret")


def test_cram_md5_digest_is_hmac_md5() -> None:
    """From the stored context we compute exactly HMAC-MD5(password, challenge)."""
    for key in (b"", b"secret", b"k" * 64, os.urandom(65), os.urandom(200)):
        for challenge in (b"", b"<1.2@host>", os.urandom(55), os.urandom(64), os.urandom(300)):
            context = schemes.cram_md5_context(key)
            expected = hmac.digest(key, challenge, "md5")
            assert schemes.cram_md5_digest(context, challenge) == expected


def test_cram_md5_rfc2195_example() -> None:
    """RFC 2195 §2's example exchange verifies, and a near miss does not."""
    context = schemes.cram_md5_context(b"tanstaaftanstaaf")
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    assert schemes.verify_cram_md5(context, challenge, "b913a602c7eda7a495b4e6e7334d3890")
    assert not schemes.verify_cram_md5(context, challenge, "B913A602C7EDA7A495B4E6E7334D3890")
    assert not schemes.verify_cram_md5(context, challenge, "b913a602c7eda7a495b4e6e7334d389")
    assert not schemes.verify_cram_md5(context, challenge, "b913a602c7eda7a495b4e6e7334d3891")


def test_cram_md5_digest_refuses_bad_context() -> None:
    """A context that is not 32 octets is a programming error, not a silent mismatch."""
    with pytest.raises(ValueError):
        schemes.cram_md5_digest(b"short", b"challenge")


# ------------------------------------------------------------------ APOP


def test_apop_rfc1939_example() -> None:
    """RFC 1939 §7's APOP example verifies."""
    timestamp = b"<1896.697170952@dbc.mtview.ca.us>"
    assert schemes.verify_apop(b"tanstaaf", timestamp, "c4c9334bac560ecc979e58001b3e22fb")


@pytest.mark.parametrize(
    "digest",
    [
        "C4C9334BAC560ECC979E58001B3E22FB",  # RFC 1939: lower-case hex
        "c4c9334bac560ecc979e58001b3e22f",
        "c4c9334bac560ecc979e58001b3e22fbb",
        "c4c9334bac560ecc979e58001b3e22fc",
        "g4c9334bac560ecc979e58001b3e22fb",
        "",
    ],
)
def test_apop_rejects_wrong_digests(digest: str) -> None:
    """Anything but the exact 32 lower-case hex digits is refused."""
    assert not schemes.verify_apop(b"tanstaaf", b"<1896.697170952@dbc.mtview.ca.us>", digest)


# ------------------------------------------------------------------ secrets


def test_plain_secret_only_from_plain_storage() -> None:
    """APOP gets the clear-text password from PLAIN-like storage, and nothing from hashes."""
    plain = {"PLAIN", "CLEARTEXT", "CLEAR"}
    for stored in DOVEADM_VECTORS:
        expected = PASSWORD if schemes.scheme_of(stored) in plain else None
        assert schemes.plain_secret(stored) == expected


def test_cram_md5_secret_from_plain_and_from_stored() -> None:
    """The CRAM-MD5 context comes from {CRAM-MD5} storage or is computed from PLAIN."""
    assert schemes.cram_md5_secret("{PLAIN}secret") == schemes.cram_md5_secret(CRAM_MD5_SECRET)
    assert schemes.cram_md5_secret("{HMAC-MD5}" + CRAM_MD5_SECRET[10:]) is not None
    assert schemes.cram_md5_secret("{SSHA256}gsc65Cfea7/qRKFiwdFZXY44wofhtQB30vQbqKw3yK6tUesB") \
        is None
    assert schemes.cram_md5_secret("{CRAM-MD5}abcd") is None


def test_scram_secret_from_doveadm_storage() -> None:
    """{SCRAM-SHA-256} as Dovecot writes it decodes to keys our derivation reproduces."""
    stored = next(v for v in DOVEADM_VECTORS if v.startswith("{SCRAM-SHA-256}"))
    secret = schemes.scram_sha256_secret(stored)
    assert secret is not None
    assert secret.iterations == 4096
    again = schemes.ScramSecret.derive(PASSWORD, secret.salt, secret.iterations)
    assert again == secret
    assert secret.encode().decode() == stored.removeprefix("{SCRAM-SHA-256}")
    assert schemes.ScramSecret.decode(secret.encode()) == secret


def test_scram_secret_from_plain_uses_the_given_salt() -> None:
    """From PLAIN, the SCRAM keys are derived with the caller's (stable) salt."""
    salt = schemes.scram_salt(b"k" * 32, "alice")
    a = schemes.scram_sha256_secret("{PLAIN}pencil", salt=salt)
    b = schemes.scram_sha256_secret("{PLAIN}pencil", salt=salt)
    assert a is not None
    assert a == b
    assert a.salt == salt
    assert schemes.verify("{SCRAM-SHA-256}" + a.encode().decode(), b"pencil")
    assert schemes.scram_sha256_secret("{SHA256}jeNqNXSEySO2YjU8bdW8T74lVao3Pkci7oak60KtGWI=") \
        is None


def test_scram_salt_is_per_user_and_per_key() -> None:
    """Stable per user, different across users and server keys, never from the password."""
    assert schemes.scram_salt(b"k1", "alice") == schemes.scram_salt(b"k1", "alice")
    assert schemes.scram_salt(b"k1", "alice") != schemes.scram_salt(b"k1", "bob")
    assert schemes.scram_salt(b"k1", "alice") != schemes.scram_salt(b"k2", "alice")
    assert len(schemes.scram_salt(b"k1", "alice")) == 16


def test_scram_rfc7677_example_exchange() -> None:
    """RFC 7677 §3's SCRAM-SHA-256 exchange checks out against derived credentials."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    secret = schemes.ScramSecret.derive(b"pencil", salt, 4096)
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth_message = (
        "n=user,r=rOprNGfwEbeRWgbNEkqO,"
        f"r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
        f"c=biws,r={nonce}"
    ).encode()
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    signature = hmac.digest(secret.stored_key, auth_message, "sha256")
    client_key = bytes(p ^ s for p, s in zip(proof, signature, strict=True))
    assert hashlib.sha256(client_key).digest() == secret.stored_key
    server_signature = hmac.digest(secret.server_key, auth_message, "sha256")
    assert base64.b64encode(server_signature) == b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


@pytest.mark.parametrize(
    "data",
    [b"", b"4096", b"x,AA==,AA==,AA==", b"4096,AA==,AA==", b"4096,!!,AA==,AA==", b"4096,,A,A",
     b"4096,AA==,AA==,AA==", b"99999999999,AA==," + b"A" * 44 + b"," + b"A" * 44],
)
def test_scram_secret_decode_rejects_malformed(data: bytes) -> None:
    """A malformed SCRAM secret decodes to None, never to half a key."""
    assert schemes.ScramSecret.decode(data) is None


def test_scram_secret_repr_hides_keys() -> None:
    """Logging a ScramSecret by accident shows no key material."""
    secret = schemes.ScramSecret.derive(b"pencil", b"salt" * 4, 1)
    assert secret.stored_key.hex() not in repr(secret)
    assert "salt" not in repr(secret).replace("ScramSecret", "")


# ------------------------------------------------------------------ hashing


@pytest.mark.parametrize("scheme", schemes.GENERATED_SCHEMES)
def test_hash_password_round_trips(scheme: str) -> None:
    """What we write verifies with its password, not with another, and fits a passwd-file."""
    for password in (b"secret", PASSWORD, "пароль".encode(), b"\xff\xfe:\n"):
        stored = schemes.hash_password(scheme, password)
        assert stored.startswith("{")
        assert ":" not in stored
        assert stored.isprintable()
        assert schemes.verify(stored, password)
        assert not schemes.verify(stored, password + b"!")


def test_hash_password_salts_differ() -> None:
    """Two hashes of one password differ (fresh salt each time), PLAIN and CRAM-MD5 aside."""
    for scheme in set(schemes.GENERATED_SCHEMES) - {"PLAIN", "CRAM-MD5"}:
        assert schemes.hash_password(scheme, b"x") != schemes.hash_password(scheme, b"x")


def test_hash_password_plain_encodes_what_the_file_cannot_hold() -> None:
    """PLAIN passwords with ':' or non-UTF-8 octets are written as {PLAIN.B64}."""
    assert schemes.hash_password("plain", b"secret") == "{PLAIN}secret"
    assert schemes.hash_password("PLAIN", b"a:b").startswith("{PLAIN.B64}")
    assert schemes.hash_password("PLAIN", b"\xff").startswith("{PLAIN.B64}")
    assert schemes.hash_password("PLAIN", b"{SHA}x").startswith("{PLAIN.B64}")


def test_hash_password_unknown_scheme() -> None:
    """Asking for a scheme we do not write is an error, not a silent PLAIN."""
    with pytest.raises(ValueError):
        schemes.hash_password("MD5", b"x")


def test_dummy_verify_does_the_representative_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """dummy_verify verifies against the given hash (or an ARGON2ID one) and returns nothing."""
    seen: list[str] = []
    real = schemes.verify

    def spy(stored: str, password: bytes) -> bool:
        seen.append(schemes.scheme_of(stored))
        return real(stored, password)

    monkeypatch.setattr(schemes, "verify", spy)
    assert schemes.dummy_verify(PASSWORD, DOVEADM_VECTORS[0]) is None  # type: ignore[func-returns-value]
    assert schemes.dummy_verify(b"x") is None  # type: ignore[func-returns-value]
    assert seen == ["PLAIN", "ARGON2ID"]


# ------------------------------------------------------------------ live Dovecot


def _doveadm(*args: str) -> subprocess.CompletedProcess[str]:
    assert DOVEADM is not None
    return subprocess.run([DOVEADM, "pw", *args], capture_output=True, text=True, check=False)


@pytest.mark.dovecot
@needs_doveadm
@pytest.mark.parametrize("scheme", LIVE_SCHEMES)
def test_live_doveadm_hash_verifies(scheme: str) -> None:
    """Whatever this machine's doveadm pw writes for a scheme, we verify (and refuse wrong)."""
    password = "Live p@ss ü"
    result = _doveadm("-s", scheme, "-p", password, "-u", "alice")
    assert result.returncode == 0, result.stderr
    stored = result.stdout.strip()
    assert schemes.verify(stored, password.encode())
    assert not schemes.verify(stored, b"Wrong p@ss")


@pytest.mark.dovecot
@needs_doveadm
@pytest.mark.parametrize("scheme", schemes.GENERATED_SCHEMES)
def test_live_doveadm_accepts_our_hash(scheme: str) -> None:
    """doveadm pw -t accepts what hash_password writes, and refuses a wrong password."""
    password = "Live p@ss ü"
    stored = schemes.hash_password(scheme, password.encode())
    assert _doveadm("-t", stored, "-p", password).returncode == 0
    assert _doveadm("-t", stored, "-p", "Wrong p@ss").returncode != 0


# --------------------------------------------------------------------- Argon2 routing

#: Argon2 shapes: (type, salt octets, hash octets, time cost, memory KiB, lanes).
ARGON2_SHAPES = [
    (t, salt, out, cost, mem, lanes)
    for t in ("ID", "I")
    for salt, out in ((16, 16), (16, 24), (16, 32), (8, 32), (32, 32), (16, 64), (16, 4))
    for cost, mem in ((1, 8), (3, 64))
    for lanes in (1, 2)
]


@pytest.mark.parametrize(("kind", "salt", "out", "cost", "mem", "lanes"), ARGON2_SHAPES)
def test_argon2_verifies_every_shape_as_argon2_cffi_does(
    kind: str, salt: int, out: int, cost: int, mem: int, lanes: int
) -> None:
    """libsodium's fast path and argon2-cffi agree on every shape, right or wrong password."""
    import argon2  # noqa: PLC0415 (only this test makes foreign hashes)

    hasher = argon2.PasswordHasher(
        time_cost=cost, memory_cost=mem * lanes, parallelism=lanes, hash_len=out,
        salt_len=salt, type=argon2.Type[kind],
    )
    stored = hasher.hash(PASSWORD)
    scheme = "{ARGON2ID}" if kind == "ID" else "{ARGON2I}"
    assert schemes.verify(scheme + stored, PASSWORD)
    assert not schemes.verify(scheme + stored, PASSWORD + b"x")
    assert not schemes.verify(scheme + stored, b"")


def test_dovecot_shaped_argon2_goes_to_libsodium(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dovecot's shape (one lane, 16-octet salt, 32-octet hash) never reaches argon2-cffi."""

    def refuse(*args: object) -> bool:
        raise AssertionError("argon2-cffi was asked")

    import argon2  # noqa: PLC0415

    monkeypatch.setattr(argon2.PasswordHasher, "verify", refuse)
    argon2_vectors = [v for v in DOVEADM_VECTORS if v.startswith("{ARGON2")]
    assert len(argon2_vectors) == 2
    for stored in [*argon2_vectors, schemes.hash_password("ARGON2ID", PASSWORD)]:
        assert schemes.verify(stored, PASSWORD)
        assert not schemes.verify(stored, b"wrong")


def test_other_argon2_shapes_go_to_argon2_cffi(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several lanes (argon2-cffi's own default) are verified by argon2-cffi, not libsodium."""
    import argon2  # noqa: PLC0415
    import nacl.pwhash  # noqa: PLC0415

    stored = "{ARGON2ID}" + argon2.PasswordHasher(memory_cost=64, parallelism=4).hash(PASSWORD)

    def refuse(*args: object) -> bool:
        raise AssertionError("libsodium was asked")

    monkeypatch.setattr(nacl.pwhash, "verify", refuse)
    assert schemes.verify(stored, PASSWORD)
    assert not schemes.verify(stored, b"wrong")


@pytest.mark.parametrize(
    ("braces", "name", "encoding"),
    [
        ("PLAIN", "PLAIN", None),
        ("Sha256.hex", "SHA256", "hex"),
        ("SSHA512.B64", "SSHA512", "base64"),
        ("plain.base64", "PLAIN", "base64"),
        ("CRAM-MD5", "CRAM-MD5", None),
        ("X.Y", "X.Y", None),  # unknown: kept whole
    ],
)
def test_scheme_names_parse_alike_in_any_case(
    braces: str, name: str, encoding: str | None
) -> None:
    """A scheme name kept parsed (upper case) and any other spelling split alike."""
    for written in (braces, braces.upper(), braces.lower()):
        split = schemes._split(f"{{{written}}}da}}ta")
        assert split == (name, "da}ta", encoding)
