"""TCP allocations (RFC 6062) against the real server: Connect, ConnectionBind, ConnectionAttempt,
their errors, the peer rules, accounting, and flow control, over real sockets on loopback."""
from __future__ import annotations

import re
import select
import socket
import time
from typing import Tuple

import pytest

from relay.cli.turnclient import TurnClient
from relay.proto import stun
from support.accounting import sql_usage
from support.relay_clients import bind_data, control, data_connection, recv_exactly, tcp_allocation
from support.servers import PASSWORD, REALM, USER, free_port
from support.wire_client import WireClient, error_code

TCP, UDP = 6, 17
Address = Tuple[str, int]


def active_open(server, peer: Address) -> Tuple[TurnClient, TurnClient]:
    """A TCP allocation connected to `peer`: its control and its bound data connection."""
    client, _ = tcp_allocation(server)
    reply = client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, peer))
    assert reply.cls == stun.SUCCESS, reply
    return client, bind_data(server, client, reply.get(stun.CONNECTION_ID))


def assert_closed(sock: socket.socket, timeout: float = 10.0) -> None:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


@pytest.fixture
def server(server_factory):
    return server_factory("--tcp-bind-timeout", "2", udp=True, tls=False)


# -- Allocate (section 5.1) --------------------------------------------------------------------

def test_tcp_allocation_over_tcp_gets_a_relayed_address(server):
    client, relayed = tcp_allocation(server)
    assert relayed[0] == "127.0.0.1"
    with socket.create_connection(relayed, timeout=5):
        pass  # the relayed address listens
    client.close()


def test_tcp_allocation_over_udp_is_400(server):
    client = WireClient((server.host, server.port), USER, PASSWORD, REALM)
    assert error_code(client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, TCP))) == 400
    # UDP allocations over UDP are unchanged.
    assert client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, UDP)).cls == stun.SUCCESS
    client.close()


@pytest.mark.parametrize("attribute", [(stun.DONT_FRAGMENT, True), (stun.EVEN_PORT, False),
                                       (stun.RESERVATION_TOKEN, b"12345678")])
def test_udp_only_attributes_in_a_tcp_allocate_are_400(server, attribute):
    client = control(server)
    reply = client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, TCP), attribute)
    assert error_code(reply) == 400
    client.close()


def test_no_tcp_relay_refuses_tcp_allocations_with_442(server_factory):
    server = server_factory("--no-tcp-relay", tls=False)
    client = control(server)
    assert error_code(client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, TCP))) == 442
    client.close()


# -- active open (section 5.2) -----------------------------------------------------------------

def test_active_open_relays_both_ways_and_the_ledger_bills_it(server_factory, tcp_echo_peer,
                                                              tmp_path):
    dsn = f"sqlite:///{tmp_path / 'usage.db'}"
    server = server_factory("--accounting", f"sqlite:path={tmp_path / 'usage.db'}", tls=False)
    client, data = active_open(server, tcp_echo_peer)
    payload = bytes(range(256)) * 400  # 100 KiB, several segments
    data.sock.sendall(payload)
    assert recv_exactly(data, len(payload)) == payload
    # Closing the control connection ends the allocation and its data connections.
    client.close()
    assert_closed(data.sock)
    line = server.search(r"allocation closed .*reason=disconnected from_client=(\d+)/(\d+)B "
                         r"to_client=(\d+)/(\d+)B .*session=(\w+)")
    packets_from, bytes_from, packets_to, bytes_to = map(int, line.groups()[:4])
    assert bytes_from == bytes_to == len(payload) and packets_from >= 1 and packets_to >= 1
    server.usage_recorded(line.group(5), "sqlite")
    assert sql_usage(dsn)[USER] == ("default", bytes_from, packets_from, bytes_to, packets_to)
    data.close()


def test_a_second_connect_to_the_same_peer_is_446(server, tcp_echo_peer):
    client, _ = tcp_allocation(server)
    assert client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, tcp_echo_peer)).cls == stun.SUCCESS
    assert error_code(client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, tcp_echo_peer))) == 446
    client.close()


def test_connect_to_a_closed_port_is_447(server):
    client, _ = tcp_allocation(server)
    closed = ("127.0.0.1", free_port())
    assert error_code(client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, closed))) == 447
    # A failed attempt leaves nothing behind: the same peer may be tried again.
    assert error_code(client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, closed))) == 447
    client.close()


def test_connect_on_a_udp_allocation_is_400(server, tcp_echo_peer):
    client = control(server)
    assert client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, UDP)).cls == stun.SUCCESS
    assert error_code(client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, tcp_echo_peer))) == 400
    client.close()


def test_connection_bind_with_an_unknown_id_is_400(server):
    client, _ = tcp_allocation(server)
    data = data_connection(server, client)
    assert error_code(data.request(stun.CONNECTION_BIND, (stun.CONNECTION_ID, 12345))) == 400
    data.close()
    client.close()


def test_connection_bind_by_another_user_is_refused(server_factory, tcp_echo_peer):
    server = server_factory(users=((USER, PASSWORD), ("mallory", "m")), tls=False)
    client, _ = tcp_allocation(server)
    connection_id = client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, tcp_echo_peer)) \
        .get(stun.CONNECTION_ID)
    thief = control(server, "mallory", "m")
    assert error_code(thief.request(stun.CONNECTION_BIND, (stun.CONNECTION_ID, connection_id))) == 441
    # The rightful owner still binds it.
    data = bind_data(server, client, connection_id)
    data.sock.sendall(b"ping")
    assert recv_exactly(data, 4) == b"ping"
    for c in (thief, data, client):
        c.close()


# -- passive open (section 5.3) ----------------------------------------------------------------

def test_passive_open_announces_the_peer_and_relays_both_ways(server):
    client, relayed = tcp_allocation(server)
    assert client.request(stun.CREATE_PERMISSION,
                          (stun.XOR_PEER_ADDRESS, ("127.0.0.1", 0))).cls == stun.SUCCESS
    peer = socket.create_connection(relayed, timeout=5)
    peer.sendall(b"sent before the bind")  # held until the client binds
    attempt = client.indication(stun.CONNECTION_ATTEMPT)
    assert attempt.get(stun.XOR_PEER_ADDRESS) == peer.getsockname()[:2]
    data = bind_data(server, client, attempt.get(stun.CONNECTION_ID))
    assert recv_exactly(data, 20) == b"sent before the bind"
    data.sock.sendall(b"from the client")
    assert recv_exactly(peer, 15) == b"from the client"
    # The peer closing closes the client's data connection.
    peer.close()
    assert_closed(data.sock)
    for c in (data, client):
        c.close()


def test_an_unbound_peer_connection_is_closed_after_the_bind_timeout(server):
    client, relayed = tcp_allocation(server)
    client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, ("127.0.0.1", 0)))
    peer = socket.create_connection(relayed, timeout=5)
    connection_id = client.indication(stun.CONNECTION_ATTEMPT).get(stun.CONNECTION_ID)
    started = time.monotonic()
    assert_closed(peer)  # --tcp-bind-timeout 2 in this fixture (30 s by default)
    assert 1.0 <= time.monotonic() - started < 8.0
    data = data_connection(server, client)
    assert error_code(data.request(stun.CONNECTION_BIND, (stun.CONNECTION_ID, connection_id))) == 400
    for c in (data, client):
        c.close()


def test_a_peer_without_permission_is_closed_unannounced(server):
    client, relayed = tcp_allocation(server)
    peer = socket.create_connection(relayed, timeout=5)
    assert_closed(peer)
    # The next thing on the control connection is the answer to this Refresh, not an attempt.
    assert client.request(stun.REFRESH).cls == stun.SUCCESS
    for c in (peer, client):
        c.close()


# -- abuse: Connect to forbidden peers never opens a connection --------------------------------

def test_connect_to_loopback_is_403_without_an_attempt(server_factory):
    server = server_factory(tls=False, loopback_peers=False)
    listener = socket.create_server(("127.0.0.1", 0))
    client, _ = tcp_allocation(server)
    reply = client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, listener.getsockname()[:2]))
    assert error_code(reply) == 403
    # The refusal came before any attempt: the listener's backlog stays empty.
    assert select.select([listener], [], [], 0.5)[0] == []
    listener.close()
    client.close()


@pytest.mark.parametrize("peer", [("10.0.0.1", 80), ("192.168.1.1", 22), ("172.16.0.1", 443),
                                  ("169.254.169.254", 80), ("100.64.0.1", 80), ("0.0.0.0", 80)])
def test_connect_to_private_and_metadata_addresses_is_403(server_factory, peer):
    server = server_factory(tls=False, loopback_peers=False)
    client, _ = tcp_allocation(server)
    reply = client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, peer))
    assert error_code(reply) == 403
    assert "tcp connect" not in server.stop()
    client.close()


def test_connect_to_the_servers_own_ports_is_403(server_factory):
    server = server_factory(tls=True)  # loopback peers allowed: only the own-port rule stops it
    client, _ = tcp_allocation(server)
    for peer in ((server.host, server.port), (server.host, server.tls_port), ("0.0.0.0", server.port)):
        assert error_code(client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, peer))) == 403, peer
    assert "tcp connect" not in server.stop()
    client.close()


# -- flow control ------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1))


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_slow_reader_pauses_the_fast_peer(server_factory, tls):
    """The peer writes as fast as it can, the client reads nothing: the server stops reading the
    peer (its writes stall) instead of buffering everything, and its memory stays flat.  Over
    TLS the data connection's TLS layer is paused through the TCP transport beneath it."""
    server = server_factory(tls=tls)
    listener = socket.create_server(("127.0.0.1", 0))
    client, _ = tcp_allocation(server, tls)
    reply = client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, listener.getsockname()[:2]))
    peer, _ = listener.accept()
    data = bind_data(server, client, reply.get(stun.CONNECTION_ID))
    rss_before = rss_kib(server.process.pid)
    peer.setblocking(False)
    chunk, sent, limit = b"x" * 65536, 0, 512 * 1024 * 1024
    stalled_since = None
    deadline = time.monotonic() + 60
    while sent < limit and time.monotonic() < deadline:
        try:
            sent += peer.send(chunk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 2.0:
                break  # no progress for 2 s: the server has stopped reading
            select.select([], [peer], [], 0.1)
    rss_growth_mib = (rss_kib(server.process.pid) - rss_before) / 1024
    assert stalled_since is not None, f"the peer sent {sent} bytes without ever stalling"
    # Kernel socket buffers on the way hold some MiB; without flow control it would be all 512.
    assert sent < 64 * 1024 * 1024, sent
    assert rss_growth_mib < 32, rss_growth_mib
    # Nothing was lost: the reader, catching up, gets every byte.
    data.sock.settimeout(10)
    assert len(recv_exactly(data, sent)) == sent
    for c in (peer, listener):
        c.close()
    for c in (data, client):
        c.close()


def test_rate_limits_hold_a_tcp_relay_to_its_budget(server_factory, tcp_echo_peer):
    """--max-bps cannot drop TCP bytes: the relay stops reading until the budget refills."""
    server = server_factory("--max-bps", "100000", tls=False)
    client, data = active_open(server, tcp_echo_peer)
    payload = b"r" * 150_000  # relayed twice (to the echo peer and back): 300 kB at 100 kB/s
    started = time.monotonic()
    data.sock.sendall(payload)
    data.sock.settimeout(20)
    assert recv_exactly(data, len(payload)) == payload
    elapsed = time.monotonic() - started
    # Unlimited this takes milliseconds; at 100 kB/s, with one second's debt carried over, at
    # least about two seconds.
    assert elapsed >= 1.5, elapsed
    for c in (data, client):
        c.close()


def test_an_idle_data_connection_is_closed(server_factory, tcp_echo_peer):
    server = server_factory("--tcp-idle-timeout", "1", tls=False)
    client, data = active_open(server, tcp_echo_peer)
    data.sock.sendall(b"still here")
    assert recv_exactly(data, 10) == b"still here"
    assert_closed(data.sock)
    # The control connection and its allocation stay.
    assert client.request(stun.REFRESH).cls == stun.SUCCESS
    for c in (data, client):
        c.close()


def test_deleting_the_allocation_closes_its_data_connections(server, tcp_echo_peer):
    client, data = active_open(server, tcp_echo_peer)
    assert client.request(stun.REFRESH, (stun.LIFETIME, 0)).cls == stun.SUCCESS
    assert_closed(data.sock)
    for c in (data, client):
        c.close()
