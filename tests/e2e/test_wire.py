"""Protocol behaviour over real sockets that the third-party clients do not exercise."""
import socket
import ssl

import pytest

from relay.proto import stun
from support.certs import make_cert
from support.relay_clients import tls_connect
from support.servers import PASSWORD, REALM, USER
from support.wire_client import WireClient, error_code

UDP = (stun.REQUESTED_TRANSPORT, 17)


@pytest.fixture
def client_for():
    clients = []

    def make(server, username=USER, password=PASSWORD):
        client = WireClient((server.host, server.port), username, password, REALM)
        clients.append(client)
        return client
    yield make
    for client in clients:
        client.close()


def udp_peer(host):
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(5)
    return sock


def test_dual_stack_allocation_relays_over_ipv4_and_ipv6(server_factory, client_for):
    server = server_factory("--relay-ip", "::1")
    client = client_for(server)
    reply = client.request(stun.ALLOCATE, UDP, (stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    assert reply.cls == stun.SUCCESS, reply.get(stun.ERROR_CODE)
    relays = reply.get_all(stun.XOR_RELAYED_ADDRESS)
    assert [stun.address_family(host) for host, _ in relays] == [stun.FAMILY_IPV4, stun.FAMILY_IPV6]
    peers = [udp_peer("127.0.0.1"), udp_peer("::1")]
    addresses = [p.getsockname()[:2] for p in peers]
    # Several peers in one CreatePermission.
    reply = client.request(stun.CREATE_PERMISSION, *[(stun.XOR_PEER_ADDRESS, a) for a in addresses])
    assert reply.cls == stun.SUCCESS
    for peer, address, relay in zip(peers, addresses, relays):
        client.send_indication(address, b"to " + address[0].encode())
        data, source = peer.recvfrom(100)
        assert data == b"to " + address[0].encode() and source[:2] == relay
        peer.sendto(b"back from " + address[0].encode(), source[:2])
        assert client.receive_data() == (address, b"back from " + address[0].encode())
    for peer in peers:
        peer.close()


def test_ipv6_family_without_an_ipv6_relay_address(server_factory, client_for):
    server = server_factory()
    client = client_for(server)
    reply = client.request(stun.ALLOCATE, UDP, (stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    assert error_code(reply) == 440
    reply = client.request(stun.ALLOCATE, UDP, (stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6))
    assert reply.cls == stun.SUCCESS
    assert len(reply.get_all(stun.XOR_RELAYED_ADDRESS)) == 1
    assert reply.get(stun.ADDRESS_ERROR_CODE)[:2] == (stun.FAMILY_IPV6, 440)


@pytest.mark.parametrize("peer", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.1.1",
                                  "100.64.0.1", "0.0.0.0", "224.0.0.1"])
def test_no_open_relay_by_default(server_factory, client_for, peer):
    server = server_factory(loopback_peers=False)
    client = client_for(server)
    assert client.request(stun.ALLOCATE, UDP).cls == stun.SUCCESS
    reply = client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, (peer, 9)))
    assert error_code(reply) == 403
    reply = client.request(stun.CHANNEL_BIND, (stun.CHANNEL_NUMBER, 0x4000),
                           (stun.XOR_PEER_ADDRESS, (peer, 9)))
    assert error_code(reply) == 403


def test_fleet_sharing_a_nonce_secret_accepts_each_others_nonces(server_factory, client_for, tmp_path):
    secret = tmp_path / "nonce.key"
    secret.write_text("a-long-random-nonce-secret\n")
    first = server_factory("--nonce-secret-file", str(secret))
    second = server_factory("--nonce-secret-file", str(secret))
    isolated = server_factory()
    client = client_for(first)
    assert client.request(stun.BINDING).cls == stun.SUCCESS
    assert client.nonce is None  # Binding needs no credentials, so no challenge
    assert client.request(stun.ALLOCATE, UDP).cls == stun.SUCCESS
    for server, accepted in ((second, True), (isolated, False)):
        other = client_for(server)
        other.nonce = client.nonce  # nonces are bound to the client's IP, not its port
        msg = stun.Message(stun.ALLOCATE, stun.REQUEST).add(*UDP)
        msg.add(stun.USERNAME, USER).add(stun.REALM, REALM).add(stun.NONCE, client.nonce)
        reply = other.exchange(msg, stun.long_term_key(USER, REALM, PASSWORD))
        if accepted:
            assert reply.cls == stun.SUCCESS, reply.get(stun.ERROR_CODE)
        else:
            assert error_code(reply) == 438 and reply.get(stun.NONCE) != client.nonce


def test_tls_defaults_are_tls12_with_ecdhe_aead_only(turnrelay):
    version, cipher, _ = tls_connect(turnrelay)
    assert version == "TLSv1.2" and cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA" in cipher)
    with pytest.raises(ssl.SSLError):
        tls_connect(turnrelay, minimum_version=ssl.TLSVersion.TLSv1_3)
    with pytest.raises(ssl.SSLError):
        tls_connect(turnrelay, maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA:AES256-GCM-SHA384")
    assert "self-signed certificate" in turnrelay.read_until("self-signed")


def test_tls13_by_setting(server_factory):
    server = server_factory("--tls-max-version", "1.3")
    assert tls_connect(server)[0] == "TLSv1.3"


def test_sighup_swaps_the_certificate_without_a_restart(server_factory, tmp_path):
    first_cert, first_key = make_cert(tmp_path, "first")
    second_cert, second_key = make_cert(tmp_path, "second")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(first_cert.read_bytes())
    live_key.write_bytes(first_key.read_bytes())
    server = server_factory("--cert", str(live_cert), "--pkey", str(live_key))
    before = tls_connect(server)[2]
    live_cert.write_bytes(second_cert.read_bytes())
    live_key.write_bytes(second_key.read_bytes())
    server.process.send_signal(1)  # SIGHUP
    server.read_everywhere("TLS certificate reloaded")  # each worker serves TLS
    after = tls_connect(server)[2]
    assert before != after
    assert ssl.DER_cert_to_PEM_cert(after).strip() == second_cert.read_text().strip()


def stream_binding(sock):
    request = stun.Message(stun.BINDING, stun.REQUEST)
    sock.sendall(request.encode(fingerprint=True))
    data = b""
    while len(data) < 20 or len(data) < 20 + int.from_bytes(data[2:4], "big"):
        data += sock.recv(4096)
    reply = stun.parse(data)
    assert reply.transaction_id == request.transaction_id and reply.cls == stun.SUCCESS
    assert not reply.has(stun.SOFTWARE)  # unauthenticated answers stay minimal
    return reply.get(stun.XOR_MAPPED_ADDRESS)


def test_binding_on_every_listener(turnrelay, client_for):
    reply = client_for(turnrelay).request(stun.BINDING)
    assert reply.get(stun.XOR_MAPPED_ADDRESS)[0] == "127.0.0.1"
    with socket.create_connection((turnrelay.host, turnrelay.port), timeout=5) as tcp:
        assert stream_binding(tcp) == tcp.getsockname()[:2]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((turnrelay.host, turnrelay.tls_port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            assert stream_binding(tls) == tls.getsockname()[:2]
