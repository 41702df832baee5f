"""The sans-IO TURN core, state by state: RFC 8489 authentication, RFC 8656 allocations,
permissions, channels and relaying, driven with an injected clock and a fake relay binder."""
from __future__ import annotations

import base64
import uuid

import pytest

from relay.core import server as server_module
from relay.core.allocation import CHANNEL_COOLDOWN, CHANNEL_LIFETIME, PERMISSION_LIFETIME
from relay.core.nonces import FEATURE_PASSWORD_ALGORITHMS
from relay.core.ratelimit import RateLimiter
from relay.core.server import RESERVATION_LIFETIME, RESPONSE_CACHE_LIFETIME
from relay.proto import stun
from support.core_harness import (
    NONCE_LIFETIME,
    PEER,
    PEER2,
    PEER_V6,
    REALM,
    RELAY_V4,
    RELAY_V6,
    SOFTWARE,
    START,
    Harness,
    RawValue,
    channel_data,
    error_code,
)

UNKNOWN_REQUIRED = 0x0031     # comprehension-required, not in the codec's table
UNKNOWN_OPTIONAL = 0xC057     # comprehension-optional, not in the codec's table
DUAL = {stun.FAMILY_IPV4: RELAY_V4, stun.FAMILY_IPV6: RELAY_V6}


@pytest.fixture
def harness() -> Harness:
    return Harness()


@pytest.fixture
def alice(harness):
    return harness.client("alice")


def attribute_types(msg: stun.Message):
    return [attr_type for attr_type, _ in msg.attributes]


# -- Binding (RFC 8489 section 6.3) ------------------------------------------------------------

def test_binding_returns_the_client_address(alice):
    response = alice.unsigned(stun.BINDING)
    assert (response.method, response.cls) == (stun.BINDING, stun.SUCCESS)
    assert response.get(stun.XOR_MAPPED_ADDRESS) == ("198.51.100.20", 40000)
    assert not response.has(stun.FINGERPRINT)


def test_binding_from_an_ipv6_client(harness):
    client = harness.client(address=("2001:db8:1::7", 51000))
    assert client.unsigned(stun.BINDING).get(stun.XOR_MAPPED_ADDRESS) == ("2001:db8:1::7", 51000)


def test_binding_echoes_fingerprint(alice):
    response = alice.unsigned(stun.BINDING, fingerprint=True)
    assert response.cls == stun.SUCCESS
    # parse() already verified the CRC; it is the last attribute.
    assert attribute_types(response)[-1] == stun.FINGERPRINT


def test_binding_unknown_comprehension_required_attribute_is_420(alice):
    response = alice.unsigned(stun.BINDING, [(UNKNOWN_REQUIRED, RawValue(b"\x00\x01\x02\x03"))])
    assert error_code(response) == 420
    assert response.get(stun.UNKNOWN_ATTRIBUTES) == [UNKNOWN_REQUIRED]


def test_binding_unknown_comprehension_optional_attribute_is_ignored(alice):
    response = alice.unsigned(stun.BINDING, [(UNKNOWN_OPTIONAL, RawValue(b"abcd"))])
    assert response.cls == stun.SUCCESS
    assert response.get(stun.XOR_MAPPED_ADDRESS) == alice.client.address


def test_responses_and_garbage_are_dropped(alice):
    response = stun.Message(stun.BINDING, stun.SUCCESS).add(stun.XOR_MAPPED_ADDRESS, PEER)
    assert alice.exchange(response.encode()) == []
    assert alice.exchange(b"\x00\x01\x00\x00not stun") == []


# -- long-term credentials (RFC 8489 section 9.2) ----------------------------------------------

def test_allocate_without_integrity_is_challenged(alice):
    response = alice.unsigned(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
    assert error_code(response) == 401
    assert response.get(stun.REALM) == REALM
    nonce = response.get(stun.NONCE)
    # The nonce cookie and the feature set: password algorithms and username anonymity.
    assert nonce.startswith("obMatJos2")
    assert nonce[9:13] == base64.b64encode(b"\xc0\x00\x00").decode()
    assert response.get(stun.PASSWORD_ALGORITHMS) == [(stun.ALGORITHM_SHA256, b""),
                                                      (stun.ALGORITHM_MD5, b"")]
    assert not response.has(stun.SOFTWARE)
    assert not response.has(stun.MESSAGE_INTEGRITY)
    assert not alice.harness.server.allocations


def test_wrong_password_is_401(harness):
    mallory = harness.client("alice", password="not the password")
    response = mallory.allocate()
    assert error_code(response) == 401
    assert response.get(stun.REALM) == REALM
    assert response.get(stun.NONCE).startswith("obMatJos2")
    assert not response.has(stun.MESSAGE_INTEGRITY)
    assert not harness.server.allocations


def test_unknown_user_is_401(harness):
    response = harness.client("carol", password="x").allocate()
    assert error_code(response) == 401
    assert not harness.server.allocations


def test_wrong_realm_is_401(alice):
    alice.challenge()
    response = alice.allocate(realm="elsewhere.test")
    assert error_code(response) == 401
    assert response.get(stun.REALM) == REALM


def test_stale_nonce_is_438_with_a_fresh_nonce(harness, alice):
    alice.challenge()
    old = alice.nonce
    harness.advance(NONCE_LIFETIME + 1)
    response = alice.allocate(retry_stale=False)
    assert error_code(response) == 438
    assert response.get(stun.REALM) == REALM
    assert response.get(stun.NONCE).startswith("obMatJos2")
    assert response.get(stun.NONCE) != old
    assert not harness.server.allocations
    # The client retries with the new nonce, and that works.
    assert error_code(alice.allocate()) is None


def test_nonce_still_valid_at_its_lifetime(harness, alice):
    alice.challenge()
    harness.advance(NONCE_LIFETIME)
    assert error_code(alice.allocate()) is None


def test_forged_nonce_is_438(harness, alice):
    alice.challenge()
    forged = harness.nonces.prefix + base64.urlsafe_b64encode(b"\x00" * 16).decode()
    response = alice.allocate(nonce=forged)
    assert error_code(response) == 438
    assert response.get(stun.NONCE) != forged
    assert not harness.server.allocations


def test_nonce_issued_to_another_ip_is_438(harness, alice):
    alice.challenge()
    other = harness.nonces.issue("203.0.113.99", harness.now)
    assert error_code(alice.allocate(nonce=other)) == 438


@pytest.mark.parametrize("missing", [stun.REALM, stun.NONCE, stun.USERNAME])
def test_integrity_without_realm_nonce_or_username_is_400(alice, missing):
    alice.challenge()
    response = alice.allocate(omit=[missing])
    assert error_code(response) == 400
    # RFC 8489 9.2.4: this 400 carries no challenge.
    assert not response.has(stun.REALM) and not response.has(stun.NONCE)


# -- Allocate (RFC 8656 section 7.2) -----------------------------------------------------------

def test_allocate_success(harness, alice):
    response = alice.allocate()
    assert (response.method, response.cls) == (stun.ALLOCATE, stun.SUCCESS)
    host, port = response.get(stun.XOR_RELAYED_ADDRESS)
    assert host == RELAY_V4 and 50000 <= port <= 50199
    assert response.get(stun.LIFETIME) == 600
    assert response.get(stun.XOR_MAPPED_ADDRESS) == ("198.51.100.20", 40000)
    assert response.get(stun.SOFTWARE) == SOFTWARE
    assert response.has(stun.MESSAGE_INTEGRITY) and not response.has(stun.MESSAGE_INTEGRITY_SHA256)
    assert response.check_integrity(alice.key())
    assert not response.check_integrity(alice.key(password="other"))
    allocation = alice.allocation
    assert allocation.username == "alice"
    assert allocation.account.account_id == "acct-alice"
    assert allocation.expires == harness.now + 600
    assert harness.binder.bound == {(RELAY_V4, port)}
    assert alice.relay().receiver == allocation.from_peer



def test_session_ids_are_uuid7_in_the_order_sessions_start(harness):
    """RFC 9562 UUIDv7s: the ledger's sessions table is keyed by them, and keys in start
    order append to its index where uuid4s would land anywhere in it."""
    ids = []
    for k in range(3):
        client = harness.client("alice", address=("198.51.100.20", 41000 + k))
        client.allocate_ok()
        ids.append(uuid.UUID(client.allocation.session_id))
        harness.advance(0.002)
    assert [u.version for u in ids] == [7, 7, 7]
    assert {u.variant for u in ids} == {uuid.RFC_4122}
    assert ids[0].int >> 80 == int(START * 1000)  # the Unix time in milliseconds
    assert ids == sorted(ids) and len({u.int & (1 << 74) - 1 for u in ids}) == 3

@pytest.mark.parametrize("requested, granted", [(None, 600), (3000, 3000), (99999, 3600),
                                                (10, 600), (600, 600), (3600, 3600)])
def test_allocate_lifetime(alice, requested, granted):
    extra = [] if requested is None else [(stun.LIFETIME, requested)]
    response = alice.allocate_ok(*extra)
    assert response.get(stun.LIFETIME) == granted
    assert alice.allocation.expires == alice.harness.now + granted


def test_allocate_signed_with_sha256_integrity_is_answered_so(alice):
    response = alice.allocate(sha256=True)
    assert response.cls == stun.SUCCESS
    assert response.has(stun.MESSAGE_INTEGRITY_SHA256)
    assert not response.has(stun.MESSAGE_INTEGRITY)
    assert response.check_integrity(alice.key())


def test_allocate_with_sha256_password_algorithm(alice):
    alice.challenge()
    response = alice.allocate(algorithm=stun.ALGORITHM_SHA256, sha256=True)
    assert response.cls == stun.SUCCESS
    key = alice.key(stun.ALGORITHM_SHA256)
    assert len(key) == 32 and alice.last_key == key
    assert response.check_integrity(key)
    assert not response.check_integrity(alice.key(stun.ALGORITHM_MD5))


def test_allocate_with_explicit_md5_password_algorithm(alice):
    response = alice.allocate(algorithm=stun.ALGORITHM_MD5)
    assert response.cls == stun.SUCCESS
    assert response.check_integrity(alice.key(stun.ALGORITHM_MD5))


def test_password_algorithms_not_as_offered_is_400(alice):
    alice.challenge()
    # A downgrade: the attacker strips SHA-256 from the list the server offered.
    response = alice.allocate(algorithm=stun.ALGORITHM_MD5, algorithms=[(stun.ALGORITHM_MD5, b"")])
    assert error_code(response) == 400
    assert not alice.harness.server.allocations


def test_password_algorithm_not_offered_is_400(alice):
    alice.challenge()
    assert error_code(alice.allocate(algorithm=0x0003)) == 400


def test_password_algorithms_without_password_algorithm_is_400(alice):
    alice.challenge()
    assert error_code(alice.allocate(algorithms=alice.algorithms)) == 400


def test_allocate_with_userhash(harness, alice):
    response = alice.allocate(userhash=True)
    assert response.cls == stun.SUCCESS
    assert response.check_integrity(alice.key())
    assert alice.allocation.username == "alice"
    assert alice.allocation.account.account_id == "acct-alice"


def test_userhash_with_sha256_algorithm(alice):
    alice.challenge()
    response = alice.allocate(userhash=True, algorithm=stun.ALGORITHM_SHA256, sha256=True)
    assert response.cls == stun.SUCCESS
    assert response.check_integrity(alice.key(stun.ALGORITHM_SHA256))


def test_userhash_is_refused_without_the_anonymity_feature():
    harness = Harness(nonce_features=FEATURE_PASSWORD_ALGORITHMS)
    assert error_code(harness.client().allocate(userhash=True)) == 400


def test_allocate_fingerprint_follows_integrity(alice):
    response = alice.allocate(fingerprint=True)
    assert response.cls == stun.SUCCESS
    assert attribute_types(response)[-2:] == [stun.MESSAGE_INTEGRITY, stun.FINGERPRINT]
    assert response.check_integrity(alice.key())


def test_relayed_address_is_the_external_address():
    harness = Harness(external_ips={RELAY_V4: "203.0.113.77"})
    client = harness.client()
    host, port = client.allocate_ok().get(stun.XOR_RELAYED_ADDRESS)
    assert host == "203.0.113.77"
    assert client.relay().address == (RELAY_V4, port)


def test_dont_fragment_reaches_the_binder(harness, alice):
    alice.allocate_ok((stun.DONT_FRAGMENT, True))
    assert alice.relay().dont_fragment is True
    bob = harness.client("bob", address=("198.51.100.21", 40000))
    bob.allocate_ok()
    assert bob.relay().dont_fragment is False


def test_second_allocate_on_the_same_5_tuple_is_437(harness, alice):
    alice.allocate_ok()
    response = alice.allocate()
    assert error_code(response) == 437
    assert response.check_integrity(alice.key())
    assert len(harness.server.allocations) == 1
    assert len(harness.binder.endpoints) == 1


def test_retransmitted_allocate_gets_the_cached_response(harness, alice):
    wire = alice.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
    first = alice.exchange(wire)
    harness.advance(1)
    again = alice.exchange(wire)
    assert len(first) == 1 and again == first
    assert stun.parse(first[0]).cls == stun.SUCCESS
    assert len(harness.server.allocations) == 1
    assert len(harness.binder.endpoints) == 1


def test_answers_to_requests_not_authenticated_are_not_remembered(harness, alice, monkeypatch):
    """RFC 8489 section 6.3.1: a stale nonce, a bad request or a wrong password is answered
    afresh when retransmitted, and a flood of them from other sources leaves the remembered
    answers to authenticated requests in place."""
    monkeypatch.setattr(server_module, "RESPONSE_CACHE_SIZE", 2)
    wire = alice.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
    first = alice.exchange(wire)
    for n in range(4):
        mallory = harness.client("alice", address=("198.51.100.66", 20000 + n))
        stale = mallory.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], nonce="stale")
        answer = mallory.exchange_one(stale)
        harness.advance(1)
        again = mallory.exchange_one(stale)  # a nonce of this second: made afresh
        assert error_code(answer) == error_code(again) == 438
        assert again.get(stun.NONCE) != answer.get(stun.NONCE)
        bad = mallory.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], omit=[stun.REALM])
        assert error_code(mallory.exchange_one(bad)) == 400
        wrong = mallory.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], password="wrong")
        failures = harness.server.stats.auth_failures
        assert error_code(mallory.exchange_one(wrong)) == error_code(mallory.exchange_one(wrong)) == 401
        assert harness.server.stats.auth_failures == failures + 2  # the password checked twice
    assert alice.exchange(wire) == first


def test_a_failed_auth_backend_is_a_500_answered_afresh(harness, alice):
    """The login's backend failed (a database down): 500, not remembered, so the client's
    retransmission tries the login again."""
    wire = alice.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
    credentials = harness.server.receive(alice.client, wire, harness.now)
    assert credentials is not None
    harness.server.server_error(alice.client, credentials.message)
    assert error_code(stun.parse(alice.received[-1])) == 500
    assert harness.server.receive(alice.client, wire, harness.now) is not None  # a login again


def test_a_stream_clients_repeated_request_is_answered_afresh(harness):
    """No client retransmits over TCP or TLS (RFC 8489 section 6.2.2): nothing is remembered
    for one, and the same Allocate again finds the allocation it made."""
    client = harness.client("alice", transport="tcp")
    wire = client.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
    assert stun.parse(client.exchange(wire)[0]).cls == stun.SUCCESS
    assert error_code(client.exchange_one(wire)) == 437


def test_cached_response_is_kept_40_seconds_and_forgotten_by_80(harness, alice):
    wire = alice.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
    first = alice.exchange(wire)
    harness.advance(RESPONSE_CACHE_LIFETIME - 1)
    assert alice.exchange(wire) == first
    harness.advance(RESPONSE_CACHE_LIFETIME + 2)
    assert error_code(alice.exchange_one(wire)) == 437


@pytest.mark.parametrize("method, attributes", [
    (stun.REFRESH, []),
    (stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, PEER)]),
    (stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)]),
])
def test_requests_without_an_allocation_are_437(alice, method, attributes):
    response = alice.request(method, attributes)
    assert error_code(response) == 437
    assert response.check_integrity(alice.key())


def test_another_user_on_the_allocation_5_tuple_is_441(harness, alice):
    alice.allocate_ok()
    bob = harness.client("bob", address=alice.client.address)
    assert error_code(bob.refresh()) == 441
    assert error_code(bob.create_permission(PEER)) == 441
    assert error_code(bob.channel_bind(0x4000, PEER)) == 441
    assert error_code(bob.refresh(0)) == 441
    assert error_code(bob.allocate()) == 437
    assert alice.allocation is not None and not alice.allocation.permissions


def test_a_transport_other_than_udp_and_tcp_is_442(alice):
    assert error_code(alice.allocate(transport=132)) == 442  # SCTP
    assert not alice.harness.binder.endpoints


def test_allocate_without_requested_transport_is_400(alice):
    assert error_code(alice.request(stun.ALLOCATE)) == 400


def test_ipv6_requested_without_an_ipv6_relay_is_440(alice):
    assert error_code(alice.allocate((stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV6))) == 440
    assert not alice.harness.server.allocations


def test_unknown_requested_family_is_440(alice):
    assert error_code(alice.allocate((stun.REQUESTED_ADDRESS_FAMILY, 0x07))) == 440


def test_ipv4_requested_explicitly(alice):
    response = alice.allocate_ok((stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV4))
    assert response.get(stun.XOR_RELAYED_ADDRESS)[0] == RELAY_V4


def test_ipv6_requested_with_an_ipv6_relay():
    client = Harness(relay_ips=DUAL).client()
    response = client.allocate_ok((stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    assert [host for host, _ in response.get_all(stun.XOR_RELAYED_ADDRESS)] == [RELAY_V6]
    assert set(client.allocation.relays) == {stun.FAMILY_IPV6}


def test_requested_and_additional_family_together_is_400(alice):
    response = alice.allocate((stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV4),
                              (stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    assert error_code(response) == 400


def test_even_port_reservation_with_a_dual_allocation_is_400():
    client = Harness(relay_ips=DUAL).client()
    response = client.allocate((stun.EVEN_PORT, True), (stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    assert error_code(response) == 400
    response = client.allocate((stun.EVEN_PORT, False), (stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    assert response.cls == stun.SUCCESS


def test_additional_family_ipv4_is_400():
    client = Harness(relay_ips=DUAL).client()
    assert error_code(client.allocate((stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV4))) == 400


def test_dual_allocation_without_an_ipv6_relay_gets_address_error_code(alice):
    response = alice.allocate((stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    assert response.cls == stun.SUCCESS
    family, code, _ = response.get(stun.ADDRESS_ERROR_CODE)
    assert (family, code) == (stun.FAMILY_IPV6, 440)
    relayed = response.get_all(stun.XOR_RELAYED_ADDRESS)
    assert len(relayed) == 1 and relayed[0][0] == RELAY_V4
    assert set(alice.allocation.relays) == {stun.FAMILY_IPV4}


def test_dual_allocation_with_both_relays():
    harness = Harness(relay_ips=DUAL)
    client = harness.client()
    response = client.allocate_ok((stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    relayed = response.get_all(stun.XOR_RELAYED_ADDRESS)
    assert sorted(stun.address_family(host) for host, _ in relayed) == [stun.FAMILY_IPV4,
                                                                       stun.FAMILY_IPV6]
    assert {host for host, _ in relayed} == {RELAY_V4, RELAY_V6}
    assert not response.has(stun.ADDRESS_ERROR_CODE)
    assert set(client.allocation.relays) == {stun.FAMILY_IPV4, stun.FAMILY_IPV6}


def test_unknown_required_attribute_in_authenticated_allocate_is_signed_420(alice):
    alice.challenge()
    response = alice.allocate((UNKNOWN_REQUIRED, RawValue(b"\x01\x02\x03\x04")))
    assert error_code(response) == 420
    assert response.get(stun.UNKNOWN_ATTRIBUTES) == [UNKNOWN_REQUIRED]
    assert response.check_integrity(alice.key())
    assert not alice.harness.server.allocations


def test_unknown_optional_attribute_in_allocate_is_ignored(alice):
    assert alice.allocate((UNKNOWN_OPTIONAL, RawValue(b"\x01"))).cls == stun.SUCCESS


# -- EVEN-PORT and RESERVATION-TOKEN (RFC 8656 sections 7.2, 18.6, 18.9) -----------------------

@pytest.mark.parametrize("seed", range(8))
def test_even_port_without_reservation(seed):
    alice = Harness(seed=seed).client()
    response = alice.allocate_ok((stun.EVEN_PORT, False))
    assert response.get(stun.XOR_RELAYED_ADDRESS)[1] % 2 == 0
    assert not response.has(stun.RESERVATION_TOKEN)
    assert not alice.harness.server.reservations


@pytest.mark.parametrize("seed", range(8))
def test_even_port_reserves_the_next_port_for_the_token(seed):
    harness = Harness(seed=seed)
    alice = harness.client()
    response = alice.allocate_ok((stun.EVEN_PORT, True))
    port = response.get(stun.XOR_RELAYED_ADDRESS)[1]
    token = response.get(stun.RESERVATION_TOKEN)
    assert port % 2 == 0 and len(token) == 8
    assert (RELAY_V4, port + 1) in harness.binder.bound

    bob = harness.client("bob", address=("198.51.100.21", 40000))
    second = bob.allocate_ok((stun.RESERVATION_TOKEN, token))
    assert second.get(stun.XOR_RELAYED_ADDRESS) == (RELAY_V4, port + 1)
    assert not second.has(stun.RESERVATION_TOKEN)
    assert bob.relay().receiver == bob.allocation.from_peer
    assert not harness.server.reservations

    # A token is good for one allocation only.
    carol = harness.client("alice", address=("198.51.100.22", 40000))
    assert error_code(carol.allocate((stun.RESERVATION_TOKEN, token))) == 508


def test_unknown_reservation_token_is_508(alice):
    assert error_code(alice.allocate((stun.RESERVATION_TOKEN, b"\x00" * 8))) == 508
    assert not alice.harness.server.allocations


def test_expired_reservation_token_is_508_and_releases_the_port(harness, alice):
    response = alice.allocate_ok((stun.EVEN_PORT, True))
    port, token = response.get(stun.XOR_RELAYED_ADDRESS)[1], response.get(stun.RESERVATION_TOKEN)
    reserved = harness.binder.endpoint((RELAY_V4, port + 1))
    harness.advance(RESERVATION_LIFETIME + 1, tick=False)  # expired, not yet swept
    bob = harness.client("bob", address=("198.51.100.21", 40000))
    assert error_code(bob.allocate((stun.RESERVATION_TOKEN, token))) == 508
    assert reserved.closed
    assert (RELAY_V4, port + 1) not in harness.binder.bound


def test_tick_releases_an_unused_reservation(harness, alice):
    response = alice.allocate_ok((stun.EVEN_PORT, True))
    port = response.get(stun.XOR_RELAYED_ADDRESS)[1]
    harness.advance(RESERVATION_LIFETIME - 1)
    assert harness.server.reservations
    harness.advance(2)
    assert not harness.server.reservations
    assert harness.binder.endpoint((RELAY_V4, port + 1)).closed
    assert not alice.relay().closed


@pytest.mark.parametrize("extra", [
    (stun.EVEN_PORT, False),
    (stun.EVEN_PORT, True),
    (stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV4),
    (stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6),
])
def test_reservation_token_with_even_port_or_a_family_is_400(harness, alice, extra):
    token = alice.allocate_ok((stun.EVEN_PORT, True)).get(stun.RESERVATION_TOKEN)
    bob = harness.client("bob", address=("198.51.100.21", 40000))
    assert error_code(bob.allocate((stun.RESERVATION_TOKEN, token), extra)) == 400


def test_all_ports_busy_is_508(harness, alice):
    harness.binder.all_busy = True
    assert error_code(alice.allocate()) == 508
    assert error_code(alice.allocate((stun.EVEN_PORT, True))) == 508
    assert not harness.server.allocations


def test_even_port_pair_unavailable_is_508_and_leaks_nothing():
    harness = Harness(min_port=50000, max_port=50003)
    harness.binder.busy = {50001, 50003}
    client = harness.client()
    assert error_code(client.allocate((stun.EVEN_PORT, True))) == 508
    assert harness.binder.endpoints and all(e.closed for e in harness.binder.endpoints)
    assert not harness.binder.bound and not harness.server.reservations
    # Without the R bit an even port alone is enough.
    assert client.allocate_ok((stun.EVEN_PORT, False)).get(stun.XOR_RELAYED_ADDRESS)[1] in (50000, 50002)


# -- quotas (RFC 8656 486 and 508) -------------------------------------------------------------

def test_user_quota_is_486():
    harness = Harness(user_quota=1)
    harness.client("alice", address=("198.51.100.20", 40000)).allocate_ok()
    second = harness.client("alice", address=("198.51.100.21", 40000))
    response = second.allocate()
    assert error_code(response) == 486
    assert response.check_integrity(second.key())
    harness.client("bob", address=("198.51.100.22", 40000)).allocate_ok()


def test_source_quota_is_486():
    harness = Harness(source_quota=1)
    harness.client("alice", address=("198.51.100.20", 40000)).allocate_ok()
    assert error_code(harness.client("bob", address=("198.51.100.20", 40001)).allocate()) == 486
    harness.client("bob", address=("198.51.100.21", 40001)).allocate_ok()


def test_total_quota_is_508():
    harness = Harness(total_quota=1)
    harness.client("alice", address=("198.51.100.20", 40000)).allocate_ok()
    assert error_code(harness.client("bob", address=("198.51.100.21", 40000)).allocate()) == 508


def test_quota_is_released_when_an_allocation_is_deleted():
    harness = Harness(user_quota=1)
    first = harness.client("alice", address=("198.51.100.20", 40000))
    first.allocate_ok()
    first.refresh(0)
    harness.client("alice", address=("198.51.100.21", 40000)).allocate_ok()


def test_the_ledgers_seams_see_each_session_and_may_refuse_new_ones(harness):
    opened = []
    harness.server.opened_observers.append(opened.append)
    first = harness.client("alice", address=("198.51.100.20", 40000))
    first.allocate_ok()
    second = harness.client("bob", address=("198.51.100.21", 40000))
    second.allocate_ok()
    assert opened == [first.allocation, second.allocation]
    ids = [allocation.session_id for allocation in opened]
    assert len(set(ids)) == 2 and all(len(i) == 32 and int(i, 16) for i in ids)
    harness.server.may_allocate = lambda: False
    response = harness.client("alice", address=("198.51.100.22", 40000)).allocate()
    assert error_code(response) == 508
    assert len(opened) == 2 and len(harness.server.allocations) == 2
    first.refresh(0)  # a refused Allocate changes nothing for the sessions already open
    assert harness.closed == [(opened[0], "deleted")]


# -- Refresh (RFC 8656 section 7.3) and expiry -------------------------------------------------

def test_refresh_extends_the_lifetime(harness, alice):
    alice.allocate_ok()
    harness.advance(500)
    response = alice.refresh(1200)
    assert response.cls == stun.SUCCESS and response.get(stun.LIFETIME) == 1200
    assert response.check_integrity(alice.key())
    assert alice.allocation.expires == harness.now + 1200
    harness.advance(1000)
    assert alice.allocation is not None
    harness.advance(201)
    assert alice.allocation is None
    assert harness.closed[-1][1] == "expired"


@pytest.mark.parametrize("requested, granted", [(None, 600), (10, 600), (99999, 3600)])
def test_refresh_lifetime_rules(harness, alice, requested, granted):
    alice.allocate_ok()
    harness.advance(100)
    assert alice.refresh(requested).get(stun.LIFETIME) == granted
    assert alice.allocation.expires == harness.now + granted


def test_refresh_with_lifetime_zero_deletes(harness, alice):
    alice.allocate_ok()
    relay = alice.relay()
    allocation = alice.allocation
    response = alice.refresh(0)
    assert response.cls == stun.SUCCESS and response.get(stun.LIFETIME) == 0
    assert response.check_integrity(alice.key())
    assert relay.closed and not harness.binder.bound
    assert alice.allocation is None
    assert harness.closed == [(allocation, "deleted")]
    assert error_code(alice.refresh()) == 437
    assert error_code(alice.create_permission(PEER)) == 437
    # The 5-tuple is free again.
    alice.allocate_ok()


def test_refresh_with_a_family_the_allocation_lacks_is_443(alice):
    alice.allocate_ok()
    response = alice.request(stun.REFRESH, [(stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV6)])
    assert error_code(response) == 443


def test_allocation_expires_on_tick(harness, alice):
    alice.allocate_ok()
    relay, allocation = alice.relay(), alice.allocation
    harness.advance(599)
    assert alice.allocation is allocation and not relay.closed
    harness.advance(2)
    assert alice.allocation is None
    assert relay.closed
    assert harness.closed == [(allocation, "expired")]


def test_connection_lost_closes_the_stream_allocation(harness):
    client = harness.client(transport="tcp")
    client.allocate_ok()
    relay, allocation = client.relay(), client.allocation
    harness.server.connection_lost(client.client)
    assert client.allocation is None and relay.closed
    assert harness.closed == [(allocation, "disconnected")]
    harness.server.connection_lost(client.client)  # twice is harmless
    assert len(harness.closed) == 1


def test_login_completing_after_the_connection_closed_allocates_nothing(harness):
    client = harness.client(transport="tcp")
    client.challenge()
    credentials = harness.server.receive(client.client, client.signed_wire(stun.ALLOCATE, [
        (stun.REQUESTED_TRANSPORT, 17)]), harness.now)
    assert credentials is not None
    harness.server.connection_lost(client.client)  # gone while the checker was busy
    harness.server.authenticated(client.client, credentials, object(), harness.now)
    assert not harness.server.allocations and not harness.binder.endpoints


def test_shutdown_closes_allocations_and_reservations(harness, alice):
    alice.allocate_ok((stun.EVEN_PORT, True))
    harness.server.shutdown()
    assert not harness.server.allocations and not harness.server.reservations
    assert all(endpoint.closed for endpoint in harness.binder.endpoints)
    assert [reason for _, reason in harness.closed] == ["shutdown"]


# -- CreatePermission (RFC 8656 section 9) -----------------------------------------------------

def test_create_permission_installs_every_peer(harness, alice):
    alice.allocate_ok()
    response = alice.create_permission(PEER, PEER2, ("8.8.8.8", 9999))
    assert response.cls == stun.SUCCESS
    assert response.check_integrity(alice.key())
    assert alice.allocation.permissions == {"8.8.8.8": harness.now + PERMISSION_LIFETIME,
                                            "1.1.1.1": harness.now + PERMISSION_LIFETIME}


def test_create_permission_without_a_peer_is_400(alice):
    alice.allocate_ok()
    assert error_code(alice.request(stun.CREATE_PERMISSION)) == 400


@pytest.mark.parametrize("forbidden", [
    "10.0.0.1", "172.16.5.5", "192.168.1.1", "100.64.0.1", "169.254.169.254", "127.0.0.1",
    "0.0.0.0", "224.0.0.1", "255.255.255.255",
    "::1", "::", "fe80::1", "fc00::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:0a00:0001::1", "::a00:1",
])
def test_create_permission_to_a_forbidden_peer_is_403(forbidden):
    harness = Harness(relay_ips=DUAL)
    client = harness.client()
    client.allocate_ok((stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    response = client.create_permission(PEER, PEER_V6, (forbidden, 3478))
    assert error_code(response) == 403
    assert client.allocation.permissions == {}
    assert error_code(client.channel_bind(0x4000, (forbidden, 3478))) == 403
    assert client.allocation.channels == {} and client.allocation.permissions == {}


def test_ipv6_peer_on_an_ipv4_allocation_is_443(alice):
    alice.allocate_ok()
    assert error_code(alice.create_permission(PEER, PEER_V6)) == 443
    assert alice.allocation.permissions == {}
    assert error_code(alice.channel_bind(0x4000, PEER_V6)) == 443


def test_ipv4_peer_on_an_ipv6_allocation_is_443():
    client = Harness(relay_ips=DUAL).client()
    client.allocate_ok((stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    assert error_code(client.create_permission(PEER)) == 443
    assert client.create_permission(PEER_V6).cls == stun.SUCCESS


def test_too_many_permissions_is_508():
    harness = Harness(max_permissions=2)
    client = harness.client()
    client.allocate_ok()
    assert error_code(client.create_permission(PEER, PEER2, ("9.9.9.9", 53))) == 508
    assert client.allocation.permissions == {}
    assert client.create_permission(PEER, PEER2).cls == stun.SUCCESS
    assert error_code(client.create_permission(("9.9.9.9", 53))) == 508
    assert client.create_permission(PEER).cls == stun.SUCCESS  # a refresh is not a new one
    assert error_code(client.channel_bind(0x4000, ("9.9.9.9", 53))) == 508


def test_permission_expires_after_300_seconds(harness, alice):
    alice.allocate_ok()
    alice.create_permission(PEER)
    relay = alice.relay()
    harness.advance(PERMISSION_LIFETIME - 1)
    before = len(alice.received)
    relay.deliver(b"still allowed", PEER)
    assert len(alice.received) == before + 1
    harness.advance(2)
    assert alice.allocation.permissions == {}
    before = len(alice.received)
    relay.deliver(b"too late", PEER)
    assert len(alice.received) == before
    assert alice.allocation.bytes_to_client == len(b"still allowed")
    assert alice.send_indication(PEER, b"also dropped") == []
    assert relay.sent == []


def test_create_permission_refreshes_the_permission(harness, alice):
    alice.allocate_ok()
    alice.create_permission(PEER)
    harness.advance(200)
    alice.create_permission(PEER)
    harness.advance(200)
    assert "8.8.8.8" in alice.allocation.permissions


def test_each_permission_and_channel_ends_at_its_own_latest_expiry(harness, alice):
    """The tick sweeps an allocation only once something in it may have ended: each sweep
    must find the next end again, after a refresh too."""
    alice.allocate_ok((stun.LIFETIME, 3600))
    alice.create_permission(PEER)          # until 300
    alice.channel_bind(0x4000, PEER2)      # the channel until 600, its permission until 300
    harness.advance(200)
    alice.create_permission(PEER)          # now until 500
    harness.advance(101)
    assert set(alice.allocation.permissions) == {PEER[0]}
    harness.advance(198)
    assert set(alice.allocation.permissions) == {PEER[0]}
    harness.advance(2)
    assert alice.allocation.permissions == {} and set(alice.allocation.channels) == {0x4000}
    harness.advance(100)
    assert alice.allocation.channels == {} and set(alice.allocation.cooldown) == {0x4000}
    harness.advance(CHANNEL_COOLDOWN - 2)
    assert set(alice.allocation.cooldown) == {0x4000}
    harness.advance(2)
    assert alice.allocation.cooldown == {}


# -- ChannelBind and ChannelData (RFC 8656 section 11) -----------------------------------------

@pytest.mark.parametrize("number", [0x0000, 0x3FFF, 0x5000, 0x7FFE, 0x7FFF, 0x8000, 0xFFFF])
def test_channel_number_out_of_range_is_400(alice, number):
    alice.allocate_ok()
    assert error_code(alice.channel_bind(number, PEER)) == 400
    assert alice.allocation.channels == {} and alice.allocation.permissions == {}


@pytest.mark.parametrize("number", [0x4000, 0x4FFF])
def test_channel_number_in_range_is_bound(alice, number):
    alice.allocate_ok()
    response = alice.channel_bind(number, PEER)
    assert response.cls == stun.SUCCESS and response.check_integrity(alice.key())
    assert alice.allocation.channel_of_peer == {PEER: number}


@pytest.mark.parametrize("number, code", [(0x5000, None), (0x7FFF, None), (0x8000, 400),
                                          (0x3FFF, 400)])
def test_rfc5766_channel_range_when_configured(number, code):
    client = Harness(max_channel=stun.RFC5766_MAX_CHANNEL).client()
    client.allocate_ok()
    assert error_code(client.channel_bind(number, PEER)) == code


def test_channel_bind_without_number_or_peer_is_400(alice):
    alice.allocate_ok()
    assert error_code(alice.request(stun.CHANNEL_BIND, [(stun.XOR_PEER_ADDRESS, PEER)])) == 400
    assert error_code(alice.request(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000)])) == 400


def test_channel_bind_installs_a_permission(harness, alice):
    alice.allocate_ok()
    alice.channel_bind(0x4000, PEER)
    assert alice.allocation.permissions == {PEER[0]: harness.now + PERMISSION_LIFETIME}
    assert alice.allocation.channels[0x4000][2] == harness.now + CHANNEL_LIFETIME


def test_channel_data_from_the_client_reaches_the_peer(alice):
    alice.allocate_ok()
    alice.channel_bind(0x4000, PEER)
    relay, before = alice.relay(), len(alice.received)
    alice.allocation.from_client_channel(channel_data(0x4000, b"hello peer"))
    assert relay.sent == [(b"hello peer", PEER)]
    # UDP may carry padding after the payload: the length field decides.
    alice.allocation.from_client_channel(channel_data(0x4000, b"abc", pad=True))
    assert relay.sent[-1] == (b"abc", PEER)
    # Unbound channel, truncated frame: dropped.
    alice.allocation.from_client_channel(channel_data(0x4001, b"nobody"))
    alice.allocation.from_client_channel(stun.CHANNEL_HEADER.pack(0x4000, 100) + b"short")
    assert len(relay.sent) == 2
    assert len(alice.received) == before  # nothing comes back to the client


def test_stream_channel_data_goes_through_the_server(harness):
    client = harness.client(transport="tcp")
    client.allocate_ok()
    client.channel_bind(0x4001, PEER)
    harness.server.channel_data(client.client, channel_data(0x4001, b"12345", pad=True))
    assert client.relay().sent == [(b"12345", PEER)]


def test_peer_data_on_a_channel_reaches_the_client_as_channel_data(alice):
    alice.allocate_ok()
    alice.channel_bind(0x4000, PEER)
    before = len(alice.received)
    alice.relay().deliver(b"hello", PEER)
    assert alice.received[before:] == [b"\x40\x00\x00\x05hello"]  # UDP: no padding


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_peer_channel_data_is_padded_on_a_stream(harness, transport):
    client = harness.client(transport=transport)
    client.allocate_ok()
    client.channel_bind(0x4000, PEER)
    before = len(client.received)
    client.relay().deliver(b"hello", PEER)
    client.relay().deliver(b"four", PEER)
    assert client.received[before:] == [b"\x40\x00\x00\x05hello\x00\x00\x00",
                                        b"\x40\x00\x00\x04four"]


def test_peer_data_without_a_channel_is_a_data_indication(alice):
    alice.allocate_ok()
    alice.create_permission(PEER)
    before = len(alice.received)
    alice.relay().deliver(b"hello", ("8.8.8.8", 12345))
    assert len(alice.received) == before + 1
    indication = stun.parse(alice.received[-1])
    assert (indication.method, indication.cls) == (stun.DATA_METHOD, stun.INDICATION)
    assert indication.get(stun.XOR_PEER_ADDRESS) == ("8.8.8.8", 12345)
    assert indication.get(stun.DATA) == b"hello"
    assert not indication.has(stun.MESSAGE_INTEGRITY)


def test_ipv6_peer_data_indication():
    client = Harness(relay_ips=DUAL).client()
    client.allocate_ok((stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    client.create_permission(PEER_V6)
    client.relay(stun.FAMILY_IPV6).deliver(b"v6 data", PEER_V6)
    indication = stun.parse(client.received[-1])
    assert indication.get(stun.XOR_PEER_ADDRESS) == PEER_V6
    assert indication.get(stun.DATA) == b"v6 data"


def test_peer_data_on_another_port_of_a_channel_peer_is_a_data_indication(alice):
    alice.allocate_ok()
    alice.channel_bind(0x4000, PEER)
    alice.relay().deliver(b"x", (PEER[0], PEER[1] + 1))
    indication = stun.parse(alice.received[-1])
    assert indication.get(stun.XOR_PEER_ADDRESS) == (PEER[0], PEER[1] + 1)


def test_rebinding_a_channel_number_to_another_peer_is_400(alice):
    alice.allocate_ok()
    alice.channel_bind(0x4000, PEER)
    assert error_code(alice.channel_bind(0x4000, PEER2)) == 400
    assert error_code(alice.channel_bind(0x4000, (PEER[0], PEER[1] + 1))) == 400
    assert alice.allocation.channel_of_peer == {PEER: 0x4000}


def test_binding_a_peer_to_a_second_number_is_400(alice):
    alice.allocate_ok()
    alice.channel_bind(0x4000, PEER)
    assert error_code(alice.channel_bind(0x4001, PEER)) == 400
    assert set(alice.allocation.channels) == {0x4000}


def test_channel_bind_refresh_extends_the_channel(harness, alice):
    alice.allocate_ok((stun.LIFETIME, 3600))
    alice.channel_bind(0x4000, PEER)
    harness.advance(500)
    assert alice.channel_bind(0x4000, PEER).cls == stun.SUCCESS
    harness.advance(500)
    assert 0x4000 in alice.allocation.channels


def test_too_many_channels_is_508():
    client = Harness(max_channels=1).client()
    client.allocate_ok()
    client.channel_bind(0x4000, PEER)
    assert error_code(client.channel_bind(0x4001, PEER2)) == 508
    assert client.channel_bind(0x4000, PEER).cls == stun.SUCCESS


def test_channel_expires_after_600_seconds(harness, alice):
    alice.allocate_ok((stun.LIFETIME, 3600))
    alice.channel_bind(0x4000, PEER)
    harness.advance(CHANNEL_LIFETIME - 1)
    assert 0x4000 in alice.allocation.channels
    harness.advance(2)
    assert alice.allocation.channels == {} and alice.allocation.channel_of_peer == {}
    # With a fresh permission the peer's data now comes as a Data indication.
    alice.create_permission(PEER)
    alice.relay().deliver(b"after", PEER)
    assert stun.parse(alice.received[-1]).get(stun.DATA) == b"after"
    before = len(alice.relay().sent)
    alice.allocation.from_client_channel(channel_data(0x4000, b"gone"))
    assert len(alice.relay().sent) == before


def test_expired_channel_is_held_for_the_cooldown(harness, alice):
    alice.allocate_ok((stun.LIFETIME, 3600))
    alice.channel_bind(0x4000, PEER)
    harness.advance(CHANNEL_LIFETIME + 1)
    assert alice.allocation.channels == {}
    # Neither the number nor the peer can be bound to something else yet.
    assert error_code(alice.channel_bind(0x4000, PEER2)) == 400
    assert error_code(alice.channel_bind(0x4001, PEER)) == 400
    harness.advance(CHANNEL_COOLDOWN - 10)
    assert error_code(alice.channel_bind(0x4000, PEER2)) == 400
    harness.advance(11)
    assert alice.channel_bind(0x4000, PEER2).cls == stun.SUCCESS
    assert alice.allocation.channel_of_peer == {PEER2: 0x4000}


def test_cooldown_is_enforced_without_a_tick(harness, alice):
    alice.allocate_ok((stun.LIFETIME, 3600))
    alice.channel_bind(0x4000, PEER)
    harness.advance(CHANNEL_LIFETIME + 1)
    harness.advance(CHANNEL_COOLDOWN + 1, tick=False)
    assert alice.channel_bind(0x4001, PEER).cls == stun.SUCCESS


def test_expired_channel_can_be_rebound_to_the_same_peer(harness, alice):
    alice.allocate_ok((stun.LIFETIME, 3600))
    alice.channel_bind(0x4000, PEER)
    harness.advance(CHANNEL_LIFETIME + 1)
    assert alice.channel_bind(0x4000, PEER).cls == stun.SUCCESS
    assert alice.allocation.channel_of_peer == {PEER: 0x4000}


# -- Send indication and counters (RFC 8656 section 10) ----------------------------------------

def test_send_indication_needs_a_permission(alice):
    alice.allocate_ok()
    relay = alice.relay()
    assert alice.send_indication(PEER, b"no permission") == []
    assert relay.sent == []
    assert alice.allocation.packets_from_client == 0
    alice.create_permission(PEER)
    assert alice.send_indication(PEER, b"with permission") == []  # never answered
    assert relay.sent == [(b"with permission", PEER)]
    # A permission is for an IP address: any port of it.
    alice.send_indication(("8.8.8.8", 9), b"other port")
    assert relay.sent[-1] == (b"other port", ("8.8.8.8", 9))
    alice.send_indication(PEER2, b"other ip")
    assert len(relay.sent) == 2


def test_send_indication_without_an_allocation_is_dropped(harness, alice):
    assert alice.send_indication(PEER, b"data") == []
    assert harness.binder.endpoints == []


def test_send_indication_without_data_is_dropped(alice):
    alice.allocate_ok()
    alice.create_permission(PEER)
    msg = stun.Message(stun.SEND, stun.INDICATION).add(stun.XOR_PEER_ADDRESS, PEER)
    assert alice.exchange(msg.encode()) == []
    assert alice.relay().sent == []


def test_counters_count_payload_bytes(alice):
    alice.allocate_ok()
    alice.create_permission(PEER)
    alice.channel_bind(0x4000, PEER2)
    allocation, relay = alice.allocation, alice.relay()
    alice.send_indication(PEER, b"12345")                                # 5
    allocation.from_client_channel(channel_data(0x4000, b"1234567"))       # 7
    allocation.from_client_channel(channel_data(0x4000, b"abc", pad=True))  # 3
    alice.send_indication(("9.9.9.9", 1), b"dropped")                    # no permission
    relay.deliver(b"xyz", PEER)                                           # Data indication, 3
    relay.deliver(b"123456789", PEER2)                                    # ChannelData, 9
    relay.deliver(b"dropped", ("9.9.9.9", 1))                             # no permission
    assert (allocation.bytes_from_client, allocation.packets_from_client) == (15, 3)
    assert (allocation.bytes_to_client, allocation.packets_to_client) == (12, 2)
    assert [data for data, _ in relay.sent] == [b"12345", b"1234567", b"abc"]


# -- failed logins ------------------------------------------------------------------------------

def test_failed_logins_are_rate_limited_per_source(harness):
    mallory = harness.client("alice", password="guess", address=("203.0.113.5", 40000))
    answered = 0
    for _ in range(100):
        replies = mallory.exchange(mallory.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)]))
        if not replies:
            break
        assert error_code(stun.parse(replies[0])) == 401
        answered += 1
    assert 0 < answered < 100
    # Silence from now on for the guesser...
    assert mallory.exchange(mallory.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])) == []
    # ...but a first, unauthenticated Allocate from that address is still challenged,
    challenge = mallory.unsigned(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
    assert error_code(challenge) == 401 and challenge.has(stun.NONCE)
    # the right password from that address still logs in,
    honest = harness.client("alice", address=("203.0.113.5", 40001))
    honest.allocate_ok()
    # and another source is not affected.
    other = harness.client("alice", password="typo", address=("203.0.113.6", 40000))
    assert error_code(other.allocate()) == 401


def test_failed_login_limit_refills_with_time():
    harness = Harness(auth_limiter=RateLimiter(rate=1.0, burst=2))
    mallory = harness.client("alice", password="guess")
    mallory.challenge()
    assert error_code(mallory.allocate()) == 401
    assert error_code(mallory.allocate()) == 401
    assert mallory.exchange(mallory.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])) == []
    harness.advance(1)
    assert error_code(mallory.allocate()) == 401


def test_method_without_a_handler_is_400(alice):
    alice.challenge()
    assert error_code(alice.unsigned(0x0FF)) == 400


class CountingChecker:
    """The harness's static checker, counting the logins it is asked for."""

    def __init__(self, checker):
        self.checker, self.logins = checker, 0

    def requestAvatarId(self, credentials):
        self.logins += 1
        return self.checker.requestAvatarId(credentials)


def test_requests_on_a_live_allocation_reuse_its_login_until_the_credentials_reload():
    harness = Harness()
    harness.checker = counting = CountingChecker(harness.checker)
    alice = harness.client("alice")
    alice.allocate_ok()
    assert counting.logins == 1
    assert error_code(alice.refresh(600)) is None
    assert error_code(alice.create_permission(PEER)) is None
    assert error_code(alice.channel_bind(0x4000, PEER)) is None
    assert counting.logins == 1  # signed with the Allocate's key: no login of their own
    # Signed with another key (a changed password): logged in, and refused.
    assert error_code(alice.refresh(600, password="not-alice's")) == 401
    assert counting.logins == 2
    # Another user on the same 5-tuple is logged in, then told the allocation is not theirs.
    intruder = harness.client("bob", address=alice.client.address)
    assert error_code(intruder.refresh(600)) == 441
    assert counting.logins == 3
    harness.server.forget_logins()  # SIGHUP: the users file may have changed
    assert error_code(alice.refresh(600)) is None
    assert counting.logins == 4
