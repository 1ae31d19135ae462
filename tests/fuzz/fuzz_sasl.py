"""Fuzz target: the SASL decoders and mechanisms (``pop3d.protocol.sasl``).

Properties, for any sequence of client messages and stored secrets:

* ``decode_response`` returns bytes or ``None`` and never raises;
* every mechanism step returns one of the five step kinds, never raises, and an exchange
  ends at the first verdict (``CheckPassword``, ``Outcome``, ``Failed``);
* a verdict names a well-formed identity (printable, at most ``MAX_USERNAME`` octets),
  a password to check is never empty, and only EXTERNAL can grant success without a
  proof (SCRAM and CRAM-MD5 proofs cannot be forged by a fuzzer: a success from them
  here means the proof check is broken).
"""

from __future__ import annotations

import base64

from pop3d.auth.schemes import ScramSecret
from pop3d.protocol import limits, sasl
from tests.fuzz import harness

_SCRAM = ScramSecret.derive(b"pencil", b"salt-for-fuzzing", 4096, "sha256").encode()


def _mechanism(kind: int) -> sasl.Mechanism:
    match kind % 5:
        case 0:
            return sasl.Plain()
        case 1:
            return sasl.Login()
        case 2:
            return sasl.CramMd5(b"<nonce.1@fuzz>")
        case 3:
            return sasl.ScramSha256("servernonce")
    return sasl.External("alice")


def _check_identity(name: str) -> None:
    assert name.isprintable(), "an identity with control characters"
    assert 0 < len(name.encode()) <= limits.MAX_USERNAME, "an identity of the wrong length"


def test_one_input(data: bytes) -> None:
    """Run one exchange of the mechanism the input picks, with its messages."""
    split = harness.Split(data)
    mech = _mechanism(split.byte())
    line = split.chunk()
    decoded = sasl.decode_response(line)
    # Non-canonical base64 ("YQ==" and "YR==" both give b"a") is accepted, as Python's
    # decoder does; harmless: the decoded octets are what every later check sees.
    if decoded is not None:
        assert line == b"=" or sasl.decode_response(base64.b64encode(decoded)) == decoded
    assert sasl.encode_challenge(line).endswith(b"\r\n")
    has_initial = split.byte() & 1
    step = mech.start(split.chunk() if has_initial else None)
    for _ in range(8):
        assert isinstance(
            step, sasl.Challenge | sasl.CheckPassword | sasl.NeedSecret | sasl.Outcome
            | sasl.Failed,
        )
        match step:
            case sasl.Challenge():
                step = mech.step(split.chunk())
            case sasl.NeedSecret(username, _):
                _check_identity(username)
                choice = split.byte() % 3
                secret = (None, _SCRAM if isinstance(mech, sasl.ScramSha256) else b"0" * 32,
                          split.chunk())[choice]
                step = mech.secret(secret)
            case sasl.CheckPassword(username, password):
                assert isinstance(mech, sasl.Plain | sasl.Login), "a password from a proof"
                _check_identity(username)
                assert password, "an empty password to check"
                return
            case sasl.Outcome(username, success, _):
                _check_identity(username)
                if success:
                    assert isinstance(mech, sasl.External), "success without a proof"
                    assert username == "alice"
                return
            case sasl.Failed(reason):
                assert reason
                assert reason.isascii()
                return


if __name__ == "__main__":
    harness.main("tests.fuzz.fuzz_sasl")
