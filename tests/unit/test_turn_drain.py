"""The core's draining state, state by state: new Allocates are redirected (300, RFC 8489
section 10) or refused (508), existing allocations go on, the metrics' running totals."""
from __future__ import annotations

from relay.proto import stun
from support.core_harness import PEER, RELAY_V6, Harness, error_code

ALTERNATES = (("192.0.2.7", 3478), ("192.0.2.8", 3478), ("2001:db8::7", 3478))


def draining(**config) -> Harness:
    harness = Harness(relay_ips={stun.FAMILY_IPV4: "192.0.2.10", stun.FAMILY_IPV6: RELAY_V6},
                      **config)
    harness.server.drain()
    return harness


def test_without_an_alternate_a_new_allocate_is_508_and_counted():
    harness = draining()
    assert error_code(harness.client().allocate()) == 508
    assert harness.server.stats.allocate_errors == {508: 1}
    assert not harness.server.allocations


def test_alternates_of_the_clients_family_are_taken_in_turn_and_signed():
    harness = draining(alternate_servers=ALTERNATES)
    answers = []
    for port in (40001, 40002, 40003):
        client = harness.client(address=("198.51.100.20", port))
        response = client.allocate()
        assert error_code(response) == 300
        assert response.check_integrity(client.last_key)
        assert not response.has(stun.ALTERNATE_DOMAIN)
        answers.append(response.get(stun.ALTERNATE_SERVER))
    assert set(answers[:2]) == {ALTERNATES[0], ALTERNATES[1]} and answers[2] == answers[0]
    v6 = harness.client(address=("2001:db8:1::5", 40000)).allocate()
    assert v6.get(stun.ALTERNATE_SERVER) == ("2001:db8::7", 3478)


def test_tls_clients_go_to_the_tls_alternate_with_its_domain():
    harness = draining(alternate_servers=ALTERNATES[:1],
                       tls_alternate_servers=(("192.0.2.7", 5349),),
                       alternate_domain="turn-b.example.org")
    response = harness.client(transport="tls").allocate()
    assert error_code(response) == 300
    assert response.get(stun.ALTERNATE_SERVER) == ("192.0.2.7", 5349)
    assert response.get(stun.ALTERNATE_DOMAIN) == "turn-b.example.org"
    # No alternate of an IPv6 client's family: refused, not sent across families.
    assert error_code(harness.client(address=("2001:db8:1::5", 40000)).allocate()) == 508


def test_an_allocation_made_before_the_drain_goes_on_and_its_totals_stay():
    harness = Harness()
    alice = harness.client()
    alice.allocate_ok()
    assert alice.create_permission(PEER).cls == stun.SUCCESS
    harness.server.drain()
    assert alice.refresh(600).cls == stun.SUCCESS
    alice.send_indication(PEER, b"x" * 100)
    assert alice.relay().sent == [(b"x" * 100, PEER)]
    assert harness.server.stats.created == {"udp": 1}
    assert alice.refresh(0).cls == stun.SUCCESS
    assert harness.server.stats.closed_usage == {"udp": [100, 1, 0, 0]}
    assert harness.server.stats.closed == {"deleted": 1}
