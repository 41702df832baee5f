"""The PROXY protocol (HAProxy's spec, versions 1 and 2): the header a load balancer puts in
front of a TCP connection to say whose connection it is.

Sans-IO: `parse` is handed the bytes received so far and answers "not yet", the header, or a
`ProxyHeaderError`.  It never asks for more than `MAX_HEADER` bytes, so a caller that buffers
until it answers holds at most that much per connection, whatever a sender does.

What the header says is believed only from a trusted proxy: that is the caller's business
(`relay.net.proxy_protocol`), not this module's.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

Address = Tuple[str, int]

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest line, CRLF included ("PROXY UNKNOWN" + two IPv6 + ports)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")  # signature, version|command, family|transport, length
# Addresses take at most 216 bytes (two UNIX paths); the rest is TLVs (an AWS VPC endpoint id,
# a TLS summary), which we skip.  4 KiB leaves a proxy plenty and a connection little to hold.
MAX_HEADER = 4096

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_V2_ADDRESSES = {_AF_INET: (4, struct.Struct("!4s4sHH")), _AF_INET6: (16, struct.Struct("!16s16sHH"))}


class ProxyHeaderError(ValueError):
    """Not a PROXY protocol header, or a broken one: the connection is to be closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header.  `source` and `destination` are None when the header carries no IP
    addresses (v2 LOCAL, a health check by the proxy itself; v1 UNKNOWN; v2 UNIX or
    unspecified): the connection's own endpoints stand."""

    version: int
    source: Optional[Address]
    destination: Optional[Address]
    size: int  # bytes of the stream the header took; what follows is the client's


def parse(data: bytes) -> Optional[ProxyHeader]:
    """The header at the start of `data`, None while `data` is a strict prefix of one.

    Raises ProxyHeaderError for anything else: no PROXY signature, a malformed line or block,
    or a header longer than `MAX_HEADER`.
    """
    if data[:12] == V2_SIGNATURE[:len(data)] and len(data) < 12:
        return None
    if data[:6] == V1_PREFIX[:len(data)] and len(data) < 6:
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol signature")


def _parse_v1(data: bytes) -> Optional[ProxyHeader]:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("a v1 line longer than 107 bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyHeaderError("a v1 line with a stray CR or LF")
        return None
    fields = data[:end].split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return ProxyHeader(1, None, None, end + 2)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("a v1 line that is not PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    version = 4 if fields[1] == b"TCP4" else 6
    source = (_v1_ip(fields[2], version), _v1_port(fields[4]))
    destination = (_v1_ip(fields[3], version), _v1_port(fields[5]))
    return ProxyHeader(1, _unmapped(source), _unmapped(destination), end + 2)


def _v1_ip(text: bytes, version: int) -> str:
    try:
        if b"%" in text:  # a scoped IPv6 address names an interface of the proxy's host
            raise ValueError
        ip = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError(f"{text[:40]!r} is not an IP address") from None
    if ip.version != version:
        raise ProxyHeaderError(f"{text[:40]!r} is not an IPv{version} address")
    return str(ip)


def _v1_port(text: bytes) -> int:
    if not (text.isdigit() and len(text) <= 5) or (text[:1] == b"0" and text != b"0"):
        raise ProxyHeaderError(f"{text[:10]!r} is not a port number")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"{port} is not a port number")
    return port


def _parse_v2(data: bytes) -> Optional[ProxyHeader]:
    if len(data) < V2_HEADER.size:
        return None
    _, version_command, family_transport, length = V2_HEADER.unpack_from(data)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 signature with version {version_command >> 4}")
    command = version_command & 0xF
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"v2 command {command} is neither LOCAL nor PROXY")
    size = V2_HEADER.size + length
    if size > MAX_HEADER:
        raise ProxyHeaderError(f"a v2 header of {size} bytes, more than {MAX_HEADER}")
    if len(data) < size:
        return None
    family = family_transport >> 4
    if family > _AF_UNIX or family_transport & 0xF > 2:
        raise ProxyHeaderError(f"v2 address family and transport 0x{family_transport:02x}")
    if command == _V2_LOCAL or family not in _V2_ADDRESSES:
        return ProxyHeader(2, None, None, size)
    width, layout = _V2_ADDRESSES[family]
    if length < layout.size:
        raise ProxyHeaderError(f"v2 addresses in {length} bytes, fewer than {layout.size}")
    source_ip, destination_ip, source_port, destination_port = layout.unpack_from(
        data, V2_HEADER.size)
    ip = ipaddress.IPv4Address if width == 4 else ipaddress.IPv6Address
    return ProxyHeader(2, _unmapped((str(ip(source_ip)), source_port)),
                       _unmapped((str(ip(destination_ip)), destination_port)), size)


def _unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (a dual-stack proxy's way of saying IPv4) as the IPv4 one,
    so the per-source limits and the ledger see one client, not two."""
    host, port = address
    if host.startswith("::ffff:"):
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
        if mapped is not None:
            return str(mapped), port
    return address


def encode_v2(source: Address, destination: Address) -> bytes:
    """A v2 PROXY header for a TCP connection from `source` to `destination`; a destination
    of the other family (a client whose own balancer said so) is sent as the unspecified
    address of the source's."""
    family = _AF_INET6 if ":" in source[0] else _AF_INET
    width, layout = _V2_ADDRESSES[family]
    to = ipaddress.ip_address(destination[0]).packed
    addresses = layout.pack(ipaddress.ip_address(source[0]).packed,
                            to if len(to) == width else bytes(width), source[1], destination[1])
    return V2_HEADER.pack(V2_SIGNATURE, 0x20 | _V2_PROXY, family << 4 | 1, len(addresses)) \
        + addresses
