"""Properties of the STUN codec and of the framing around it, checked on generated input.

The codec: every valid message survives encode/parse with its values and signatures, and
bytes of any shape (random, or a valid message damaged) raise only `StunDecodeError` when
parsed and only `StunError` when an attribute is decoded.  The framing: ChannelData over UDP
reaches the peer exactly when it is well formed, and a TCP stream cut anywhere yields the same
frames in the same order through the real stream protocol and core.

Examples are derandomized and few, so the suite's share stays a few seconds and CI sees the
same inputs every run; bench/fuzz.sh runs the long, coverage-guided search.
"""
from __future__ import annotations

import socket
from typing import List, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relay.net.listeners import ClientDatagramProtocol, ClientStreamFactory, LoginDispatcher, StreamLimits
from relay.proto import stun
from support.core_harness import PEER, Harness, channel_data
from support.stun_strategies import (
    SIGNATURES,
    addresses,
    known_attributes,
    messages,
    mutated,
    short_bytes,
    signing,
    wire_messages,
)

SETTINGS = settings(max_examples=40, deadline=1000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
CHEAP = settings(SETTINGS, max_examples=200)   # for draws of plain bytes
LISTENER = ("192.0.2.1", 3478)
CLIENT = ("198.51.100.20", 40000)
CHANNEL = 0x4000


def decode_everything(data: bytes) -> None:
    """What the server may do with received bytes; anything but the typed errors escapes."""
    try:
        msg = stun.parse(data)
    except stun.StunDecodeError:
        return
    for attr_type, _ in msg.attributes:
        if attr_type in stun.ATTRIBUTES:
            try:
                msg.get_all(attr_type)
            except stun.StunError as err:
                assert err.code == 400
    msg.unknown_required()
    assert msg.check_integrity(b"any key") in (True, False)


# -- the codec ---------------------------------------------------------------------------------

@SETTINGS
@given(messages(), signing)
def test_encode_parse_round_trip(drawn, sign):
    msg, added = drawn
    wire = msg.encode(**sign)
    parsed = stun.parse(wire)
    assert (parsed.method, parsed.cls, parsed.transaction_id) == (msg.method, msg.cls,
                                                                  msg.transaction_id)
    plain = [a for a in parsed.attributes if a[0] not in SIGNATURES]
    assert plain == msg.attributes
    for attr_type in {t for t, _ in added}:
        assert parsed.get_all(attr_type) == [v for t, v in added if t == attr_type]
    if sign["key"] is not None:
        assert parsed.check_integrity(sign["key"])
        assert not parsed.check_integrity(sign["key"] + b"!")
        expected = stun.MESSAGE_INTEGRITY_SHA256 if sign["sha256"] else stun.MESSAGE_INTEGRITY
        assert list(parsed.integrity_offsets) == [expected]
    else:
        assert not parsed.check_integrity(b"k")
    assert parsed.has(stun.FINGERPRINT) == sign["fingerprint"]
    # Serialising the parsed message again gives the same bytes.
    assert stun.Message(parsed.method, parsed.cls, parsed.transaction_id, plain).encode(**sign) == wire


@CHEAP
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_the_typed_errors(data):
    decode_everything(data)


@CHEAP
@given(st.integers(0, 0x3FFF), st.binary(max_size=120).map(lambda b: b[:len(b) & ~3]))
def test_random_bodies_behind_a_valid_header_raise_only_the_typed_errors(msg_type, body):
    # Past the cookie and length checks, so the attribute walk itself is what is fuzzed.
    decode_everything(stun.HEADER.pack(msg_type, len(body), stun.MAGIC_COOKIE, b"t" * 12) + body)


@SETTINGS
@given(mutated())
def test_mutated_messages_raise_only_the_typed_errors(data):
    decode_everything(data)


@SETTINGS
@given(wire_messages(), st.integers(0, 31))
def test_a_flipped_bit_under_fingerprint_or_integrity_is_caught(wire, bit):
    msg = stun.parse(wire)
    if not msg.has(stun.FINGERPRINT):
        return
    damaged = bytearray(wire)
    damaged[-1 - bit // 8] ^= 1 << (bit % 8)   # inside the CRC itself
    try:
        stun.parse(bytes(damaged))
    except stun.StunDecodeError:
        return
    raise AssertionError("a damaged FINGERPRINT parsed")


@st.composite
def send_indications(draw) -> bytes:
    """A Send indication, perhaps without its peer or data, among other attributes, signed
    or not: the relay's own parser for these must agree with `parse` on every one."""
    msg = stun.Message(stun.SEND, stun.INDICATION, draw(st.binary(min_size=12, max_size=12)))
    items = draw(st.lists(st.one_of(addresses.map(lambda a: (stun.XOR_PEER_ADDRESS, a)),
                                    short_bytes.map(lambda d: (stun.DATA, d)), known_attributes),
                          max_size=5))
    for attr_type, value in items:
        msg.add(attr_type, value)
    return msg.encode(**draw(signing))


def parsed_by_message(data: bytes):
    """What the full parser makes of a Send indication: (peer, payload) or None."""
    try:
        msg = stun.parse(data)
        if (msg.method, msg.cls) != (stun.SEND, stun.INDICATION):
            return None
        peer, payload = msg.get(stun.XOR_PEER_ADDRESS), msg.get(stun.DATA)
    except (stun.StunDecodeError, stun.StunError):
        return None
    return None if peer is None or payload is None else (peer, payload)


@SETTINGS
@given(st.one_of(send_indications(), mutated(send_indications())))
def test_the_send_indication_fast_path_agrees_with_parse(data):
    assert stun.parse_send_indication(data) == parsed_by_message(data)


@SETTINGS
@given(addresses, st.binary(max_size=70), st.binary(min_size=12, max_size=12))
def test_a_data_indication_parses_back(peer, payload, tid):
    msg = stun.parse(stun.data_indication(payload, peer, tid))
    assert (msg.method, msg.cls, msg.transaction_id) == (stun.DATA_METHOD, stun.INDICATION, tid)
    assert (msg.get(stun.XOR_PEER_ADDRESS), msg.get(stun.DATA)) == (peer, payload)


@SETTINGS
@given(addresses, st.binary(min_size=12, max_size=12))
def test_an_xor_address_is_the_address_xored_with_cookie_and_transaction_id(address, tid):
    """RFC 8489 section 14.2, spelled out byte by byte against the codec's packed fast path."""
    host, port = address
    family = stun.address_family(host)
    packed = socket.inet_pton(socket.AF_INET6 if family == stun.FAMILY_IPV6 else socket.AF_INET, host)
    mask = (stun.MAGIC_COOKIE.to_bytes(4, "big") + tid)[:len(packed)]
    expected = (bytes((0, family)) + (port ^ (stun.MAGIC_COOKIE >> 16)).to_bytes(2, "big")
                + bytes(a ^ b for a, b in zip(packed, mask)))
    msg = stun.Message(stun.ALLOCATE, stun.SUCCESS, tid).add(stun.XOR_RELAYED_ADDRESS, address)
    assert msg.attributes == [(stun.XOR_RELAYED_ADDRESS, expected)]


@CHEAP
@given(st.binary(max_size=40), st.integers(0, 40))
def test_stream_frame_length_is_none_an_error_or_a_whole_frame(buffer, offset):
    size = stun.stream_frame_length(buffer, offset)
    available = len(buffer) - offset
    if available < 4:
        assert size is None
    elif buffer[offset] >= 0x80:
        assert size == -1
    else:
        assert size is None or 4 <= size <= available


# -- ChannelData over UDP ----------------------------------------------------------------------

def allocation_with_channel(transport: str) -> Tuple[Harness, LoginDispatcher]:
    """A real core with one allocation from CLIENT holding CHANNEL bound to PEER."""
    harness = Harness()
    client = harness.client(address=CLIENT, transport=transport, listener=LISTENER)
    client.allocate_ok()
    assert client.channel_bind(CHANNEL, PEER).cls == stun.SUCCESS
    clock = Clock()
    clock.advance(harness.now)
    dispatch = LoginDispatcher(harness.server, Portal(harness.realm, [harness.checker]), clock)
    return harness, dispatch


@SETTINGS
@given(st.lists(st.tuples(st.integers(0x4000, 0x4002), st.integers(0, 70), st.binary(max_size=64)),
                max_size=10))
def test_udp_channel_data_reaches_the_peer_only_when_well_formed(frames):
    harness, dispatch = allocation_with_channel("udp")
    protocol = ClientDatagramProtocol(harness.server, dispatch, LISTENER)
    expected = []
    for number, declared, payload in frames:
        protocol.datagramReceived(stun.CHANNEL_HEADER.pack(number, declared) + payload, CLIENT)
        if number == CHANNEL and declared <= len(payload):
            expected.append((payload[:declared], PEER))
    assert harness.server.allocations[(LISTENER, CLIENT)].relays[stun.FAMILY_IPV4].sent == expected


# -- the stream framer -------------------------------------------------------------------------

class TCPStringTransport(StringTransport):
    """Twisted's in-memory transport with the one TCP option the stream protocol sets."""

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


def stream_protocol(harness: Harness, dispatch: LoginDispatcher):
    factory = ClientStreamFactory(harness.server, dispatch, "tcp", LISTENER, StreamLimits())
    protocol = factory.buildProtocol(IPv4Address("TCP", *CLIENT))
    protocol.callLater = Clock().callLater     # the idle timer, on a clock of its own
    transport = TCPStringTransport(peerAddress=IPv4Address("TCP", *CLIENT))
    protocol.makeConnection(transport)
    return protocol, transport


def cut(data: bytes, points: List[int]) -> List[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def stream_frames(data: bytes) -> List[bytes]:
    frames, offset = [], 0
    while offset < len(data):
        size = stun.stream_frame_length(data, offset)
        assert size is not None and size > 0
        frames.append(data[offset:offset + size])
        offset += size
    return frames


@SETTINGS
@given(st.lists(st.one_of(st.binary(min_size=12, max_size=12).map(lambda tid: ("binding", tid)),
                          st.binary(max_size=40).map(lambda payload: ("data", payload))),
                max_size=8),
       st.lists(st.integers(0, 1000), max_size=6))
def test_a_tcp_stream_cut_anywhere_yields_the_same_frames(frames, points):
    harness, dispatch = allocation_with_channel("tcp")
    protocol, transport = stream_protocol(harness, dispatch)
    stream = b"".join(
        stun.Message(stun.BINDING, stun.REQUEST, value).encode() if kind == "binding"
        else channel_data(CHANNEL, value, pad=True)
        for kind, value in frames)
    for chunk in cut(stream, points):
        protocol.dataReceived(chunk)
    assert not transport.disconnecting
    assert protocol.buffer == b""
    answered = [stun.parse(frame).transaction_id for frame in stream_frames(transport.value())]
    assert answered == [value for kind, value in frames if kind == "binding"]
    relay = harness.server.allocations[(LISTENER, CLIENT)].relays[stun.FAMILY_IPV4]
    assert relay.sent == [(value, PEER) for kind, value in frames if kind == "data"]


@SETTINGS
@given(st.lists(st.one_of(st.binary(max_size=60), mutated()), max_size=6),
       st.lists(st.integers(0, 1000), max_size=6))
def test_garbage_on_a_tcp_stream_is_framed_or_closes_the_connection(pieces, points):
    harness, dispatch = allocation_with_channel("tcp")
    protocol, transport = stream_protocol(harness, dispatch)
    for chunk in cut(b"".join(pieces), points):
        protocol.dataReceived(chunk)
        if transport.disconnecting:
            break
    if not transport.disconnecting:
        # Whatever is held back is the start of a frame still to come.
        assert stun.stream_frame_length(protocol.buffer) is None
    for frame in stream_frames(transport.value()):
        stun.parse(frame)
