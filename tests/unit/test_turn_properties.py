"""Properties of the sans-IO TURN core under generated request sequences.

Two clients (one UDP, one TCP) send random mixes of signed TURN requests with random
attributes, raw and damaged bytes, ChannelData, Send indications and peer datagrams while the
clock jumps.  Whatever the sequence: the core never raises, every reply is a well-formed STUN
message, no relay socket ever sends to a peer the default policy forbids, and once every
lifetime has passed every allocation and relay socket is released.
"""
from __future__ import annotations

from typing import List, Union

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.core.allocation import Address
from relay.core.peers import PeerPolicy
from relay.proto import stun
from support.core_harness import PEER, PEER_V6, RELAY_V4, RELAY_V6, CoreClient, Harness, RawValue
from support.stun_strategies import VALUES, addresses, known_attributes, mutated, unknown_attributes

# The peers the issue lists as forbidden, the relay's own addresses, and allowed ones.
FORBIDDEN_HOSTS = [
    "127.0.0.1", "127.1.2.3", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    "::ffff:169.254.169.254", "::127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::",
    "169.254.169.254", "fe80::1", "fc00::1", "fd12::5", "10.0.0.1", "172.16.0.1", "192.168.1.1",
    "100.64.0.1", "198.18.0.1", "224.0.0.1", "ff02::1", "240.0.0.1", "255.255.255.255",
    RELAY_V4, RELAY_V6,
]


def mostly(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """`common` nine times in ten: random values alone would almost never meet again."""
    return st.integers(0, 9).flatmap(lambda i: common if i else rare)


# Mostly an index into a pool of three (one forbidden peer per example, two allowed ones), so
# that a later request often names a peer an earlier one did.
peers = mostly(st.integers(0, 2), addresses)
channels = mostly(st.integers(0x4000, 0x4001), st.integers(0, 0xFFFF))
requests = st.sampled_from([stun.ALLOCATE, stun.REFRESH, stun.CREATE_PERMISSION,
                            stun.CHANNEL_BIND, stun.BINDING, stun.SEND, 0x00A])
allocate_extras = st.lists(st.one_of(
    st.tuples(st.sampled_from([stun.LIFETIME, stun.REQUESTED_ADDRESS_FAMILY, stun.EVEN_PORT,
                               stun.DONT_FRAGMENT, stun.ADDITIONAL_ADDRESS_FAMILY,
                               stun.RESERVATION_TOKEN]), st.just(None)).flatmap(
        lambda t: st.tuples(st.just(t[0]), VALUES[t[0]])),
    st.tuples(st.just(stun.REQUESTED_ADDRESS_FAMILY), st.sampled_from([1, 2])),
), max_size=3)
who = st.integers(0, 1)

relaying = st.one_of(
    st.tuples(st.just("send"), who, peers, st.binary(max_size=20)),
    st.tuples(st.just("channel-data"), who, channels, st.binary(max_size=20)),
    st.tuples(st.just("from-peer"), who, peers, st.binary(max_size=20)),
    st.tuples(st.just("permission"), who, st.lists(peers, min_size=1, max_size=2)),
    st.tuples(st.just("channel"), who, channels, peers),
)
lifecycle = st.one_of(
    st.tuples(st.just("allocate"), who, allocate_extras),
    st.tuples(st.just("refresh"), who, st.one_of(st.none(), st.integers(0, 5000))),
    st.tuples(st.just("advance"), st.sampled_from([1, 30, 299, 301, 601, 3601])),
    st.tuples(st.just("lost"), who),
)
junk = st.one_of(
    st.tuples(st.just("signed"), who, requests,
              st.lists(st.one_of(known_attributes, unknown_attributes), max_size=5)),
    st.tuples(st.just("raw"), who, st.one_of(st.binary(max_size=60), mutated())),
)
# Mostly relaying, which is where a forbidden peer could be reached.
operations = st.integers(0, 9).flatmap(lambda i: relaying if i < 6 else lifecycle if i < 8 else junk)

POLICY = PeerPolicy()


def act(harness: Harness, clients: List[CoreClient], pool: List[Address], op: tuple) -> None:
    def peer(drawn: Union[int, Address]) -> Address:
        return pool[drawn] if isinstance(drawn, int) else drawn

    if op[0] == "advance":
        harness.advance(op[1])
        return
    kind, client, args = op[0], clients[op[1]], op[2:]
    server = harness.server
    allocation = client.allocation
    if kind == "allocate":
        attributes = [(stun.REQUESTED_TRANSPORT, 17)] + list(args[0])
        replies = client.exchange(client.signed_wire(stun.ALLOCATE, attributes))
    elif kind == "refresh":
        lifetime = [] if args[0] is None else [(stun.LIFETIME, args[0])]
        replies = client.exchange(client.signed_wire(stun.REFRESH, lifetime))
    elif kind == "permission":
        replies = client.exchange(client.signed_wire(
            stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, peer(p)) for p in args[0]]))
    elif kind == "channel":
        replies = client.exchange(client.signed_wire(
            stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, args[0]), (stun.XOR_PEER_ADDRESS, peer(args[1]))]))
    elif kind == "send":
        replies = client.send_indication(peer(args[0]), args[1])
    elif kind == "channel-data":
        server.channel_data(client.client, stun.CHANNEL_HEADER.pack(args[0], len(args[1])) + args[1])
        replies = []
    elif kind == "from-peer":
        before = len(client.received)
        for relay in (allocation.relays.values() if allocation else ()):
            relay.deliver(args[1], peer(args[0]))
        replies = client.received[before:]
    elif kind == "signed":
        attributes = [(t, RawValue(v) if t not in stun.ATTRIBUTES else v) for t, v in args[1]]
        replies = client.exchange(client.signed_wire(args[0], attributes))
    elif kind == "raw":
        replies = client.exchange(args[0])
    else:
        server.connection_lost(client.client)
        client.client.connected = True   # the same 5-tuple may connect again
        replies = []
    for reply in replies:
        if reply[0] >= 0x40:
            assert kind == "from-peer" and 0x4000 <= stun.CHANNEL_HEADER.unpack_from(reply)[0] <= 0x7FFE
            continue
        client._learn(stun.parse(reply))


# One forbidden peer and the operations; bench/fuzz_turn.py feeds the same to libFuzzer.
SEQUENCES = (st.sampled_from(FORBIDDEN_HOSTS), st.lists(operations, min_size=8, max_size=30))


def run_sequence(forbidden: str, ops: List[tuple]) -> None:
    pool = [(forbidden, 5000), PEER, PEER_V6]
    harness = Harness(relay_ips={stun.FAMILY_IPV4: RELAY_V4, stun.FAMILY_IPV6: RELAY_V6})
    clients = [harness.client("alice"),
               harness.client("bob", address=("203.0.113.9", 41000), transport="tcp")]
    # Both start allocated, so most sequences exercise relaying rather than the 437 path.
    dual = [(stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6)]
    for op in [("allocate", 0, dual), ("allocate", 1, [])] + ops:
        act(harness, clients, pool, op)
        for endpoint in harness.binder.endpoints:
            for _, peer in endpoint.sent:
                assert POLICY.permits(peer[0]), f"relayed to forbidden {peer} after {op}"
        for allocation in harness.server.allocations.values():
            assert not any(relay.closed for relay in allocation.relays.values())
            assert all(POLICY.permits(ip) for ip in allocation.permissions), op
            assert all(POLICY.permits(peer[0]) for peer, _, _ in allocation.channels.values()), op
    harness.advance(3601 + 600)
    assert not harness.server.allocations and not harness.server.reservations
    assert all(endpoint.closed for endpoint in harness.binder.endpoints)
    assert not harness.binder.bound


@settings(max_examples=80, deadline=2000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(*SEQUENCES)
def test_random_request_sequences_never_raise_nor_reach_a_forbidden_peer(forbidden, ops):
    run_sequence(forbidden, ops)
