"""The native UDP data plane (relay/net/dataplane.c) on real loopback sockets: what it relays
from the tables Python installs, what it counts, and what it hands back to Python.

Where a test shows that a datagram was *not* relayed, it sends a permitted one after it on
the same path and checks that this is the one that arrives: a socket's datagrams are handled
in order, so no sleep is needed to know the first one was handled.
"""
import gc
import select
import socket
import struct
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.net import dataplane
from relay.proto import stun
from support.stun_strategies import mutated


def udp(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(5)
    return sock


def channel_data(number: int, payload: bytes) -> bytes:
    return struct.pack("!HH", number, len(payload)) + payload


def send_indication(peer, payload: bytes, fingerprint: bool = False) -> bytes:
    msg = stun.Message(stun.SEND, stun.INDICATION)
    msg.add(stun.XOR_PEER_ADDRESS, peer).add(stun.DATA, payload)
    return msg.encode(fingerprint=fingerprint)


class Relay:
    """A client listener, one allocation with a relay socket, a client and two peers."""

    def __init__(self, plane: dataplane.NativeDataPlane, host: str):
        self.plane = plane
        self.listener_sock, self.relay_sock = udp(host), udp(host)
        self.listener_sock.setblocking(False)
        self.relay_sock.setblocking(False)
        self.client, self.peer, self.other_peer = udp(host), udp(host), udp(host)
        self.listener = plane.add_listener(self.listener_sock.fileno())
        self.budget = dataplane.NativeBudget()
        v6 = ":" in host
        self.handle = plane.add_allocation(
            self.listener, self.client.getsockname()[:2],
            None if v6 else self.relay_sock.fileno(), self.relay_sock.fileno() if v6 else None,
            budget=self.budget)
        self.listener_address = self.listener_sock.getsockname()[:2]
        self.relay_address = self.relay_sock.getsockname()[:2]
        self.peer_address = self.peer.getsockname()[:2]

    def from_client(self, data: bytes) -> None:
        self.client.sendto(data, self.listener_address)

    def close(self) -> None:
        for sock in (self.listener_sock, self.relay_sock, self.client, self.peer, self.other_peer):
            sock.close()


def test_a_module_built_from_other_sources_is_not_used():
    """A checkout updated without a rebuild: its old module's C functions may take other
    arguments, so the Python data plane runs and the banner says to rebuild."""
    assert dataplane.available(), dataplane.missing()
    assert dataplane._stale(dataplane.ffi.string(dataplane.lib.dp_source_digest()).decode()) == ""
    assert "built from older sources: rebuild it with pip install -e ." in dataplane._stale("0" * 64)


@pytest.fixture
def plane():
    assert dataplane.available(), "relay/net/_dataplane is not built: pip install . builds it"
    plane = dataplane.NativeDataPlane(queue_capacity=8)
    plane.start()
    yield plane
    plane.close()


@pytest.fixture(params=["127.0.0.1", "::1"])
def relay(plane, request):
    relay = Relay(plane, request.param)
    yield relay
    relay.close()


def received(sock: socket.socket):
    data, address = sock.recvfrom(70000)
    return data, address[:2]


def test_channel_data_both_ways_counted_exactly(relay):
    relay.plane.permit(relay.handle, relay.peer_address[0])
    relay.plane.bind_channel(relay.handle, 0x4000, relay.peer_address)
    relay.from_client(channel_data(0x4000, b"hello") + b"\0\0\0")  # padding is not relayed
    assert received(relay.peer) == (b"hello", relay.relay_address)
    relay.peer.sendto(b"answer!", relay.relay_address)
    assert received(relay.client) == (channel_data(0x4000, b"answer!"), relay.listener_address)
    assert relay.plane.take_counters(relay.handle) == (5, 1, 7, 1, 0, 0)
    assert relay.plane.take_counters(relay.handle) == (0, 0, 0, 0, 0, 0)  # taken, not kept
    # The removal hands over the last counts: the entry may be freed right after it.
    relay.from_client(channel_data(0x4000, b"bye"))
    assert received(relay.peer) == (b"bye", relay.relay_address)
    assert relay.plane.remove_allocation(relay.handle) == (3, 1, 0, 0, 0, 0)


def test_send_and_data_indications(relay):
    relay.plane.permit(relay.handle, relay.peer_address[0])
    relay.from_client(send_indication(relay.peer_address, b"via send", fingerprint=True))
    assert received(relay.peer) == (b"via send", relay.relay_address)
    relay.peer.sendto(b"odd", relay.relay_address)  # no channel: a Data indication, padded
    data, _ = received(relay.client)
    msg = stun.parse(data)
    assert (msg.method, msg.cls) == (stun.DATA_METHOD, stun.INDICATION)
    assert msg.get(stun.XOR_PEER_ADDRESS) == relay.peer_address
    assert msg.get(stun.DATA) == b"odd"
    relay.peer.sendto(b"odd", relay.relay_address)
    assert stun.parse(received(relay.client)[0]).transaction_id != msg.transaction_id
    assert relay.plane.take_counters(relay.handle) == (8, 1, 6, 2, 0, 0)


def handled_so_far(relay) -> None:
    """Returns once every datagram the client sent so far has been handled: a request after
    them comes out of the queue to Python."""
    request = stun.Message(stun.BINDING, stun.REQUEST).encode()
    relay.from_client(request)
    assert select.select([relay.plane], [], [], 5)[0] == [relay.plane]
    assert relay.plane.pop()[1] == request


def test_nothing_without_a_permission_or_channel(relay):
    plane = relay.plane
    plane.permit(relay.handle, relay.peer_address[0])
    plane.bind_channel(relay.handle, 0x4000, relay.peer_address)
    relay.from_client(channel_data(0x4001, b"unbound"))
    relay.from_client(channel_data(0x4000, b"too short")[:-1])  # length beyond the datagram
    relay.from_client(channel_data(0x4000, b"bound"))
    assert received(relay.peer) == (b"bound", relay.relay_address)
    plane.unpermit(relay.handle, relay.peer_address[0])
    relay.from_client(channel_data(0x4000, b"no permission"))
    relay.from_client(send_indication(relay.peer_address, b"no permission"))
    handled_so_far(relay)
    plane.permit(relay.handle, relay.peer_address[0])
    plane.unbind_channel(relay.handle, 0x4000)
    relay.from_client(channel_data(0x4000, b"unbound now"))
    relay.from_client(send_indication(relay.peer_address, b"permitted"))
    assert received(relay.peer) == (b"permitted", relay.relay_address)
    relay.peer.sendto(b"no channel now", relay.relay_address)  # so a Data indication
    assert stun.parse(received(relay.client)[0]).get(stun.DATA) == b"no channel now"
    assert plane.take_counters(relay.handle) == (5 + 9, 2, 14, 1, 0, 0)
    assert plane.stats()["dropped"] == 5


def test_nothing_from_a_peer_without_a_permission(plane):
    relay = Relay(plane, "127.0.0.1")
    stranger = udp("127.0.0.2")
    plane.permit(relay.handle, relay.peer_address[0])
    stranger.sendto(b"no permission", relay.relay_address)
    relay.peer.sendto(b"permitted", relay.relay_address)
    assert stun.parse(received(relay.client)[0]).get(stun.DATA) == b"permitted"
    assert plane.take_counters(relay.handle) == (0, 0, 9, 1, 0, 0)
    assert plane.stats()["dropped"] == 1
    stranger.close()
    relay.close()


def test_other_datagrams_go_to_python_through_a_bounded_queue(relay):
    plane = relay.plane
    plane.permit(relay.handle, relay.peer_address[0])
    stranger = udp(relay.listener_address[0])
    request = stun.Message(stun.BINDING, stun.REQUEST).encode()
    for _ in range(20):
        stranger.sendto(request, relay.listener_address)
    relay.from_client(b"\1")  # too short for anything: Python's too
    relay.from_client(send_indication(relay.peer_address, b"after them"))
    assert received(relay.peer) == (b"after them", relay.relay_address)
    assert select.select([plane], [], [], 5)[0] == [plane]
    popped = []
    while True:
        item = plane.pop()
        if item is None:
            break
        popped.append(item)
    assert popped == [(relay.listener, request, stranger.getsockname()[:2])] * 8
    assert select.select([plane], [], [], 0)[0] == []  # drained: the eventfd is clear
    stats = plane.stats()
    assert (stats["queued"], stats["queue_dropped"]) == (8, 13)
    stranger.close()


def test_send_indications_python_must_judge_go_to_python(relay):
    plane = relay.plane
    plane.permit(relay.handle, relay.peer_address[0], native_send=False)  # relay-only
    plane.permit(relay.handle, "192.0.2.1" if "." in relay.peer_address[0] else "2001:db8::1")
    relay_only = send_indication(relay.peer_address, b"relay-only peer")
    relay.from_client(relay_only)
    plane.set_own_port(4000)
    own = send_indication(("192.0.2.1" if "." in relay.peer_address[0] else "2001:db8::1", 4000),
                          b"own port")
    relay.from_client(own)
    assert select.select([plane], [], [], 5)[0] == [plane]
    client = relay.client.getsockname()[:2]
    assert plane.pop() == (relay.listener, relay_only, client)
    assert select.select([plane], [], [], 5)[0] == [plane]
    assert plane.pop() == (relay.listener, own, client)
    assert plane.take_counters(relay.handle) == (0, 0, 0, 0, 0, 0)


def refill(budget: dataplane.NativeBudget, bandwidth: int, packet_rate: int) -> None:
    budget.bandwidth, budget.packet_rate = bandwidth, packet_rate
    budget.refill()


def test_budgets_drop_and_count_what_they_do_not_cover(relay):
    plane = relay.plane
    plane.permit(relay.handle, relay.peer_address[0])
    plane.bind_channel(relay.handle, 0x4000, relay.peer_address)
    refill(relay.budget, 0, 2)  # two packets this second
    for payload in (b"one", b"two", b"three"):
        relay.from_client(channel_data(0x4000, payload))
    assert received(relay.peer)[0] == b"one"
    assert received(relay.peer)[0] == b"two"
    handled_so_far(relay)  # "three" too
    refill(relay.budget, 10, 0)  # ten bytes, any number of packets
    relay.from_client(channel_data(0x4000, b"eleven byte"))
    relay.from_client(channel_data(0x4000, b"four"))
    assert received(relay.peer)[0] == b"four"  # so "three" and "eleven byte" were dropped
    assert plane.take_counters(relay.handle) == (10, 3, 0, 0, 2, 16)


def test_python_and_the_data_plane_spend_one_balance(relay):
    """An account's budget is spent by its TCP relays in Python and by the data plane alike."""
    plane, budget = relay.plane, relay.budget
    plane.permit(relay.handle, relay.peer_address[0])
    plane.bind_channel(relay.handle, 0x4000, relay.peer_address)
    refill(budget, 0, 3)
    budget.charge(100)  # two packets relayed by Python
    budget.charge(100)
    assert budget.affords(5)
    for payload in (b"one", b"two"):
        relay.from_client(channel_data(0x4000, payload))
    assert received(relay.peer)[0] == b"one"
    handled_so_far(relay)
    assert not budget.affords(1)
    assert plane.take_counters(relay.handle)[4:] == (1, 3)  # "two" was dropped
    refill(budget, 1000, 0)
    budget.charge(1400)  # a TCP read overdraws: the debt is paid from the next second's
    assert not budget.affords(1)
    refill(budget, 1000, 0)
    assert budget.affords(600) and not budget.affords(601)


def test_a_budget_lives_while_an_installed_allocation_uses_it(relay):
    """Python may drop its reference first (the allocation closed, its account's budget
    gone): the data plane keeps spending it until the allocation is removed (ASan would see a
    use after free)."""
    plane = relay.plane
    plane.permit(relay.handle, relay.peer_address[0])
    plane.bind_channel(relay.handle, 0x4000, relay.peer_address)
    refill(relay.budget, 0, 1)
    del relay.budget
    gc.collect()
    for payload in (b"one", b"two"):
        relay.from_client(channel_data(0x4000, payload))
    assert received(relay.peer)[0] == b"one"
    handled_so_far(relay)
    assert plane.take_counters(relay.handle)[4:] == (1, 3)


def test_a_removed_allocation_is_pythons_again(relay):
    """ChannelData and Send indications of a client without a native allocation go to Python,
    which may hold one (a rate-limited allocation stays on the Python path) or drops them."""
    plane = relay.plane
    plane.permit(relay.handle, relay.peer_address[0])
    plane.bind_channel(relay.handle, 0x4000, relay.peer_address)
    plane.remove_allocation(relay.handle)
    relay.relay_sock.close()  # Python's to close once removed
    data = channel_data(0x4000, b"gone")
    relay.from_client(data)
    assert select.select([plane], [], [], 5)[0] == [plane]
    assert plane.pop() == (relay.listener, data, relay.client.getsockname()[:2])
    assert plane.stats()["forwarded"] == 0


def test_many_allocations_on_one_listener(plane):
    listener_sock, peer = udp("127.0.0.1"), udp("127.0.0.1")
    listener_sock.setblocking(False)
    listener = plane.add_listener(listener_sock.fileno())
    clients, relays = [], []
    for _ in range(200):  # past the table's first sizes
        client, relay_sock = udp("127.0.0.1"), udp("127.0.0.1")
        handle = plane.add_allocation(listener, client.getsockname(), relay_sock.fileno(), None)
        plane.permit(handle, "127.0.0.1")
        plane.bind_channel(handle, 0x4000, peer.getsockname())
        clients.append(client)
        relays.append(relay_sock)
    for i, client in enumerate(clients):
        client.sendto(channel_data(0x4000, b"%d" % i), listener_sock.getsockname())
        assert received(peer) == (b"%d" % i, relays[i].getsockname())
    with pytest.raises(dataplane.DataPlaneError):
        plane.add_allocation(listener, clients[0].getsockname(), None, None)
    for sock in clients + relays + [listener_sock, peer]:
        sock.close()


send_indications = st.builds(
    send_indication,
    st.tuples(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), st.integers(0, 65535)),
    st.binary(max_size=64), st.booleans())


@given(st.one_of(send_indications, mutated(send_indications), st.binary(max_size=200)))
def test_the_send_parser_agrees_with_the_python_codec(data):
    assert dataplane.parse_send(data) == stun.parse_send_indication(data)


def test_the_parser_works_before_any_data_plane_exists():
    """Its CRC table (FINGERPRINT) was once set up by dp_new only."""
    code = ("from relay.net import dataplane; from relay.proto import stun; "
            "m = stun.Message(stun.SEND, stun.INDICATION); "
            "m.add(stun.XOR_PEER_ADDRESS, ('192.0.2.1', 9)).add(stun.DATA, b'x'); "
            "assert dataplane.parse_send(m.encode(fingerprint=True)) == (('192.0.2.1', 9), b'x')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def queued_then_relayed(plane, relay, sizes):
    """The peer queues datagrams of `sizes` on the relay socket before the thread starts, so
    the thread reads them in one batch; what the client receives, in order."""
    relay.plane.permit(relay.handle, relay.peer_address[0])
    relay.plane.bind_channel(relay.handle, 0x4000, relay.peer_address)
    sent = [b"%03d" % i + b"x" * (size - 3) for i, size in enumerate(sizes)]
    for data in sent:
        relay.peer.sendto(data, relay.relay_address)
    plane.start()
    return sent, [received(relay.client)[0] for _ in sent]


@pytest.fixture
def stopped_plane():
    plane = dataplane.NativeDataPlane(queue_capacity=8)
    yield plane
    plane.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_batch_goes_out_as_gso_groups_in_order(stopped_plane, host):
    """Equal-size datagrams to one client go out as one UDP GSO superpacket (on this kernel),
    which the client's socket receives cut back into the same datagrams, in order; a size
    change starts a new group, so nothing is reordered."""
    relay = Relay(stopped_plane, host)
    try:
        assert stopped_plane.gso(), "this kernel has UDP GSO (Linux 4.18+)"
        sizes = [100] * 20 + [60] + [100] * 5 + [200, 200, 30]
        sent, got = queued_then_relayed(stopped_plane, relay, sizes)
        assert got == [channel_data(0x4000, data) for data in sent]
        stats = stopped_plane.stats()
        assert stats["gso_sends"] >= 3 and stats["gso_refused"] == stats["send_errors"] == 0
        assert relay.plane.take_counters(relay.handle)[2:4] == (sum(sizes), len(sizes))
    finally:
        relay.close()


def test_a_refused_gso_send_goes_again_one_by_one(stopped_plane):
    """A socket that cannot take GSO (SO_NO_CHECK: no UDP checksum, which GSO needs) refuses
    the superpacket: its datagrams go again one by one, none lost, and GSO is off from then."""
    relay = Relay(stopped_plane, "127.0.0.1")
    try:
        relay.listener_sock.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK
        sent, got = queued_then_relayed(stopped_plane, relay, [100] * 10)
        assert got == [channel_data(0x4000, data) for data in sent]
        stats = stopped_plane.stats()
        assert (stats["gso_refused"], stats["gso_sends"], stats["send_errors"]) == (1, 0, 0)
        assert not stopped_plane.gso()
    finally:
        relay.close()
