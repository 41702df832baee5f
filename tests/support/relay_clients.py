"""Clients of a running relay over real sockets: relay.cli.turnclient's TurnClient on each
transport, TCP allocations (RFC 6062) and their data connections, TLS handshakes, traffic
bursts, and the relay's own per-allocation counters read from its close log line."""
from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Iterator, List, Tuple

import pytest

from relay.cli.turnclient import TCP as STREAM
from relay.cli.turnclient import TLS, TurnClient
from relay.proto import stun
from support.servers import PASSWORD, REALM, USER

Address = Tuple[str, int]
TCP = 6  # REQUESTED-TRANSPORT of a TCP allocation
UDP = (stun.REQUESTED_TRANSPORT, 17)  # the attribute asking for a UDP allocation
PAYLOAD = b"q" * 1000


TRANSPORTS = ("udp", "tcp", "tls")


def udp_socket(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.settimeout(5)
    return sock


def listener_address(server, transport: str) -> Tuple[str, int]:
    return server.host, server.tls_port if transport == "tls" else server.port


def connect(server, transport: str, user: str = USER, password: str = PASSWORD) -> TurnClient:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return TurnClient.connect(transport, listener_address(server, transport), user, password,
                              REALM, context=context, bind_host=server.host)


def closed_counters(server, client: TurnClient) -> str:
    """Delete the allocation; its log line's from_client=PACKETS/BYTES counts what was relayed."""
    assert client.request(stun.REFRESH, (stun.LIFETIME, 0)).cls == stun.SUCCESS
    host, port = client.sock.getsockname()[:2]
    return server.search(rf"allocation closed user=\w+ client={host}:{port} reason=deleted "
                         rf"from_client=(\d+/\d+B)").group(1)


def received(sink: socket.socket) -> int:
    """The datagrams waiting on `sink`, read."""
    count = 0
    sink.setblocking(False)
    try:
        while True:
            sink.recv(65536)
            count += 1
    except BlockingIOError:
        return count


def refused(address: Address, payload: bytes = b"", source: str = "") -> bool:
    """Whether the relay closes or resets a new TCP connection (after `payload`, from
    `source`) before answering anything.

    The reset can come before connect() returns: the relay aborts a connection it refuses as
    soon as it accepts it, and a non-blocking connect (the timeout) then reports the RST it
    found in SO_ERROR.
    """
    try:
        with socket.create_connection(address, timeout=10,
                                      source_address=(source, 0) if source else None) as sock:
            if payload:
                sock.sendall(payload)
            return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def bursting(server, clients: List[TurnClient], count: int, sink: socket.socket) -> List[Tuple[int, int]]:
    """Each client's UDP allocation sends `count` 10-byte Send indications at once to `sink`,
    one client after another (a request after each burst: the relay answers it only once the
    burst is handled, the native data plane's socket included), then is deleted.  What each
    relayed and had dropped, by its close line, checked against what `sink` received."""
    peer = sink.getsockname()[:2]
    for client in clients:
        assert client.request(stun.ALLOCATE, UDP).cls == stun.SUCCESS
        assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, peer)).cls \
            == stun.SUCCESS
    for client in clients:
        burst(client, peer, count, 10)
        assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, peer)).cls \
            == stun.SUCCESS
    results = [counters(server, client) for client in clients]
    for client in clients:
        client.close()
    assert all(relayed + limited == count for relayed, limited in results), results
    assert received(sink) == sum(relayed for relayed, _ in results)
    return results


def burst(client: TurnClient, peer: Tuple[str, int], count: int, size: int) -> None:
    for i in range(count):
        client.send_indication(peer, bytes([i % 256]) * size)


def counters(server, client: TurnClient) -> Tuple[int, int]:
    """(relayed, limited) packets from the allocation's close log line."""
    assert client.request(stun.REFRESH, (stun.LIFETIME, 0)).cls == stun.SUCCESS
    host, port = client.sock.getsockname()[:2]
    match = server.search(rf"allocation closed user=\w+ client={host}:{port} reason=deleted "
                          rf"from_client=(\d+)/\d+B .* limited=(\d+)/\d+B")
    return int(match.group(1)), int(match.group(2))


def control(server, user: str = USER, password: str = PASSWORD, tls: bool = False) -> TurnClient:
    if not tls:
        return TurnClient.connect(STREAM, (server.host, server.port), user, password, REALM)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # self-signed
    return TurnClient.connect(TLS, (server.host, server.tls_port), user, password, REALM,
                              context=context)


def data_connection(server, client: TurnClient) -> TurnClient:
    """A second connection to the server, over the same transport, with the same nonce."""
    data = control(server, tls=client.transport == TLS)
    data.nonce = client.nonce
    return data


def tcp_allocation(server, tls: bool = False) -> Tuple[TurnClient, Address]:
    client = control(server, tls=tls)
    reply = client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, TCP))
    assert reply.cls == stun.SUCCESS, reply
    return client, reply.get(stun.XOR_RELAYED_ADDRESS)


def bind_data(server, client: TurnClient, connection_id: int) -> TurnClient:
    """A new data connection, bound to `connection_id`; then raw bytes flow through `.sock`."""
    data = data_connection(server, client)
    reply = data.request(stun.CONNECTION_BIND, (stun.CONNECTION_ID, connection_id))
    assert reply.cls == stun.SUCCESS, reply
    return data


def recv_exactly(end, size: int) -> bytes:
    """`size` bytes from a peer socket, or from a data connection (which may already hold
    some: the peer's bytes can arrive in the same segment as the ConnectionBind response)."""
    if isinstance(end, TurnClient):
        early = end.take_buffered()
        assert len(early) <= size
        return early + recv_exactly(end.sock, size - len(early))
    sock = end
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(65536, size - got))
        assert chunk, f"connection closed after {got} of {size} bytes"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def tcp_echo_server() -> Iterator[Address]:
    """A TCP echo server on loopback, one thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[:2]
    finally:
        listener.close()


@pytest.fixture
def tcp_echo_peer() -> Iterator[Address]:
    with tcp_echo_server() as peer:
        yield peer


def relay_through(client, peer, count):
    """`count` payloads to the echo peer and back: 2000 billable bytes each."""
    assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, peer)).cls == stun.SUCCESS
    for _ in range(count):
        client.send_indication(peer, PAYLOAD)
        assert client.receive_data() == (peer, PAYLOAD)


def tls_connect(server, **context_settings):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for name, value in context_settings.items():
        if name == "ciphers":
            context.set_ciphers(value)
        else:
            setattr(context, name, value)
    with socket.create_connection((server.host, server.tls_port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.version(), tls.cipher()[0], tls.getpeercert(binary_form=True)
