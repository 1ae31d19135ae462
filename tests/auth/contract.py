"""The behaviour every Authenticator promises, written once for all backends.

A backend's test module subclasses :class:`AuthenticatorContract` as ``Test...`` and
implements :meth:`make`, which must return an authenticator holding exactly the given users
with the given stored passwords (``{SCHEME}data`` strings: a SQL backend stores the same).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from pop3d.auth.base import Authenticator
from pop3d.protocol.values import Principal

#: Fixed hashes of the password b"secret" (doveadm pw).
SECRET_HASHES = {
    "plain": "{PLAIN}secret",
    "ssha512": (
        "{SSHA512}5mxi0impdGXrMUzV05Xj/lR1lYHNDoDEF0DPpBWgiT5VMToho8/lEAr9nfORGdwJq2x0svSF3miBV7"
        "AhKHmFaOQrj8w="
    ),
    "sha512crypt": (
        "{SHA512-CRYPT}$6$1DAPsK3jHMVBtael$YiSSTILTZRCLrhLlE0jwmn8gw90x8qIOxUP23qikxak0EhAw0u2th"
        "namXaUVGbQ0I7aMTiwodytyerMY9xxK3."
    ),
    "blf": "{BLF-CRYPT}$2y$05$urH9ZlhXs6/LyPYg/.K1luCYlFwxkaHN1l2RAhA7RaBilxFn64B9W",
}


class AuthenticatorContract:
    """Subclass as ``TestXxx`` and implement :meth:`make`."""

    def make(self, tmp_path: Path, users: Mapping[str, str]) -> Authenticator:
        """Return an authenticator whose users are ``users`` (name -> stored password)."""
        raise NotImplementedError

    def _users(self) -> dict[str, str]:
        return {f"user-{k}": v for k, v in SECRET_HASHES.items()} | {
            "Alice": "{PLAIN}alice-pass",
            "bob@example.org": "{PLAIN}bob-pass",
        }

    def test_right_password_gives_the_principal(self, tmp_path: Path) -> None:
        """The right password returns the user, spelled as the backend spells it."""
        auth = self.make(tmp_path, self._users())
        for name in SECRET_HASHES:
            principal = asyncio.run(auth.verify_password(f"user-{name}", b"secret"))
            assert isinstance(principal, Principal)
            assert principal.username == f"user-{name}"
        principal = asyncio.run(auth.verify_password("bob@example.org", b"bob-pass"))
        assert principal is not None
        assert principal.username == "bob@example.org"

    def test_wrong_password_is_none(self, tmp_path: Path) -> None:
        """A wrong password is None, for every scheme."""
        auth = self.make(tmp_path, self._users())
        for name in SECRET_HASHES:
            for wrong in (b"", b"Secret", b"secret ", b"secre"):
                assert asyncio.run(auth.verify_password(f"user-{name}", wrong)) is None

    def test_unknown_user_is_none(self, tmp_path: Path) -> None:
        """An unknown user is the same None as a wrong password."""
        auth = self.make(tmp_path, self._users())
        assert asyncio.run(auth.verify_password("nobody", b"secret")) is None
        assert asyncio.run(auth.lookup("nobody")) is None
        assert asyncio.run(auth.secret_for("nobody", "PLAIN")) is None

    def test_names_are_case_sensitive(self, tmp_path: Path) -> None:
        """User names match exactly, as Dovecot's default does."""
        auth = self.make(tmp_path, self._users())
        assert asyncio.run(auth.verify_password("Alice", b"alice-pass")) is not None
        assert asyncio.run(auth.verify_password("alice", b"alice-pass")) is None
        assert asyncio.run(auth.verify_password("ALICE", b"alice-pass")) is None

    def test_hostile_names_never_match(self, tmp_path: Path) -> None:
        """Names with NUL, control characters, '/', or of absurd length are simply None."""
        auth = self.make(tmp_path, self._users())
        for name in ("Alice\0", "Alice\n", "\0", "", "../Alice", "Alice/..", "A" * 10_000,
                     "Alice\r", " Alice", "Alice:x"):
            assert asyncio.run(auth.verify_password(name, b"alice-pass")) is None
            assert asyncio.run(auth.lookup(name)) is None

    def test_lookup_needs_no_secret(self, tmp_path: Path) -> None:
        """lookup() finds a user without a password (LMTP RCPT, SASL EXTERNAL)."""
        auth = self.make(tmp_path, self._users())
        principal = asyncio.run(auth.lookup("Alice"))
        assert principal is not None
        assert principal.username == "Alice"

    def test_plain_secret_only_for_plain_storage(self, tmp_path: Path) -> None:
        """The PLAIN secret (APOP) exists for PLAIN storage only."""
        auth = self.make(tmp_path, self._users())
        assert asyncio.run(auth.secret_for("Alice", "PLAIN")) == b"alice-pass"
        assert asyncio.run(auth.secret_for("user-ssha512", "PLAIN")) is None
        assert asyncio.run(auth.secret_for("Alice", "NO-SUCH-MECH")) is None
