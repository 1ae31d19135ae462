"""The PROXY protocol, versions 1 and 2, as a receiver: pure functions over bytes.

A load balancer (HAProxy, nginx, AWS NLB, ...) in front of pop3d opens its own connection
to us, so the socket's peer address is the balancer's.  With the PROXY protocol it sends,
before anything else, a header naming the client it relays (HAProxy's
``doc/proxy-protocol.txt``, the specification quoted below).  :func:`parse` reads that
header from the first octets of a connection; :mod:`pop3d.server.accept` decides whose
headers are believed (``[server] proxy_protocol_from``) and does the I/O.

Rules:

* **Strict.**  "Any sequence which does not exactly match the protocol must be discarded
  and cause the receiver to abort the connection."  Version 1: one line, ``PROXY``, one
  space, ``TCP4``/``TCP6``/``UNKNOWN``, then exactly four fields separated by single
  spaces, canonical addresses (no heading zeroes, no IPv6 zone), decimal ports without
  heading zeroes, ``CRLF`` (a lone CR or LF is refused).  Version 2: the version nibble is
  2, the command LOCAL or PROXY, family and protocol among the assigned values, the
  address block as long as its family needs, the TLVs exactly filling the rest.
* **Bounded.**  A version 1 line is at most :data:`V1_MAX_LINE` (107) octets; a version 2
  header is 16 octets plus its length, and that length is at most
  :data:`~pop3d.protocol.limits.PROXY_V2_MAX_LENGTH`.  The caller never needs to hold more than
  :data:`MAX_HEADER` octets to get a verdict.
* **Falls back where the specification says to.**  A LOCAL command (a health check of the
  balancer itself), ``UNKNOWN``, the UNSPEC family or protocol, a datagram protocol and
  the UNIX family carry no usable client address: :attr:`ProxyHeader.source` is ``None``
  and the connection's own peer address stands.
* **The SSL TLV.**  ``PP2_TYPE_SSL`` with ``PP2_CLIENT_SSL`` set says the client reached
  the balancer over TLS, which the balancer ended: :attr:`ProxyHeader.tls` is true.
  Its sub-TLVs (version, CN, cipher, ...) are checked for bounds and otherwise ignored.
* ``PP2_TYPE_CRC32C`` is checked for its length (4 octets) but not verified: the
  specification makes the check optional, and the header comes from a balancer we
  trust on a network we trust.

Nothing here does I/O, keeps state or logs: give it the octets received so far.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from pop3d.protocol import limits

__all__ = [
    "MAX_HEADER",
    "V1_MAX_LINE",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "parse",
    "starts_like_header",
]

#: "If the CRLF sequence is not found in the first 107 characters, the receiver should
#: declare the line invalid" (the longest line is ``PROXY UNKNOWN`` with IPv6 fields).
V1_MAX_LINE = 107

#: The 12 octets every version 2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_V1_PREFIX = b"PROXY "

#: Octets a caller may have to hold before :func:`parse` gives a verdict.
MAX_HEADER = max(V1_MAX_LINE, 16 + limits.PROXY_V2_MAX_LENGTH)

_V2_FIXED = struct.Struct("!BBH")
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
_V2_UNIX_LENGTH = 216
_TLV = struct.Struct("!BH")

_LOCAL, _PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
#: The address blocks of the IP families: source, destination, their ports.
_V2_ADDRESSES = {_AF_INET: _V2_INET, _AF_INET6: _V2_INET6}
_PROTO_UNSPEC, _STREAM, _DGRAM = 0x0, 0x1, 0x2

#: TLV types (section 2.2) this parser looks into.
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_SSL = 0x20
#: ``PP2_TYPE_SSL``'s client field: the client connected over SSL/TLS.
PP2_CLIENT_SSL = 0x01

_IPV6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")


class ProxyHeaderError(ValueError):
    """The octets are not a valid PROXY header: the connection must be closed."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header."""

    #: 1 (text) or 2 (binary).
    version: int
    #: Octets the header took: the connection's own data starts after them.
    length: int
    #: The client's address and port, or ``None``: use the connection's peer address
    #: (LOCAL command, ``UNKNOWN``, UNSPEC, UNIX or datagram families).
    source: tuple[str, int] | None = None
    #: The address and port the client connected to (the balancer's), when known.
    destination: tuple[str, int] | None = None
    #: The client reached the balancer over TLS (version 2 ``PP2_TYPE_SSL`` TLV with
    #: ``PP2_CLIENT_SSL``), which the balancer ended.
    tls: bool = False
    #: A LOCAL command: the balancer's own connection (a health check).
    local: bool = False


def starts_like_header(data: bytes) -> bool | None:
    """Whether ``data`` begins like a PROXY header: True, False, or None (too short to say).

    Cheap, for telling a header from a client's first octets.
    """
    for signature in (_V1_PREFIX, V2_SIGNATURE):
        n = min(len(data), len(signature))
        if data[:n] == signature[:n]:
            return True if n == len(signature) else None
    return False


def parse(data: bytes) -> ProxyHeader | None:
    """Parse the PROXY header at the start of ``data``.

    Args:
        data: the first octets received on the connection (more may follow the header).

    Returns:
        The header, or ``None`` when ``data`` is a valid beginning that needs more octets.

    Raises:
        ProxyHeaderError: ``data`` does not begin with a valid header (or with a valid
            beginning of one, or the header would be longer than this parser accepts).

    """
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data:
        return None
    raise ProxyHeaderError("not a PROXY protocol header")


# ---------------------------------------------------------------------- version 1


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[:V1_MAX_LINE]
    if not _V1_PREFIX.startswith(head[:6]):
        raise ProxyHeaderError("not a PROXY protocol header")
    end = head.find(b"\r\n")
    if end < 0:
        # A CR or LF anywhere but in the final CRLF is malformed; so is a full-length
        # line without one.
        stray = head.find(b"\n")
        if stray >= 0 or b"\r" in head[:-1] or len(head) >= V1_MAX_LINE:
            raise ProxyHeaderError("PROXY v1 line not ended by CRLF within 107 octets")
        return None
    line = head[:end]
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("stray CR or LF in a PROXY v1 line")
    length = end + 2
    fields = line.split(b" ")
    if fields[0] != b"PROXY" or len(fields) < 2:
        raise ProxyHeaderError("not a PROXY v1 line")
    family = fields[1]
    if family == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF is found"
        return ProxyHeader(version=1, length=length)
    if family not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise ProxyHeaderError("PROXY v1: bad protocol or field count")
    v6 = family == b"TCP6"
    src = _v1_address(fields[2], v6=v6)
    dst = _v1_address(fields[3], v6=v6)
    sport, dport = _v1_port(fields[4]), _v1_port(fields[5])
    return ProxyHeader(version=1, length=length, source=(src, sport), destination=(dst, dport))


def _v1_address(text: bytes, *, v6: bool) -> str:
    # ipaddress also takes zone ids ("fe80::1%eth0"); the protocol does not.
    if v6 and (not text or not set(text) <= _IPV6_CHARS):
        raise ProxyHeaderError("PROXY v1: bad address")
    try:
        if v6:
            return str(ipaddress.IPv6Address(text.decode("ascii")))
        # IPv4Address refuses heading zeroes, as the protocol does ("no octal").
        return str(ipaddress.IPv4Address(text.decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("PROXY v1: bad address") from None


def _v1_port(text: bytes) -> int:
    if not (1 <= len(text) <= 5) or not text.isdigit() or (len(text) > 1 and text[0] == 0x30):
        raise ProxyHeaderError("PROXY v1: bad port")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError("PROXY v1: port out of range")
    return port


# ---------------------------------------------------------------------- version 2


def _parse_v2(data: bytes) -> ProxyHeader | None:
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] != V2_SIGNATURE[:n]:
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(data) < 16:
        # Check what has arrived of the two fixed bytes as early as possible.
        if len(data) > 12 and data[12] >> 4 != 2:
            raise ProxyHeaderError("PROXY v2: bad version")
        return None
    ver_cmd, fam, size = _V2_FIXED.unpack_from(data, 12)
    version, command = ver_cmd >> 4, ver_cmd & 0x0F
    family, protocol = fam >> 4, fam & 0x0F
    if version != 2:
        raise ProxyHeaderError("PROXY v2: bad version")
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError("PROXY v2: bad command")
    if family > _AF_UNIX or protocol > _DGRAM:
        raise ProxyHeaderError("PROXY v2: bad family or protocol")
    if size > limits.PROXY_V2_MAX_LENGTH:
        raise ProxyHeaderError("PROXY v2: header too long")
    length = 16 + size
    if len(data) < length:
        return None
    block = data[16:length]
    if command == _LOCAL:
        # "must use the real connection endpoints and discard the protocol block"
        return ProxyHeader(version=2, length=length, local=True)
    source = destination = None
    if family in _V2_ADDRESSES:
        layout = _V2_ADDRESSES[family]
        if size < layout.size:
            raise ProxyHeaderError("PROXY v2: address block shorter than its family's")
        s, d, sport, dport = layout.unpack_from(block)
        tlvs = block[layout.size :]
        source = (str(ipaddress.ip_address(s)), sport)
        destination = (str(ipaddress.ip_address(d)), dport)
    elif family == _AF_UNIX:
        if size < _V2_UNIX_LENGTH:
            raise ProxyHeaderError("PROXY v2: short UNIX address block")
        tlvs = block[_V2_UNIX_LENGTH:]
    else:
        # AF_UNSPEC: "The receiver should ignore address information", and without a
        # family there is no telling where TLVs would start.
        return ProxyHeader(version=2, length=length)
    tls = _tlvs_say_tls(tlvs)
    if protocol != _STREAM or family == _AF_UNIX:
        # Not a TCP client: fall back to the connection's own endpoints.
        source = destination = None
    return ProxyHeader(
        version=2, length=length, source=source, destination=destination, tls=tls
    )


def _split_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """The (type, value) pairs of a TLV block that they must exactly fill."""
    out: list[tuple[int, bytes]] = []
    at = 0
    while at < len(data):
        if len(data) - at < _TLV.size:
            raise ProxyHeaderError("PROXY v2: truncated TLV")
        kind, size = _TLV.unpack_from(data, at)
        at += _TLV.size
        if size > len(data) - at:
            raise ProxyHeaderError("PROXY v2: TLV longer than the header")
        out.append((kind, data[at : at + size]))
        at += size
    return out


def _tlvs_say_tls(data: bytes) -> bool:
    tls = False
    seen_ssl = False
    for kind, value in _split_tlvs(data):
        if kind == PP2_TYPE_CRC32C and len(value) != 4:
            raise ProxyHeaderError("PROXY v2: CRC32C TLV is not 4 octets")
        if kind == PP2_TYPE_SSL:
            if seen_ssl:
                raise ProxyHeaderError("PROXY v2: two SSL TLVs")
            seen_ssl = True
            # struct pp2_tlv_ssl { uint8_t client; uint32_t verify; struct pp2_tlv sub_tlv[0]; }
            if len(value) < 5:
                raise ProxyHeaderError("PROXY v2: short SSL TLV")
            _split_tlvs(value[5:])  # the sub-TLVs must be well formed, too
            tls = bool(value[0] & PP2_CLIENT_SSL)
    return tls
