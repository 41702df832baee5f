"""Debian's HAProxy in front of the TCP and TLS listeners, PROXY protocol v2 and v1.

The relay runs with its default workers and trusts only HAProxy's address (127.0.0.1).
Clients connect to HAProxy from 127.0.0.7 and 127.0.0.8: the relay must log, limit
(--source-quota 1, per client address, across workers) and record in the ledger those
addresses, never HAProxy's.  A client connecting straight to the relay from 127.0.0.2 is
refused, whatever header it sends.
"""
from __future__ import annotations

import contextlib
import socket
import sqlite3
import ssl
import subprocess
import time
from typing import Iterator, Tuple

import pytest

from relay.cli.turnclient import TCP, TLS, TurnClient, error_code
from relay.proto import stun
from relay.proto.proxy_protocol import encode_v2
from support.relay_clients import refused
from support.servers import PASSWORD, USER, free_port, stop_process, tool

Address = Tuple[str, int]


@contextlib.contextmanager
def haproxy(tmp_path, tcp_target: int, tls_target: int) -> Iterator[Tuple[int, int]]:
    """HAProxy in TCP mode: one frontend to the TCP listener with send-proxy-v2, one to the
    TLS listener (passed through, not terminated) with send-proxy (v1)."""
    tcp_port, tls_port = free_port(), free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"""
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend turn_tcp
    bind 127.0.0.1:{tcp_port}
    default_backend relay_tcp
frontend turn_tls
    bind 127.0.0.1:{tls_port}
    default_backend relay_tls
backend relay_tcp
    server relay 127.0.0.1:{tcp_target} send-proxy-v2
backend relay_tls
    server relay 127.0.0.1:{tls_target} send-proxy
""")
    process = subprocess.Popen([tool("haproxy"), "-db", "-f", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        for port in (tcp_port, tls_port):
            while True:  # HAProxy says nothing when it is ready: its port accepting is the sign
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise AssertionError("haproxy never listened:\n" + process.stdout.read())
                    time.sleep(0.05)
        yield tcp_port, tls_port
    finally:
        stop_process(process)


def client(transport: str, port: int, source: str) -> TurnClient:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    if transport == TLS:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = context.wrap_socket(sock)
    sock.settimeout(10)
    return TurnClient(sock, transport, ("127.0.0.1", port), USER, PASSWORD, timeout=10)


def allocate(turn: TurnClient) -> stun.Message:
    return turn.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))


def mapped(turn: TurnClient) -> Address:
    return turn.exchange(stun.Message(stun.BINDING, stun.REQUEST)).get(stun.XOR_MAPPED_ADDRESS)


@pytest.mark.parametrize("transport", [TCP, TLS])
def test_behind_haproxy_the_relay_sees_limits_and_records_the_real_client(
        server_factory, tmp_path, transport):
    server = server_factory("--workers", "2", "--proxy-protocol-from", "127.0.0.1/32",
                            "--source-quota", "1", udp=False)
    with haproxy(tmp_path, server.port, server.tls_port) as (tcp_port, tls_port):
        port = tcp_port if transport == TCP else tls_port
        first = client(transport, port, "127.0.0.7")
        assert mapped(first)[0] == "127.0.0.7"  # STUN's own answer: what the relay believes
        reply = allocate(first)
        assert error_code(reply) is None, reply
        # --source-quota 1 counts 127.0.0.7's allocations, wherever HAProxy's own
        # connections land: a second is refused, and a second client address is not.
        second = client(transport, port, "127.0.0.7")
        assert error_code(allocate(second)) == 486
        other = client(transport, port, "127.0.0.8")
        assert error_code(allocate(other)) is None
        for turn in (first, second, other):
            turn.close()
        log = server.stop()
    assert "client=127.0.0.7:" in log and f"transport={transport}" in log, log
    assert "client=127.0.0.1:" not in log, log
    with sqlite3.connect(str(tmp_path / "state" / "usage.db")) as db:
        clients = sorted(row[0].rsplit(":", 1)[0] for row in
                         db.execute("SELECT client_address FROM sessions"))
    assert clients == ["127.0.0.7", "127.0.0.8"]


def test_direct_connections_are_refused_with_or_without_a_header(server_factory):
    server = server_factory("--workers", "2", "--proxy-protocol-from", "127.0.0.1/32", udp=False)
    binding = stun.Message(stun.BINDING, stun.REQUEST).encode()
    forged = encode_v2(("203.0.113.9", 1234), ("127.0.0.1", server.port)) + binding
    for port in (server.port, server.tls_port):
        assert refused(("127.0.0.1", port), binding, "127.0.0.2")
        assert refused(("127.0.0.1", port), forged, "127.0.0.2")
        assert refused(("127.0.0.1", port), b"PROXY TCP4 203.0.113.9 127.0.0.1 1 2\r\n" + binding,
                       "127.0.0.2")
    # From the trusted address, a connection without a header is refused too ...
    assert refused(("127.0.0.1", server.port), binding, "127.0.0.1")
    # ... and one with a header is served as the client it names.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(forged)
        reply = stun.parse(sock.recv(1000))
    assert reply.get(stun.XOR_MAPPED_ADDRESS) == ("203.0.113.9", 1234)
    log = server.stop()
    assert "127.0.0.2 is not in --proxy-protocol-from" in log, log
    assert "bad PROXY protocol header from 127.0.0.1" in log, log
