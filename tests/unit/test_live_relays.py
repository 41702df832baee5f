"""Relaying between the relay's own live allocations, on a relay address the peer rules refuse
(loopback here, as on one machine): allowed while the peer allocation lives, and only to it;
every other loopback or private peer stays refused (relay.core.peers.LiveRelays)."""
from __future__ import annotations

import pytest

from relay.core.peers import LiveRelays, PeerPolicy
from relay.proto import stun
from support.core_harness import Harness, channel_data, error_code

LOOPBACK_RELAY = "127.0.0.1"


@pytest.fixture
def harness() -> Harness:
    return Harness(relay_ips={stun.FAMILY_IPV4: LOOPBACK_RELAY})


def relayed(client) -> tuple:
    return client.allocate_ok().get(stun.XOR_RELAYED_ADDRESS)


def test_two_allocations_relay_to_each_other_on_a_loopback_relay_address(harness):
    alice, bob = harness.client("alice"), harness.client("bob", address=("198.51.100.21", 40001))
    to_alice, to_bob = relayed(alice), relayed(bob)
    assert to_alice[0] == LOOPBACK_RELAY
    assert error_code(alice.create_permission(to_bob)) is None
    assert error_code(bob.channel_bind(0x4000, to_alice)) is None
    alice.send_indication(to_bob, b"hello bob")
    assert alice.relay().sent == [(b"hello bob", to_bob)]
    bob.allocation.from_client_channel(channel_data(0x4000, b"hello alice"))
    assert bob.relay().sent == [(b"hello alice", to_alice)]


def test_a_loopback_peer_that_is_no_allocation_is_refused(harness):
    alice, bob = harness.client("alice"), harness.client("bob", address=("198.51.100.21", 40001))
    to_bob = relayed(bob)
    relayed(alice)
    for peer in [(LOOPBACK_RELAY, to_bob[1] + 1), (LOOPBACK_RELAY, 22), ("127.0.0.2", to_bob[1]),
                 ("10.0.0.1", to_bob[1]), ("0.0.0.0", to_bob[1])]:
        assert error_code(alice.create_permission(peer)) == 403, peer
        assert error_code(alice.channel_bind(0x4001, peer)) == 403, peer


def test_a_send_indication_reaches_only_the_live_relayed_port(harness):
    """A permission is for an IP address, any port: on a relay-only address a Send indication
    must still name a live allocation, or the permission would open every local port."""
    alice, bob = harness.client("alice"), harness.client("bob", address=("198.51.100.21", 40001))
    to_bob = relayed(bob)
    relayed(alice)
    assert error_code(alice.create_permission(to_bob)) is None
    alice.send_indication((LOOPBACK_RELAY, 22), b"to sshd")
    alice.send_indication(to_bob, b"to bob")
    assert alice.relay().sent == [(b"to bob", to_bob)]


def test_an_allocation_that_expired_is_no_peer_any_more(harness):
    alice, bob = harness.client("alice"), harness.client("bob", address=("198.51.100.21", 40001))
    to_bob = relayed(bob)
    bob.refresh(lifetime=0)  # deleted: its port is free for anything on this host
    relayed(alice)
    assert error_code(alice.create_permission(to_bob)) == 403

    carol = harness.client("alice", address=("198.51.100.22", 40002))
    to_carol = relayed(carol)
    assert error_code(alice.channel_bind(0x4000, to_carol)) is None
    assert error_code(alice.create_permission(to_carol)) is None
    assert error_code(alice.refresh(lifetime=3600)) is None
    harness.advance(carol.allocation.expires - harness.now + 1)  # carol's lifetime ends
    assert carol.allocation is None and alice.allocation is not None
    assert error_code(alice.create_permission(to_carol)) == 403
    # The channel bound while carol lived ends with her allocation, and Send stops too.
    alice.allocation.from_client_channel(channel_data(0x4000, b"late"))
    alice.send_indication(to_carol, b"late")
    assert alice.relay().sent == []


def test_the_operators_deny_rules_and_cluster_networks_still_refuse_the_relay_address():
    for rules in ({"denied": ["127.0.0.0/8"]}, {"cluster": ["127.0.0.1/32"]}):
        harness = Harness(relay_ips={stun.FAMILY_IPV4: LOOPBACK_RELAY})
        harness.config.policy = PeerPolicy(**rules)
        alice, bob = harness.client("alice"), harness.client("bob", address=("198.51.100.21", 1))
        to_bob = relayed(bob)
        relayed(alice)
        assert error_code(alice.create_permission(to_bob)) == 403, rules


def test_the_advertised_external_address_names_the_allocation_too():
    harness = Harness(relay_ips={stun.FAMILY_IPV4: LOOPBACK_RELAY},
                      external_ips={LOOPBACK_RELAY: "10.1.2.3"})
    alice, bob = harness.client("alice"), harness.client("bob", address=("198.51.100.21", 1))
    to_bob = relayed(bob)
    relayed(alice)
    assert to_bob[0] == "10.1.2.3"
    assert error_code(alice.create_permission(to_bob)) is None


def test_workers_share_the_memory_each_writing_its_own_ports():
    """Two workers' views of one shared memory: one sees the other's allocation at once, and
    a worker starting (or its parent, when it died) forgets its slice."""
    memory = bytearray(LiveRelays.SIZE)
    first = LiveRelays([LOOPBACK_RELAY, "::1"], {}, memory)
    second = LiveRelays([LOOPBACK_RELAY, "::1"], {}, memory)
    first.add((LOOPBACK_RELAY, 50000), tcp=False)
    first.add(("::1", 50001), tcp=True)
    assert second.live((LOOPBACK_RELAY, 50000), False)
    assert second.live(("0:0::1", 50001), True) and not second.live(("::1", 50001), False)
    assert not second.live((LOOPBACK_RELAY, 50000), True)
    assert not second.live(("127.0.0.2", 50000), False) and not second.live(("x", 1), False)
    second.clear(60000, 65535)
    assert second.live((LOOPBACK_RELAY, 50000), False)
    first.clear(50000, 50001)
    assert not second.live((LOOPBACK_RELAY, 50000), False)
    assert not second.live(("::1", 50001), True)
