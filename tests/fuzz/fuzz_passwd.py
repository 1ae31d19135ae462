"""Fuzz target: the Dovecot passwd-file parser (``parse_passwd_file``).

Properties, for any file content:

* it never raises (malformed lines are skipped with a warning);
* every user it returns has a valid user name (``valid_username``) equal to the first
  field of some line, and the first line of a name wins;
* a line it accepted parses alone to the same record (no state leaks between lines).
"""

from __future__ import annotations

from pop3d.auth import passwd_file
from tests.fuzz import harness


def test_one_input(data: bytes) -> None:
    """Parse ``data`` as a passwd-file and check every record."""
    users = passwd_file.parse_passwd_file(data, source="fuzz")
    lines = data.split(b"\n")  # as the parser splits them: each ends at LF, its CR kept
    for name, record in users.items():
        assert record.username == name
        assert passwd_file.valid_username(name), f"invalid user name {name!r} accepted"
        # The first line of that name that parses alone is the one that won.
        for line in lines:
            if line.split(b":", 1)[0] != name.encode():
                continue
            alone = passwd_file.parse_passwd_file(line + b"\n", source="fuzz")
            if alone:
                assert alone == {name: record}, "a record depends on the other lines"
                break
        else:
            raise AssertionError(f"no line of its own gives {name!r}")
        assert all(isinstance(k, str) and isinstance(v, str)
                   for k, v in record.attributes.items())


if __name__ == "__main__":
    harness.main("tests.fuzz.fuzz_passwd")
