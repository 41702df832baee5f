"""The sans-IO core's TCP allocations (RFC 6062), state by state: fake relayed addresses whose
Connect attempts the test completes, fake connection ends, and the injected clock."""
from __future__ import annotations

import pytest

from relay.core.tcp import BOUND, CLOSED, CONNECTING, PENDING
from relay.proto import stun
from support.core_harness import PEER, PEER2, FakeStreamEnd, Harness, error_code

TCP = 6
CONTROL = ("198.51.100.20", 40000)


@pytest.fixture
def harness() -> Harness:
    return Harness(tcp_bind_timeout=30)


@pytest.fixture
def alice(harness):
    client = harness.client("alice", transport="tcp", address=CONTROL)
    assert error_code(client.allocate(transport=TCP)) is None
    return client


def relayed(client):
    return client.allocation.relays[stun.FAMILY_IPV4]


def connect(client, peer=PEER):
    """Send a Connect; the core hands the attempt to the relayed address and answers nothing."""
    replies = client.exchange(client.signed_wire(stun.CONNECT, [(stun.XOR_PEER_ADDRESS, peer)]))
    return replies


def complete(client, end, index=-1) -> stun.Message:
    """Finish the Connect attempt `index` with `end` (None: it failed); the core's answer."""
    before = len(client.received)
    _, result = relayed(client).connects[index]
    result(end, client.harness.now)
    replies = client.received[before:]
    assert len(replies) == 1
    return stun.parse(replies[0])


def data_client(harness, port=40001):
    """A second connection of alice's, able to become a data connection."""
    data = harness.client("alice", transport="tcp", address=("198.51.100.20", port))
    data.end = FakeStreamEnd()
    data.client.become_data = lambda connection: data.end
    return data


def bound_connection(client):
    """A Connect to PEER, completed and bound from a data connection: (the connection, its
    peer end, the data client)."""
    connect(client)
    peer_end = FakeStreamEnd()
    connection_id = complete(client, peer_end).get(stun.CONNECTION_ID)
    data = data_client(client.harness)
    response = data.request(stun.CONNECTION_BIND, [(stun.CONNECTION_ID, connection_id)])
    assert response.cls == stun.SUCCESS
    return client.harness.server.connections[connection_id], peer_end, data


def test_a_tcp_allocation_needs_a_stream_control_connection(harness):
    client = harness.client("alice")  # UDP
    assert error_code(client.allocate(transport=TCP)) == 400
    assert not harness.stream_binder.endpoints


def test_a_tcp_allocation_listens_and_attaches_nothing_for_datagrams(alice):
    assert alice.allocation.tcp
    assert relayed(alice).incoming is not None
    assert not alice.harness.binder.endpoints  # no UDP socket was bound


def test_connect_answers_once_the_attempt_succeeds_signed(alice):
    assert connect(alice) == []
    assert relayed(alice).connects[0][0] == PEER
    response = complete(alice, FakeStreamEnd())
    assert response.cls == stun.SUCCESS and response.method == stun.CONNECT
    assert response.check_integrity(alice.last_key)
    connection = alice.harness.server.connections[response.get(stun.CONNECTION_ID)]
    assert connection.state == PENDING and connection.peer == PEER


def test_a_failed_attempt_is_447_and_frees_the_peer(alice):
    connect(alice)
    assert error_code(complete(alice, None)) == 447
    assert not alice.allocation.connections
    connect(alice)
    assert len(relayed(alice).connects) == 2


def test_connect_while_one_to_the_same_peer_is_in_progress_is_446(alice):
    connect(alice)
    assert alice.allocation.connections[next(iter(alice.allocation.connections))].state == CONNECTING
    response = stun.parse(connect(alice)[0])
    assert error_code(response) == 446
    assert len(relayed(alice).connects) == 1
    connect(alice, PEER2)  # another peer is fine
    assert len(relayed(alice).connects) == 2


@pytest.mark.parametrize("peer", [("127.0.0.1", 80), ("10.1.2.3", 80), ("169.254.169.254", 80)])
def test_connect_to_a_forbidden_peer_is_403_before_any_attempt(alice, peer):
    assert error_code(stun.parse(connect(alice, peer)[0])) == 403
    assert relayed(alice).connects == []


def test_connect_without_a_peer_or_on_a_udp_allocation_is_400(harness, alice):
    response = alice.request(stun.CONNECT)
    assert error_code(response) == 400
    udp = harness.client("bob", transport="tcp", address=("198.51.100.30", 40000))
    udp.allocate_ok()
    assert error_code(stun.parse(connect(udp)[0])) == 400


def test_channels_and_send_indications_are_refused_on_a_tcp_allocation(alice):
    """They carry datagrams, which a TCP allocation does not relay: ChannelBind gets 400, a Send
    indication is dropped (the core used to raise on both), and the allocation lives on."""
    assert error_code(alice.create_permission(PEER)) is None  # for incoming connections
    assert error_code(alice.channel_bind(0x4000, PEER)) == 400
    assert alice.send_indication(PEER, b"a datagram") == []
    allocation = alice.allocation
    assert not allocation.channels and allocation.bytes_from_client == 0
    assert error_code(alice.refresh()) is None


def test_connection_bind_splices_and_counts_both_ways(harness, alice):
    connect(alice)
    peer_end = FakeStreamEnd()
    connection_id = complete(alice, peer_end).get(stun.CONNECTION_ID)
    data = data_client(harness)
    response = data.request(stun.CONNECTION_BIND, [(stun.CONNECTION_ID, connection_id)])
    assert response.cls == stun.SUCCESS
    connection = harness.server.connections[connection_id]
    assert connection.state == BOUND and peer_end.connection is connection
    connection.from_peer(b"hello")
    connection.from_client(b"hi!")
    assert data.end.written == [b"hello"] and peer_end.written == [b"hi!"]
    allocation = alice.allocation
    assert (allocation.bytes_to_client, allocation.bytes_from_client) == (5, 3)
    # A second bind of the same connection finds it bound: 400.
    again = data_client(harness, 40002)
    assert error_code(again.request(stun.CONNECTION_BIND, [(stun.CONNECTION_ID, connection_id)])) == 400


def test_connection_bind_by_another_user_is_441(harness, alice):
    connect(alice)
    connection_id = complete(alice, FakeStreamEnd()).get(stun.CONNECTION_ID)
    bob = harness.client("bob", transport="tcp", address=("198.51.100.30", 40000))
    bob.client.become_data = lambda connection: FakeStreamEnd()
    assert error_code(bob.request(stun.CONNECTION_BIND, [(stun.CONNECTION_ID, connection_id)])) == 441
    assert harness.server.connections[connection_id].state == PENDING


def test_the_control_connection_cannot_bind(alice):
    connect(alice)
    connection_id = complete(alice, FakeStreamEnd()).get(stun.CONNECTION_ID)
    alice.client.become_data = lambda connection: FakeStreamEnd()
    assert error_code(alice.request(stun.CONNECTION_BIND, [(stun.CONNECTION_ID, connection_id)])) == 400


def test_an_unbound_connection_closes_at_the_deadline(harness, alice):
    connect(alice)
    peer_end = FakeStreamEnd()
    connection_id = complete(alice, peer_end).get(stun.CONNECTION_ID)
    harness.advance(29)
    assert not peer_end.closed
    harness.advance(1)
    assert peer_end.closed and connection_id not in harness.server.connections
    data = data_client(harness)
    assert error_code(data.request(stun.CONNECTION_BIND, [(stun.CONNECTION_ID, connection_id)])) == 400


def test_an_incoming_peer_needs_a_permission(harness, alice):
    stranger = FakeStreamEnd()
    before = len(alice.received)
    relayed(alice).incoming(PEER, stranger, harness.now)
    assert stranger.closed and len(alice.received) == before
    alice.create_permission(PEER)
    welcome = FakeStreamEnd()
    relayed(alice).incoming(PEER, welcome, harness.now)
    attempt = stun.parse(alice.received[-1])
    assert (attempt.method, attempt.cls) == (stun.CONNECTION_ATTEMPT, stun.INDICATION)
    assert attempt.get(stun.XOR_PEER_ADDRESS) == PEER
    assert harness.server.connections[attempt.get(stun.CONNECTION_ID)].peer_end is welcome
    assert not welcome.closed


def test_the_allocation_ending_closes_its_connections_and_late_attempts(harness, alice):
    connect(alice)
    connect(alice, PEER2)
    peer_end = FakeStreamEnd()
    complete(alice, peer_end, 0)
    _, late = relayed(alice).connects[1]
    alice.refresh(0)
    assert peer_end.closed and not harness.server.connections
    late_end = FakeStreamEnd()
    before = len(alice.received)
    late(late_end, harness.now)  # the attempt finished after the allocation ended
    assert late_end.closed and len(alice.received) == before


def test_connections_per_allocation_are_capped(harness):
    harness = Harness(max_tcp_connections=1)
    client = harness.client("alice", transport="tcp")
    client.allocate_ok(transport=TCP)
    connect(client)
    assert error_code(stun.parse(connect(client, PEER2)[0])) == 508


@pytest.mark.parametrize("limit", ["max_bps", "account_max_bps"])
def test_rate_limits_pause_both_ends_until_the_refill(limit):
    harness = Harness(**{limit: 1000})
    client = harness.client("alice", transport="tcp")
    client.allocate_ok(transport=TCP)
    connection, peer_end, data = bound_connection(client)
    connection.from_peer(b"x" * 600)
    assert not peer_end.paused
    connection.from_peer(b"x" * 1400)  # relayed anyway (it was read), 1000 bytes over budget
    assert peer_end.paused and data.end.paused
    assert data.end.written[-1] == b"x" * 1400
    harness.advance(1)  # the refill pays the debt: budget 0, still paused
    assert peer_end.paused
    harness.advance(1)
    assert not peer_end.paused and not data.end.paused
    connection.close()
    assert connection.state == CLOSED and peer_end.closed and data.end.closed


def test_new_peer_rules_end_the_tcp_connections_to_peers_they_forbid(alice):
    """A bound connection relays bytes without a permission check, so forbidding its peer
    must close it, as it ends the peer's permission; one being connected ends too."""
    harness = alice.harness
    bound, peer_end, data = bound_connection(alice)
    connect(alice, PEER2)
    connecting = next(c for c in alice.allocation.connections.values() if c.peer == PEER2)
    harness.server.set_peer_rules([], [PEER[0], PEER2[0]], [])
    assert bound.state == CLOSED and peer_end.closed and data.end.closed
    assert connecting.state == CLOSED and not alice.allocation.connections
    late_end = FakeStreamEnd()
    relayed(alice).connects[-1][1](late_end, harness.now)  # its attempt completes later
    assert late_end.closed
    assert alice.allocation is not None  # the allocation stays
