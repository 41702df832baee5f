"""Limits that stop a valid login from abusing the relay: packet rate and bandwidth per
allocation and per account (excess dropped and counted), the per-source and per-allocation
caps, and an exhausted relay port range (508, then recovery).

The sans-IO core is checked with its injected clock; the same limits are then checked on a
real relay over real sockets, where the once-a-second refill may fall inside a burst: the
bounds below allow for one refill, never for two.
"""
from __future__ import annotations

import socket
import time
from typing import List, Tuple

import pytest

from relay.auth import tokens
from relay.cli.turnclient import UDP, TurnClient, error_code
from relay.proto import stun
from support.core_harness import PEER, PEER2, FixedAccount, Harness, channel_data
from support.relay_clients import (
    TRANSPORTS,
    burst,
    bursting,
    closed_counters,
    connect,
    counters,
    received,
    udp_socket,
)
from support.servers import PASSWORD, REALM, USER

ALLOCATE_UDP = (stun.REQUESTED_TRANSPORT, 17)


# -- the core, with an injected clock ----------------------------------------------------------

def test_packet_rate_per_allocation_drops_and_counts_the_excess():
    harness = Harness(max_pps=3)
    client = harness.client()
    client.allocate_ok()
    client.channel_bind(0x4000, PEER)
    allocation, relay = client.allocation, client.relay()
    for _ in range(5):
        allocation.from_client_channel(channel_data(0x4000, b"1234"))
    relay.deliver(b"back", PEER)                     # the budget covers both directions
    assert len(relay.sent) == 3 and allocation.bytes_to_client == 0
    assert (allocation.limited_packets, allocation.limited_bytes) == (3, 12)
    assert allocation.packets_from_client == 3      # the ledger counts only what was relayed
    harness.advance(1)
    relay.deliver(b"back", PEER)
    assert allocation.packets_to_client == 1
    assert harness.server.limited_totals() == (3, 12)


def test_max_bps_and_the_accounts_bandwidth_the_lower_wins():
    harness = Harness(max_bps=500, checker=FixedAccount(bandwidth_bps=1000))
    client = harness.client()
    client.allocate_ok()
    client.channel_bind(0x4000, PEER)
    for _ in range(3):
        client.allocation.from_client_channel(channel_data(0x4000, b"x" * 300))
    assert len(client.relay().sent) == 1
    assert (client.allocation.limited_packets, client.allocation.limited_bytes) == (2, 600)


def test_account_limits_are_shared_by_its_allocations_and_not_by_others():
    harness = Harness(account_max_pps=4)
    first = harness.client("alice", address=("198.51.100.20", 40000))
    second = harness.client("alice", address=("198.51.100.21", 40000))
    bob = harness.client("bob", address=("198.51.100.22", 40000))
    for client in (first, second, bob):
        client.allocate_ok()
        client.channel_bind(0x4000, PEER2)
        for _ in range(3):
            client.allocation.from_client_channel(channel_data(0x4000, b"abc"))
    relayed = [len(c.relay().sent) for c in (first, second, bob)]
    assert relayed == [3, 1, 3]                      # alice's two allocations share 4
    assert second.allocation.limited_packets == 2
    harness.advance(1)                               # the account's budget refills too
    second.allocation.from_client_channel(channel_data(0x4000, b"abc"))
    assert len(second.relay().sent) == 2
    # The shared budget goes with the account's last allocation.
    first.refresh(0)
    second.refresh(0)
    assert harness.server._account_budgets.keys() == {"acct-bob"}
    assert harness.server.limited_totals() == (2, 6)


def test_no_limit_configured_means_no_budget_check():
    client = Harness().client()
    client.allocate_ok()
    assert client.allocation.limited is False


def test_exhausted_port_range_is_508_until_an_allocation_ends():
    harness = Harness(min_port=50000, max_port=50001)
    clients = [harness.client(address=("198.51.100.20", 40000 + i)) for i in range(4)]
    clients[0].allocate_ok()
    clients[1].allocate_ok()
    assert error_code(clients[2].allocate()) == 508
    clients[1].refresh(0)                            # deleted: its port is free again
    clients[2].allocate_ok()
    assert error_code(clients[3].allocate()) == 508
    harness.advance(601)                             # both expire
    assert not harness.server.allocations
    clients[3].allocate_ok()


def test_every_port_of_the_range_is_used_before_508():
    """Random picks alone would miss the last free ports of a crowded range; 508 must mean
    full, and finding out must not try to bind the ports this server holds."""
    harness = Harness(min_port=50000, max_port=50099)
    clients = [harness.client(address=("198.51.100.20", 40000 + i)) for i in range(101)]
    for client in clients[:100]:
        client.allocate_ok()
    assert {a.relays[stun.FAMILY_IPV4].address[1] for a in harness.server.allocations.values()} \
        == set(range(50000, 50100))
    calls = len(harness.binder.calls)
    assert error_code(clients[100].allocate()) == 508
    assert len(harness.binder.calls) - calls == 40   # the random tries, then nothing to bind


def test_a_port_held_by_another_process_is_skipped():
    harness = Harness(min_port=50000, max_port=50999)
    harness.binder.busy = set(range(50000, 51000)) - {50777}
    assert harness.client().allocate_ok().get(stun.XOR_RELAYED_ADDRESS)[1] == 50777
    even = harness.client(address=("198.51.100.21", 40000))
    assert error_code(even.allocate((stun.EVEN_PORT, False))) == 508   # 50776 is taken


# -- a real relay ------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_max_bps_per_allocation_on_a_real_relay(server_factory, transport):
    server = server_factory("--max-bps", "1000")
    client = connect(server, transport)
    with udp_socket("127.0.0.1") as sink:
        peer = sink.getsockname()[:2]
        assert client.request(stun.ALLOCATE, ALLOCATE_UDP).cls == stun.SUCCESS
        assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, peer)).cls \
            == stun.SUCCESS
        burst(client, peer, 8, 600)
        relayed, limited = counters(server, client)
        # 600 bytes fit in a second's 1000, a second 600 only after a refill.
        assert relayed in (1, 2) and relayed + limited == 8, (relayed, limited)
        assert received(sink) == relayed
    client.close()


def allocations_bursting(server, users: List[Tuple[str, str]], count: int) -> List[int]:
    """What each user's allocation relayed of `count` Send indications sent at once."""
    with udp_socket("127.0.0.1") as sink:
        clients = [connect(server, "udp", user, password) for user, password in users]
        return [relayed for relayed, _ in bursting(server, clients, count, sink)]


def test_max_pps_per_allocation_on_a_real_relay(server_factory):
    server = server_factory("--max-pps", "5")
    relayed = allocations_bursting(server, [(USER, PASSWORD)] * 2, 20)
    assert all(5 <= n <= 10 for n in relayed), relayed


def test_account_max_pps_is_shared_by_the_accounts_allocations_on_a_real_relay(server_factory):
    users = [(USER, PASSWORD), (USER, PASSWORD), ("bob", "builder")]
    server = server_factory("--account-max-pps", "4", users=users[1:])
    alice_first, alice_second, bob = allocations_bursting(server, users, 20)
    assert 4 <= alice_first + alice_second <= 8, (alice_first, alice_second)
    assert 4 <= bob <= 8, bob    # another account has its own budget


def test_per_source_and_per_allocation_caps_on_a_real_relay(server_factory):
    server = server_factory("--source-quota", "2", "--max-permissions", "3",
                            "--max-channels", "2")
    clients = [connect(server, "udp") for _ in range(3)]
    assert [error_code(c.request(stun.ALLOCATE, ALLOCATE_UDP)) for c in clients] \
        == [None, None, 486]
    # Another source address is not held back by the first one's quota.
    other = TurnClient.connect(UDP, (server.host, server.port), USER, PASSWORD, REALM,
                               bind_host="127.0.0.9")
    assert other.request(stun.ALLOCATE, ALLOCATE_UDP).cls == stun.SUCCESS
    first = clients[0]
    peers = [(f"127.0.1.{i}", 9) for i in range(1, 5)]
    assert first.request(stun.CREATE_PERMISSION,
                         *[(stun.XOR_PEER_ADDRESS, p) for p in peers[:3]]).cls == stun.SUCCESS
    assert error_code(first.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, peers[3]))) \
        == 508
    for number, peer in ((0x4000, peers[0]), (0x4001, peers[1])):
        assert first.request(stun.CHANNEL_BIND, (stun.CHANNEL_NUMBER, number),
                             (stun.XOR_PEER_ADDRESS, peer)).cls == stun.SUCCESS
    assert error_code(first.request(stun.CHANNEL_BIND, (stun.CHANNEL_NUMBER, 0x4002),
                                    (stun.XOR_PEER_ADDRESS, peers[2]))) == 508
    # Freeing one allocation makes room for the source again.
    assert first.request(stun.REFRESH, (stun.LIFETIME, 0)).cls == stun.SUCCESS
    assert clients[2].request(stun.ALLOCATE, ALLOCATE_UDP).cls == stun.SUCCESS
    for client in clients + [other]:
        client.close()


def test_user_and_total_quotas_on_a_real_relay(server_factory):
    users = ((USER, PASSWORD), ("bob", "builder"), ("carol", "carol-pw"))
    server = server_factory("--user-quota", "1", "--total-quota", "2", users=users)
    clients = [connect(server, "udp", *users[i]) for i in (0, 0, 1, 2)]
    assert [error_code(c.request(stun.ALLOCATE, ALLOCATE_UDP)) for c in clients] \
        == [None, 486, None, 508]
    for client in clients:
        client.close()


def free_port_pair() -> int:
    """Two consecutive relay ports free on loopback, in the suite's relay range."""
    for low in range(64000, 64990, 2):
        socks = []
        try:
            for port in (low, low + 1):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return low
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no two free relay ports")


def test_exhausted_port_range_is_508_and_recovers_on_a_real_relay(server_factory):
    low = free_port_pair()
    server = server_factory("--min-port", str(low), "--max-port", str(low + 1))
    udp, tcp, third = connect(server, "udp"), connect(server, "tcp"), connect(server, "udp")
    for client in (udp, tcp):
        assert client.request(stun.ALLOCATE, ALLOCATE_UDP).cls == stun.SUCCESS
    assert error_code(third.request(stun.ALLOCATE, ALLOCATE_UDP)) == 508
    # A deleted allocation frees its port at once,
    closed_counters(server, udp)
    assert third.request(stun.ALLOCATE, ALLOCATE_UDP).cls == stun.SUCCESS
    assert error_code(udp.request(stun.ALLOCATE, ALLOCATE_UDP)) == 508
    # and so does a TCP allocation whose connection ends.
    tcp.close()
    server.search(r"allocation closed user=alice .* reason=disconnected")
    assert udp.request(stun.ALLOCATE, ALLOCATE_UDP).cls == stun.SUCCESS
    for client in (udp, third):
        client.close()


def test_a_full_range_recovers_when_a_credential_expiry_ends_an_allocation(server_factory,
                                                                           tmp_path):
    """Lifetimes are 10 minutes at least; an expiring REST credential with --strict-expiry
    ends an allocation within seconds, through the same tick that expires allocations."""
    low = free_port_pair()
    secret = tmp_path / "rest.secret"
    secret.write_text("rest-secret\n")
    server = server_factory("--auth", f"rest-secret:secret-file={secret},skew=0",
                            "--strict-expiry", "--min-port", str(low), "--max-port", str(low),
                            users=(), tcp=False, tls=False)
    clients = []
    for ttl, label in ((3, "short"), (600, "long")):
        username, password = tokens.mint(b"rest-secret", "acme", ttl, time.time(), label)
        clients.append(TurnClient.connect(UDP, (server.host, server.port), username, password,
                                          REALM, bind_host=server.host))
    short, long = clients
    assert short.request(stun.ALLOCATE, ALLOCATE_UDP).cls == stun.SUCCESS
    assert error_code(long.request(stun.ALLOCATE, ALLOCATE_UDP)) == 508
    server.search(r"allocation closed user=\d+:acme:short .*reason=revoked", timeout=15)
    assert long.request(stun.ALLOCATE, ALLOCATE_UDP).cls == stun.SUCCESS
    for client in clients:
        client.close()
