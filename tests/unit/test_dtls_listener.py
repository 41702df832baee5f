"""The DTLS listener (relay.net.dtls) in-process: a real pyOpenSSL DTLS client over memory
BIOs, a fake socket, a fake core and a clock that moves only when the test moves it.

No state before a valid cookie (and a cookie is good for its own address only), records in
both directions once the handshake is done, a close_notify ending the session and its
allocations, a handshake left hanging swept away at its deadline.
"""
from __future__ import annotations

from typing import List, Tuple

import pytest
from OpenSSL import SSL
from twisted.internet.task import Clock

from relay.net.dtls import HANDSHAKE, MTU, DtlsListener, datagrams
from relay.net.listeners import StreamLimits
from relay.net.tls import COOKIE_PERIOD, ServerDTLS
from support.certs import make_cert

LISTENER = ("192.0.2.1", 5349)
A, B = ("198.51.100.7", 40000), ("203.0.113.9", 40000)


class FakeSocket:
    def __init__(self):
        self.sent: List[Tuple[bytes, Tuple[str, int]]] = []

    def sendto(self, data, address):
        self.sent.append((data, address))


class FakeTransport:
    def __init__(self):
        self.socket = FakeSocket()


class FakeCore:
    """Answers every request with b"pong" + the request, records what it was told."""

    def __init__(self):
        self.allocations = {}
        self.lost = []
        self.requests = []

    def __call__(self, client, data):  # the LoginDispatcher
        self.requests.append((client.transport, client.address, data))
        client.send(b"pong" + data)

    def connection_lost(self, client):
        self.lost.append(client.address)


@pytest.fixture
def setup(tmp_path):
    cert, key = make_cert(tmp_path, "relay")
    core, clock = FakeCore(), Clock()
    limits = StreamLimits(per_source=4, handshake_timeout=10, idle_timeout=60)
    listener = DtlsListener(core, core, LISTENER,
                            ServerDTLS(str(cert), str(key), b"k" * 32, clock=clock.seconds),
                            limits, clock)
    listener.transport = FakeTransport()
    listener.startProtocol()
    return listener, core, clock, limits


def new_client() -> SSL.Connection:
    client = SSL.Connection(SSL.Context(SSL.DTLS_CLIENT_METHOD), None)
    client.set_connect_state()
    client.set_ciphertext_mtu(1200)
    return client


def client_out(client: SSL.Connection, handshake: bool = True) -> List[bytes]:
    if handshake:
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
    out = []
    while True:
        try:
            out.append(client.bio_read(65536))
        except SSL.WantReadError:
            return out


def server_out(listener: DtlsListener, to) -> List[bytes]:
    sent = [data for data, address in listener.transport.socket.sent if address == to]
    listener.transport.socket.sent.clear()
    return sent


def cookie_hello(listener, client, source) -> bytes:
    [hello] = client_out(client)
    listener.datagramReceived(hello, source)
    [verify] = server_out(listener, source)
    assert verify[0] == HANDSHAKE and verify[13] == 3 and len(verify) <= len(hello)
    client.bio_write(verify)
    [with_cookie] = client_out(client)
    return with_cookie


def connect(listener, source) -> SSL.Connection:
    client = new_client()
    listener.datagramReceived(cookie_hello(listener, client, source), source)
    for _ in range(4):
        for datagram in server_out(listener, source):
            client.bio_write(datagram)
        for datagram in client_out(client):
            listener.datagramReceived(datagram, source)
    assert listener.sessions[source].established
    return client


def test_no_state_before_a_valid_cookie_and_a_cookie_only_for_its_address(setup):
    listener, _, _, limits = setup
    client = new_client()
    with_cookie = cookie_hello(listener, client, A)
    assert listener.sessions == {} and listener.half_open == 0 and limits.open == {}
    listener.datagramReceived(with_cookie, B)  # A's cookie, replayed from B
    [again] = server_out(listener, B)
    assert again[13] == 3 and listener.sessions == {}
    listener.datagramReceived(b"\x17" + bytes(40), A)  # not a handshake record: ignored
    assert server_out(listener, A) == [] and listener.sessions == {}
    listener.datagramReceived(with_cookie, A)
    assert list(listener.sessions) == [A] and listener.half_open == 1 and limits.open == {A[0]: 1}


def test_records_both_ways_then_close_notify_ends_the_session(setup):
    listener, core, _, limits = setup
    client = connect(listener, A)
    assert listener.half_open == 0
    request = b"\x00\x01\x00\x00" + bytes(16)
    client.send(request)
    for datagram in client_out(client, handshake=False):
        listener.datagramReceived(datagram, A)
    assert core.requests == [("dtls", A, request)]
    for datagram in server_out(listener, A):
        client.bio_write(datagram)
    assert client.recv(65536) == b"pong" + request
    client.shutdown()
    for datagram in client_out(client, handshake=False):
        listener.datagramReceived(datagram, A)
    assert listener.sessions == {} and core.lost == [A] and limits.open == {}


def test_a_hanging_handshake_is_swept_at_its_deadline(setup):
    listener, core, clock, limits = setup
    client = new_client()
    listener.datagramReceived(cookie_hello(listener, client, A), A)
    assert A in listener.sessions
    clock.advance(9.5)
    assert A in listener.sessions
    clock.advance(1)
    assert listener.sessions == {} and listener.half_open == 0 and limits.timed_out == 1
    assert core.lost == [A]


def test_a_port_for_both_udp_and_dtls_is_refused_naming_the_option():
    from relay.service.options import Options
    with pytest.raises(SystemExit, match="--dtls-listening-port: a UDP port cannot serve both"):
        Options().parseOptions(["--dtls", "--dtls-listening-port", "3478"])
    options = Options()
    options.parseOptions(["--dtls", "--tls-listening-port", "443"])
    assert options["dtls-listening-port"] == [443]


def test_records_are_packed_whole_into_datagrams_of_the_mtu():
    def record(size: int) -> bytes:
        return bytes([22, 0xFE, 0xFD]) + bytes(8) + size.to_bytes(2, "big") + b"r" * size
    flight = record(500) + record(600) + record(1500) + record(10)
    packed = list(datagrams(flight, 1200))
    assert packed == [record(500) + record(600), record(1500), record(10)]
    assert b"".join(datagrams(flight, 65536)) == flight and list(datagrams(b"", 1200)) == []


def test_a_server_flight_reaches_the_client_in_datagrams_within_the_mtu(setup):
    listener, _, _, _ = setup
    client = new_client()
    listener.datagramReceived(cookie_hello(listener, client, A), A)
    flight = server_out(listener, A)
    assert flight and all(len(datagram) <= MTU for datagram in flight)


def test_a_reloaded_certificate_serves_new_sessions(setup, tmp_path):
    """The DTLS context reloads like the TLS one (SIGHUP, or the files changing)."""
    listener, _, _, _ = setup
    old = connect(listener, A).get_peer_certificate().to_cryptography()
    (tmp_path / "new").mkdir()
    other_cert, other_key = make_cert(tmp_path / "new", "renewed")
    (tmp_path / "relay.pem").write_bytes(other_cert.read_bytes())
    (tmp_path / "relay.key").write_bytes(other_key.read_bytes())
    assert listener.tls.reload_if_changed()
    new = connect(listener, B).get_peer_certificate().to_cryptography()
    assert old.subject.rfc4514_string() == "CN=relay" and new.subject.rfc4514_string() == "CN=renewed"


def test_a_cookie_is_good_for_two_periods_only(setup):
    """A cookie seen on the wire cannot open sessions for its address forever."""
    listener, _, clock, _ = setup
    clock.advance(COOKIE_PERIOD - 1)
    old_client = new_client()
    with_cookie = cookie_hello(listener, old_client, A)
    clock.advance(COOKIE_PERIOD)  # the next period: still good
    listener.datagramReceived(with_cookie, A)
    assert A in listener.sessions
    listener.end(listener.sessions[A])
    server_out(listener, A)
    clock.advance(COOKIE_PERIOD)  # two periods on: a new HelloVerifyRequest, no session
    listener.datagramReceived(with_cookie, A)
    [again] = server_out(listener, A)
    assert again[13] == 3 and listener.sessions == {}
