"""The PROXY protocol parser (pop3d.server.proxy_protocol): strict, bounded, pure."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3d.protocol import limits
from pop3d.server.proxy_protocol import (
    MAX_HEADER,
    PP2_CLIENT_SSL,
    PP2_TYPE_SSL,
    V1_MAX_LINE,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse,
    starts_like_header,
)

# ---------------------------------------------------------------------- a reference encoder


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(client: int = PP2_CLIENT_SSL, verify: int = 0, subs: bytes = b"") -> bytes:
    return tlv(PP2_TYPE_SSL, struct.pack("!BI", client, verify) + subs)


def v2(
    command: int = 1,
    family: int = 1,
    protocol: int = 1,
    block: bytes | None = None,
    *,
    src: str = "192.0.2.7",
    dst: str = "198.51.100.1",
    sport: int = 51234,
    dport: int = 110,
    tlvs: bytes = b"",
    version: int = 2,
) -> bytes:
    if block is None:
        if family in (1, 2):
            block = (
                ipaddress.ip_address(src).packed
                + ipaddress.ip_address(dst).packed
                + struct.pack("!HH", sport, dport)
            )
        elif family == 3:
            block = b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")
        else:
            block = b""
    block += tlvs
    return V2_SIGNATURE + bytes([version << 4 | command, family << 4 | protocol]) + struct.pack(
        "!H", len(block)
    ) + block


# ---------------------------------------------------------------------- version 1


def test_v1_spec_example() -> None:
    """The specification's example line gives the client's address and port."""
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert parse(line + b"GET / HTTP/1.1\r\n") == ProxyHeader(
        version=1,
        length=len(line),
        source=("192.168.0.1", 56324),
        destination=("192.168.0.11", 443),
    )


def test_v1_tcp6_and_longest_lines() -> None:
    """TCP6 lines and the spec's worst-case 107-octet UNKNOWN line are accepted."""
    ff = ":".join(["ffff"] * 8)
    line = f"PROXY TCP6 {ff} {ff} 65535 65535\r\n".encode()
    assert len(line) == 104
    header = parse(line)
    assert header is not None
    assert header.source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
    worst = f"PROXY UNKNOWN {ff} {ff} 65535 65535\r\n".encode()
    assert len(worst) == V1_MAX_LINE
    assert parse(worst) == ProxyHeader(version=1, length=V1_MAX_LINE)
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(version=1, length=15)
    mapped = parse(b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 1 2\r\n")
    assert mapped is not None
    assert mapped.source == ("2001:db8::1", 1)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n",  # LF alone
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",  # a field missing
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 1\r\n",  # one too many
        b"PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n",  # two spaces
        b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n",  # heading zero
        b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",  # heading zero in port
        b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",  # port out of range
        b"PROXY TCP4 192.168.0.1 192.168.0.11 +80 443\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 192.168.0.1 192.168.0.11 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # zone id
        b"PROXY UDP4 192.168.0.1 192.168.0.11 1 2\r\n",
        b"PROXY tcp4 192.168.0.1 192.168.0.11 1 2\r\n",
        b"PROXY\r\n",
        b"PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 \xff\r\n",
        b"PROXY TCP4 \xd9\xa1.2.3.4 1.2.3.4 1 2\r\n",
        b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"CAPA\r\n",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
    ],
)
def test_v1_garbage_refused(line: bytes) -> None:
    """Anything that is not exactly a v1 line is refused, never half-believed."""
    with pytest.raises(ProxyHeaderError):
        parse(line)


def test_v1_overlong_refused_at_107() -> None:
    """No CRLF within 107 octets: refused as soon as 107 octets are there."""
    line = b"PROXY UNKNOWN " + b"x" * 200
    assert parse(line[:106]) is None
    with pytest.raises(ProxyHeaderError):
        parse(line[:107])
    with pytest.raises(ProxyHeaderError):
        parse(line)


def test_v1_truncated_waits() -> None:
    """Every proper prefix of a valid line asks for more octets."""
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    for n in range(len(line)):
        assert parse(line[:n]) is None, n


# ---------------------------------------------------------------------- version 2


def test_v2_tcp4() -> None:
    """A v2 PROXY/TCP4 header gives the client's address; what follows is the stream's."""
    header = v2()
    parsed = parse(header + b"\x16\x03\x01")
    assert parsed == ProxyHeader(
        version=2,
        length=len(header),
        source=("192.0.2.7", 51234),
        destination=("198.51.100.1", 110),
    )


def test_v2_tcp6() -> None:
    """A v2 PROXY/TCP6 header gives the client's IPv6 address in compressed form."""
    parsed = parse(v2(family=2, src="2001:db8::7", dst="2001:db8::1"))
    assert parsed is not None
    assert parsed.source == ("2001:db8::7", 51234)


def test_v2_ssl_tlv_marks_tls() -> None:
    """PP2_TYPE_SSL with PP2_CLIENT_SSL: the client's TLS ended at the balancer."""
    subs = tlv(0x21, b"TLSv1.3") + tlv(0x23, b"TLS_AES_256_GCM_SHA384")
    parsed = parse(v2(tlvs=tlv(0x01, b"pop3") + ssl_tlv(subs=subs) + tlv(0x04, b"")))
    assert parsed is not None
    assert parsed.tls
    assert parsed.source == ("192.0.2.7", 51234)
    # The TLV without the client bit, and no TLV at all, say nothing about TLS.
    no_bit = parse(v2(tlvs=ssl_tlv(client=0)))
    assert no_bit is not None
    assert not no_bit.tls
    plain = parse(v2())
    assert plain is not None
    assert not plain.tls


def test_v2_local_uses_socket_address() -> None:
    """A LOCAL command (a health check) carries no client: the block is skipped whole."""
    header = v2(command=0, family=1, tlvs=b"\xff\xff")  # even a malformed TLV is skipped
    parsed = parse(header)
    assert parsed == ProxyHeader(version=2, length=len(header), local=True)
    empty = v2(command=0, family=0, protocol=0)
    assert parse(empty) == ProxyHeader(version=2, length=16, local=True)


@pytest.mark.parametrize(
    ("family", "protocol"),
    [(0, 0), (0, 1), (1, 0), (1, 2), (2, 2), (3, 1), (3, 2)],
)
def test_v2_unspec_unix_dgram_fall_back(family: int, protocol: int) -> None:
    """UNSPEC, UNIX and datagram headers are valid but carry no TCP client address."""
    src = "2001:db8::7" if family == 2 else "192.0.2.7"
    block = b"" if family == 0 else None
    parsed = parse(v2(family=family, protocol=protocol, block=block, src=src, dst=src))
    assert parsed is not None
    assert parsed.source is None
    assert not parsed.local


@pytest.mark.parametrize(
    "data",
    [
        v2(version=1),
        v2(version=3),
        v2(command=2),
        v2(command=0xF),
        v2(family=4, block=b""),
        v2(protocol=3),
        v2(block=b"\x00" * 11),  # IPv4 block too short
        v2(family=2, block=b"\x00" * 35),
        v2(family=3, block=b"\x00" * 215),
        v2(tlvs=b"\x20"),  # truncated TLV header
        v2(tlvs=b"\x20\x00\x05\x01"),  # TLV longer than the header
        v2(tlvs=tlv(PP2_TYPE_SSL, b"\x01\x00\x00")),  # SSL TLV too short
        v2(tlvs=ssl_tlv(subs=b"\x21\x00\x09TLS")),  # sub-TLV past its parent
        v2(tlvs=ssl_tlv() + ssl_tlv()),  # two SSL TLVs
        v2(tlvs=tlv(0x03, b"\x00\x00\x00")),  # CRC32C not 4 octets
        V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c" + b"\x00" * 12,
        V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", limits.PROXY_V2_MAX_LENGTH + 1),
    ],
)
def test_v2_malformed_refused(data: bytes) -> None:
    """A v2 header with a wrong field or bounds is refused."""
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_v2_overlong_refused_before_reading_it() -> None:
    """A length past the bound is refused from the 16 fixed octets alone."""
    fixed = V2_SIGNATURE + b"\x21\x11\xff\xff"
    with pytest.raises(ProxyHeaderError):
        parse(fixed)


def test_v2_truncated_waits() -> None:
    """Every proper prefix of a valid v2 header asks for more octets."""
    header = v2(tlvs=ssl_tlv(subs=tlv(0x22, b"client")))
    for n in range(len(header)):
        assert parse(header[:n]) is None, n


def test_starts_like_header() -> None:
    """The cheap look at a client's first octets: yes, no, or not yet."""
    assert starts_like_header(b"PROXY TCP4 ") is True
    assert starts_like_header(V2_SIGNATURE) is True
    assert starts_like_header(b"PRO") is None
    assert starts_like_header(b"\r\n\r\n") is None
    assert starts_like_header(b"") is None
    assert starts_like_header(b"PASS x\r\n") is False
    assert starts_like_header(b"CAPA\r\n") is False
    assert starts_like_header(b"\r\nCAPA") is False
    assert starts_like_header(b"\x16\x03\x01") is False


# ---------------------------------------------------------------------- properties


@given(st.binary(max_size=MAX_HEADER + 64))
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    """Any octets give a header, None, or ProxyHeaderError; a header never overruns."""
    try:
        header = parse(data)
    except ProxyHeaderError:
        return
    if header is not None:
        assert 0 < header.length <= min(len(data), MAX_HEADER)


@given(
    st.sampled_from([b"PROXY ", V2_SIGNATURE]),
    st.binary(max_size=MAX_HEADER + 64),
)
def test_arbitrary_tails_after_a_signature(prefix: bytes, tail: bytes) -> None:
    """After a valid signature, any octets still give a verdict within the bound."""
    data = prefix + tail
    try:
        header = parse(data)
    except ProxyHeaderError:
        return
    if header is None:
        assert len(data) < MAX_HEADER
    else:
        assert header.length <= len(data)


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_port = st.integers(min_value=0, max_value=65535)


@given(st.booleans(), _ipv4, _ipv4, _ipv6, _ipv6, _port, _port, st.binary(max_size=40))
def test_v1_round_trip(
    six: bool, s4: str, d4: str, s6: str, d6: str, sport: int, dport: int, rest: bytes
) -> None:
    """Any line a correct sender writes parses back to its addresses, whole or in pieces."""
    src, dst = (s6, d6) if six else (s4, d4)
    line = f"PROXY {'TCP6' if six else 'TCP4'} {src} {dst} {sport} {dport}\r\n".encode()
    header = parse(line + rest)
    assert header is not None
    assert header.length == len(line)
    assert header.source == (src, sport)
    assert header.destination == (dst, dport)
    assert parse(line[: len(line) // 2]) is None


@given(
    st.booleans(),
    _ipv4,
    _ipv6,
    _port,
    st.lists(st.tuples(st.integers(0x00, 0xFF).filter(lambda k: k not in (0x03, 0x20)),
                       st.binary(max_size=50)), max_size=5),
    st.one_of(st.none(), st.integers(0, 255)),
    st.binary(max_size=40),
)
def test_v2_round_trip(
    six: bool,
    a4: str,
    a6: str,
    sport: int,
    others: list[tuple[int, bytes]],
    ssl_client: int | None,
    rest: bytes,
) -> None:
    """Any v2 header a correct sender writes parses back, TLVs and SSL bit included."""
    tlvs = b"".join(tlv(k, v) for k, v in others)
    if ssl_client is not None:
        tlvs += ssl_tlv(client=ssl_client, subs=tlv(0x21, b"TLSv1.2"))
    src = a6 if six else a4
    header = v2(family=2 if six else 1, src=src, dst=src, sport=sport, tlvs=tlvs)
    parsed = parse(header + rest)
    assert parsed is not None
    assert parsed.length == len(header)
    assert parsed.source == (src, sport)
    assert parsed.tls == (ssl_client is not None and bool(ssl_client & PP2_CLIENT_SSL))
