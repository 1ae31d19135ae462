"""Fuzz target: the PROXY protocol v1/v2 header parser (``pop3d.server.proxy_protocol``).

Properties, for any first octets of a connection:

* ``parse`` returns a header, ``None`` (a valid beginning: needs more), or raises
  ``ProxyHeaderError``, and nothing else;
* a header takes 1..``MAX_HEADER`` octets of the input (a v1 line at most 107), and is the
  same whatever follows it, and read from exactly its own octets;
* ``None`` only before ``MAX_HEADER`` octets, and every shorter prefix is ``None`` too;
  a refused input stays refused whatever is appended;
* a client address is a valid IP address with a port in 0..65535.
"""

from __future__ import annotations

import ipaddress

from pop3d.server import proxy_protocol as pp
from tests.fuzz import harness


def _verdict(data: bytes) -> pp.ProxyHeader | str | None:
    try:
        return pp.parse(data)
    except pp.ProxyHeaderError:
        return "refused"


def test_one_input(data: bytes) -> None:
    """Check the properties above on ``data`` and on its prefixes and extensions."""
    verdict = _verdict(data)
    if verdict == "refused":
        assert _verdict(data + b"\r\n" + data) == "refused", "refused, then accepted"
        return
    if verdict is None:
        assert len(data) < pp.MAX_HEADER, "no verdict after MAX_HEADER octets"
        for n in range(len(data)):
            assert _verdict(data[:n]) is None, "a prefix of a valid beginning is refused"
        return
    assert isinstance(verdict, pp.ProxyHeader)
    assert 0 < verdict.length <= min(len(data), pp.MAX_HEADER)
    if verdict.version == 1:
        assert verdict.length <= pp.V1_MAX_LINE
    assert _verdict(data[: verdict.length]) == verdict, "depends on what follows"
    assert _verdict(data[: verdict.length] + b"USER x\r\n") == verdict
    assert pp.starts_like_header(data) is True
    for address in (verdict.source, verdict.destination):
        if address is not None:
            host, port = address
            ipaddress.ip_address(host)
            assert 0 <= port <= 65535


if __name__ == "__main__":
    harness.main("tests.fuzz.fuzz_proxy")
