"""Which worker process a CONNECTION-ID (RFC 6062) or a RESERVATION-TOKEN belongs to, with
--workers: each worker's core issues values equal to its index modulo the count
(relay.core.issuer).  A ConnectionBind for another worker's ID goes to the I/O layer
(`Client.hand_over`) before any login, answered by nothing here; another worker's reserved
port is given up there and adopted here."""
from __future__ import annotations

from relay.proto import stun
from support.core_harness import PEER, FakeStreamEnd, Harness, error_code

TCP = 6
WORKERS = 3


def tcp_client(harness, port, hand_over=None):
    client = harness.client("alice", transport="tcp", address=("198.51.100.20", port))
    client.client.become_data = lambda connection: FakeStreamEnd()
    client.client.hand_over = hand_over
    return client


def pending_id(harness) -> int:
    """A TCP allocation's Connect to PEER, completed: the CONNECTION-ID it was given."""
    control = tcp_client(harness, 40000)
    assert error_code(control.allocate(transport=TCP)) is None
    control.exchange(control.signed_wire(stun.CONNECT, [(stun.XOR_PEER_ADDRESS, PEER)]))
    _, result = control.allocation.relays[stun.FAMILY_IPV4].connects[-1]
    before = len(control.received)
    result(FakeStreamEnd(), harness.now)
    return stun.parse(control.received[before]).get(stun.CONNECTION_ID)


def test_each_worker_issues_the_ids_of_its_index():
    for index in range(WORKERS):
        harness = Harness(worker_index=index, worker_count=WORKERS)
        pending_id(harness)
        control = tcp_client(harness, 40000)
        for peer_port in range(1, 12):
            control.exchange(control.signed_wire(stun.CONNECT, [
                (stun.XOR_PEER_ADDRESS, (PEER[0], PEER[1] + peer_port))]))
        ids = list(harness.server.connections)
        assert len(ids) == 12
        assert {i % WORKERS for i in ids} == {index}
        assert all(0 <= i < 2 ** 32 for i in ids)


def test_a_bind_for_another_workers_id_is_handed_over_unanswered():
    harness = Harness(worker_index=1, worker_count=WORKERS)
    owners = []
    data = tcp_client(harness, 40001, owners.append)
    foreign = pending_id(Harness(worker_index=2, worker_count=WORKERS))
    # Unsigned, as a client's first try is: the owner challenges it, not this worker.
    assert data.exchange(data.build(stun.CONNECTION_BIND,
                                    [(stun.CONNECTION_ID, foreign)]).encode()) == []
    assert owners == [2]


def test_a_bind_for_this_workers_id_binds_here():
    harness = Harness(worker_index=1, worker_count=WORKERS)
    connection_id = pending_id(harness)
    owners = []
    data = tcp_client(harness, 40001, owners.append)
    response = data.request(stun.CONNECTION_BIND, [(stun.CONNECTION_ID, connection_id)])
    assert response.cls == stun.SUCCESS and owners == []


def test_a_connection_holding_an_allocation_is_not_handed_over():
    harness = Harness(worker_index=0, worker_count=WORKERS)
    owners = []
    control = tcp_client(harness, 40000, owners.append)
    assert error_code(control.allocate(transport=TCP)) is None
    foreign = pending_id(Harness(worker_index=1, worker_count=WORKERS))
    response = control.request(stun.CONNECTION_BIND, [(stun.CONNECTION_ID, foreign)])
    assert error_code(response) == 400 and owners == []


def test_one_process_hands_nothing_over():
    harness = Harness()
    owners = []
    data = tcp_client(harness, 40001, owners.append)
    response = data.request(stun.CONNECTION_BIND, [(stun.CONNECTION_ID, 12345)])
    assert error_code(response) == 400 and owners == []


def reserve(harness) -> bytes:
    client = harness.client("alice", address=("198.51.100.20", 40010))
    response = client.allocate((stun.EVEN_PORT, True))
    assert error_code(response) is None
    return response.get(stun.RESERVATION_TOKEN)


def test_a_reserved_port_moves_to_the_worker_the_allocate_reached():
    owner = Harness(worker_index=2, worker_count=WORKERS)
    here = Harness(worker_index=0, worker_count=WORKERS)
    token = reserve(owner)
    assert owner.server.reservation_owner(token) is None
    assert here.server.reservation_owner(token) == 2
    reservation = owner.server.take_reservation(token, owner.now)
    assert reservation is not None and token not in owner.server.reservations
    assert owner.server.take_reservation(token, owner.now) is None  # given once
    here.server.adopt_reservation(token, reservation)
    rtcp = here.client("alice", address=("198.51.100.20", 40011))
    response = rtcp.allocate((stun.RESERVATION_TOKEN, token))
    assert error_code(response) is None
    assert response.get(stun.XOR_RELAYED_ADDRESS)[1] == reservation.endpoint.address[1]


def test_an_expired_reservation_is_not_given():
    owner = Harness(worker_index=1, worker_count=WORKERS)
    token = reserve(owner)
    owner.advance(31, tick=False)
    assert owner.server.take_reservation(token, owner.now) is None


def test_one_process_owns_every_token():
    harness = Harness()
    assert harness.server.reservation_owner(reserve(harness)) is None


def test_a_worker_whose_slice_is_full_binds_a_port_of_another_slice():
    """Ports of the other workers' slices are tried last; those they hold fail to bind."""
    harness = Harness(min_port=50000, max_port=50000, whole_range=(49998, 50001),
                      worker_index=1, worker_count=2)
    harness.binder.busy.add(49998)  # another worker holds it
    ports = []
    for i in range(3):
        client = harness.client("alice", address=("198.51.100.20", 40020 + i))
        ports.append(client.allocate().get(stun.XOR_RELAYED_ADDRESS)[1])
    assert ports[0] == 50000 and sorted(ports[1:]) == [49999, 50001]
    last = harness.client("alice", address=("198.51.100.20", 40030))
    assert error_code(last.allocate()) == 508
