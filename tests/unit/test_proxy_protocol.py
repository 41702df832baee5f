"""The PROXY protocol parser (relay.proto.proxy_protocol) and its Twisted wrapper
(relay.net.proxy_protocol): the spec's examples, properties on generated input, and the
wrapper's trust, deadline and late building of the wrapped protocol.

Properties: a valid header parses to what was encoded, with anything after it left to the
client; every strict prefix of a header is "not yet" (so a header cut anywhere by TCP is
read whole); bytes of any shape give "not yet", a header or `ProxyHeaderError`, nothing else;
and "not yet" never comes past `MAX_HEADER` bytes, so a connection buffers at most that.
"""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relay.net.proxy_protocol import ProxyTrust, parse_networks
from relay.proto.proxy_protocol import (
    MAX_HEADER,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    encode_v2,
    parse,
)

SETTINGS = settings(max_examples=200, deadline=1000, derandomize=True, database=None)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)


def v1(family: str, source, destination) -> bytes:
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode())


def v2(source, destination, tlvs: bytes = b"", command: int = 1) -> bytes:
    header = bytearray(encode_v2(source, destination) + tlvs)
    header[12] = 0x20 | command
    header[14:16] = (len(header) - 16).to_bytes(2, "big")
    return bytes(header)


@st.composite
def headers(draw):
    """(wire bytes, source, destination) of a valid v1 or v2 header."""
    ip = draw(st.sampled_from([ipv4, ipv6]))
    source, destination = (draw(ip), draw(ports)), (draw(ip), draw(ports))
    if draw(st.booleans()):
        return v1("TCP6" if ":" in source[0] else "TCP4", source, destination), source, destination
    tlvs = draw(st.binary(max_size=64))
    return v2(source, destination, tlvs), source, destination


# -- the spec's cases ---------------------------------------------------------------------

def test_v1_tcp4_and_what_follows():
    data = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n\x00\x01"
    assert parse(data) == ProxyHeader(1, ("203.0.113.7", 56324), ("192.0.2.1", 443), len(data) - 2)


def test_v1_tcp6_and_unknown():
    header = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
    assert header is not None and header.source == ("2001:db8::1", 1)
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, None, None, 15)
    assert parse(b"PROXY UNKNOWN ffff:f...f ffff:f...f 65535 65535\r\n").source is None


def test_v2_proxy_local_and_unix():
    header = parse(v2(("198.51.100.9", 40000), ("10.0.0.5", 3478)) + b"rest")
    assert header == ProxyHeader(2, ("198.51.100.9", 40000), ("10.0.0.5", 3478), 28)
    # LOCAL: the balancer's own health check; the connection's endpoints stand.
    assert parse(v2(("198.51.100.9", 1), ("10.0.0.5", 2), command=0)).source is None
    unix = V2_SIGNATURE + bytes([0x21, 0x31]) + (216).to_bytes(2, "big") + bytes(216)
    assert parse(unix) == ProxyHeader(2, None, None, 232)


def test_ipv4_mapped_sources_are_ipv4():
    header = parse(v2(("::ffff:203.0.113.7", 5), ("::ffff:192.0.2.1", 443)))
    assert header is not None and header.source == ("203.0.113.7", 5)
    assert parse(b"PROXY TCP6 ::ffff:203.0.113.7 ::1 5 6\r\n").source == ("203.0.113.7", 5)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n",                                   # not a PROXY header at all
    b"\x00\x01\x00\x00\x21\x12\xa4\x42",                      # STUN
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",                  # a field too many
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",                      # one too few
    b"PROXY TCP4 2001:db8::1 1.2.3.4 1 2\r\n",                # IPv6 under TCP4
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",                        # IPv4 under TCP6
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",                # port out of range
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",                   # leading zero
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",                   # two spaces
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",                   # a scope of the proxy's host
    b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4\n",                                  # LF without CR
    b"PROXY " + b"A" * 120,                                   # no CRLF within 107 bytes
    V2_SIGNATURE + bytes([0x11, 0x11, 0, 12]) + bytes(12),    # version 1 in a v2 signature
    V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12),    # command 2
    V2_SIGNATURE + bytes([0x21, 0x41, 0, 12]) + bytes(12),    # family 4
    V2_SIGNATURE + bytes([0x21, 0x13, 0, 12]) + bytes(12),    # transport 3
    V2_SIGNATURE + bytes([0x21, 0x11, 0, 8]) + bytes(8),      # IPv4 block too short
    V2_SIGNATURE + bytes([0x21, 0x21, 0, 12]) + bytes(12),    # IPv6 block too short
    V2_SIGNATURE + bytes([0x21, 0x11]) + (MAX_HEADER).to_bytes(2, "big"),  # too long
])
def test_malformed_headers_are_refused(data):
    with pytest.raises(ProxyHeaderError):
        parse(data)


# -- properties -----------------------------------------------------------------------------

@SETTINGS
@given(headers(), st.binary(max_size=32))
def test_a_valid_header_parses_to_what_was_sent(case, after):
    wire, source, destination = case
    header = parse(wire + after)
    assert header is not None and header.size == len(wire)
    assert header.source == source and header.destination == destination


@SETTINGS
@given(headers(), st.data())
def test_every_strict_prefix_of_a_header_is_not_yet(case, data):
    wire = case[0]
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert parse(wire[:cut]) is None


@settings(SETTINGS, max_examples=500)
@given(st.one_of(
    st.binary(max_size=MAX_HEADER + 64),
    st.binary(max_size=300).map(lambda rest: b"PROXY " + rest),
    st.binary(max_size=300).map(lambda rest: V2_SIGNATURE + rest),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 65535),
              st.binary(max_size=64)).map(
        lambda t: V2_SIGNATURE + bytes(t[:2]) + t[2].to_bytes(2, "big") + t[3]),
))
def test_any_bytes_give_not_yet_a_header_or_the_error_and_never_buffer_past_the_limit(data):
    try:
        header = parse(data)
    except ProxyHeaderError:
        return
    if header is None:
        assert len(data) < MAX_HEADER
    else:
        assert 0 < header.size <= min(len(data), MAX_HEADER)
        for address in (header.source, header.destination):
            if address is not None:
                ipaddress.ip_address(address[0])
                assert 0 <= address[1] <= 65535


# -- the wrapper ----------------------------------------------------------------------------

class Recorder(Protocol):
    def __init__(self, addr):
        self.built_for = addr
        self.received = b""
        self.peer = None

    def connectionMade(self):
        self.peer = self.transport.getPeer()

    def dataReceived(self, data):
        self.received += data


class RecordingFactory(Factory):
    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        protocol = Recorder(addr)
        self.built.append(protocol)
        return protocol


TRUST = ProxyTrust(parse_networks(["10.0.0.0/8", "2001:db8::1"]), timeout=5)


def connect(source: str):
    inner = RecordingFactory()
    clock = Clock()
    factory = TRUST.wrap(inner)
    protocol = factory.buildProtocol(IPv4Address("TCP", source, 1234))
    protocol.callLater = clock.callLater
    transport = StringTransport(peerAddress=IPv4Address("TCP", source, 1234))
    protocol.makeConnection(transport)
    return inner, protocol, transport, clock


def test_the_wrapped_protocol_is_built_for_the_client_once_the_header_is_in():
    inner, protocol, transport, _ = connect("10.1.2.3")
    wire = v2(("203.0.113.7", 5555), ("192.0.2.1", 443)) + b"hello"
    for i in range(len(wire)):  # one byte at a time: TCP may cut anywhere
        assert not inner.built or i >= 28
        protocol.dataReceived(wire[i:i + 1])
    [built] = inner.built
    assert (built.built_for.host, built.built_for.port) == ("203.0.113.7", 5555)
    assert (built.peer.host, built.peer.port) == ("203.0.113.7", 5555)
    assert protocol.getHost().port == 443
    assert built.received == b"hello"
    assert not transport.disconnecting


def test_local_keeps_the_balancers_address():
    inner, protocol, _, _ = connect("10.1.2.3")
    protocol.dataReceived(v2(("203.0.113.7", 5555), ("192.0.2.1", 443), command=0))
    assert inner.built[0].peer.host == "10.1.2.3"


def test_an_untrusted_source_is_reset_before_anything_is_read():
    inner, protocol, transport, _ = connect("192.0.2.99")
    assert transport.disconnecting or getattr(transport, "aborted", False)
    protocol.dataReceived(b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\r\n")
    assert inner.built == []


def test_garbage_from_a_trusted_source_is_reset_and_never_built():
    inner, protocol, transport, _ = connect("10.1.2.3")
    protocol.dataReceived(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12))
    assert transport.disconnecting or getattr(transport, "aborted", False)
    assert inner.built == []


def test_a_header_that_never_completes_times_out():
    inner, protocol, transport, clock = connect("10.1.2.3")
    protocol.dataReceived(b"PROXY TCP4 203.0.113.7")
    clock.advance(4.9)
    assert not (transport.disconnecting or getattr(transport, "aborted", False))
    clock.advance(0.2)
    assert transport.disconnecting or getattr(transport, "aborted", False)
    assert inner.built == []


def test_networks_are_checked():
    with pytest.raises(ValueError, match="'10.0.0.300'"):
        parse_networks(["10.0.0.300"])
    factory = TRUST.wrap(RecordingFactory())
    assert factory.trusts("10.255.0.1") and factory.trusts("2001:db8::1")
    assert not factory.trusts("2001:db8::2") and not factory.trusts("11.0.0.1")
