"""The admission refusal comes from the protocol core; the transport writes no POP3 text.

(Issue 14: "the core owns its outcomes ... the transport writes no POP3 text of its own".)
The wire form of a refusal through a real server is checked by the hostile-client tests
(``tests/integration/test_accept.py``, ``test_tls.py``, ``test_haproxy.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pop3d.server
from pop3d.protocol import Cap, refusal


@pytest.mark.parametrize(
    ("cap", "line"),
    [
        ("total", b"-ERR [SYS/TEMP] too many connections\r\n"),
        ("per_ip", b"-ERR [SYS/TEMP] too many connections from your address\r\n"),
    ],
)
def test_refusal_is_the_cores(cap: Cap, line: bytes) -> None:
    """One ``-ERR [SYS/TEMP]`` line per cap, in place of the greeting."""
    assert refusal(cap) == line


def test_transport_builds_no_reply() -> None:
    """No module of ``pop3d.server`` builds a status line: no ``+OK``/``-ERR`` literal, no
    reply builder of ``protocol.replies`` imported."""
    folder = Path(pop3d.server.__file__).parent
    found = []
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
                text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
                if text.startswith(("+OK", "-ERR")):
                    found.append(f"{path.name}:{node.lineno}: {text!r}")
            if isinstance(node, ast.ImportFrom) and node.module == "pop3d.protocol.replies":
                built = [a.name for a in node.names if a.name in ("ok", "err", "multiline")]
                if built:
                    found.append(f"{path.name}:{node.lineno}: imports {built}")
    assert not found, found
