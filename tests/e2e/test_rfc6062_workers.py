"""State one worker holds, named by a request that reaches another (relay.net.handoff).

A ConnectionBind (RFC 6062) comes on a new connection and an Allocate with RESERVATION-TOKEN
from a new client port, each of which the kernel's SO_REUSEPORT hash gives to any worker: the
worker that issued the CONNECTION-ID gets the connection, the client's worker gets the
reserved port.  Run with the default worker count and with more workers than cores, over
TCP and TLS, with coturn's client and with our own."""
from __future__ import annotations

import contextlib
import re
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.proto import stun
from relay.service.host import usable_cpus
from support.relay_clients import UDP, bind_data, recv_exactly, tcp_allocation, tcp_echo_server
from support.servers import PASSWORD, REALM, USER, free_port, running_echo_peer, tool
from support.wire_client import WireClient

MESSAGES, CLIENTS = 20, 2
RUNS = 2  # uclient runs per server; each makes CLIENTS data connections
# The relay's default is a worker per CPU; a one-CPU machine still gets two here.
DEFAULT = max(2, usable_cpus())


def handed_over(metrics_port: int) -> dict:
    """Connections handed between workers, summed over the workers, by direction."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {"out": 0.0, "in": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "turnrelay_stream_connections_handed_over_total":
                found[sample.labels["direction"]] += sample.value
    return found


def start(server_factory, workers: int):
    metrics = free_port()
    server = server_factory("--workers", str(workers), "--prometheus", "--prometheus-port",
                            str(metrics))
    server.read_until(f"all {workers} workers ready")
    return server, metrics


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest.mark.parametrize("workers", [DEFAULT, 4], ids=["default-workers", "4-workers"])
def test_uclient_tcp_relays_on_several_workers(server_factory, workers, tls):
    """The issue's command: uclient -y -T (-S) relays every message, run after run."""
    server, metrics = start(server_factory, workers)
    port = server.tls_port if tls else server.port
    args = [tool("turnutils_uclient"), "-y", "-T", *(["-S"] if tls else []), "-n", str(MESSAGES),
            "-m", str(CLIENTS), "-l", "100", "-u", USER, "-w", PASSWORD, "-p", str(port),
            server.host]
    expected = MESSAGES * CLIENTS
    for run in range(RUNS):
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        output = result.stdout + result.stderr
        assert f"tot_send_msgs={expected}, tot_recv_msgs={expected}" in output, (run, output)
        assert not re.search(r"error [45]\d\d", output), (run, output)
    counts = handed_over(metrics)
    assert counts["out"] == counts["in"]


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_every_bind_reaches_its_owner(server_factory, tls):
    """Twelve data connections, each from a new port so each lands on a worker by chance
    (all on their owner: 4 ** -12): every one binds and relays both ways, and those that
    landed elsewhere were handed over, none lost."""
    server, metrics = start(server_factory, 4)
    client, _ = tcp_allocation(server, tls=tls)
    with contextlib.ExitStack() as stack:
        peers = [stack.enter_context(tcp_echo_server()) for _ in range(12)]
        for n, peer in enumerate(peers):
            reply = client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, peer))
            assert reply.cls == stun.SUCCESS, reply
            data = bind_data(server, client, reply.get(stun.CONNECTION_ID))
            payload = f"round trip {n} ".encode() * 100
            data.sock.sendall(payload)
            assert recv_exactly(data, len(payload)) == payload
    counts = handed_over(metrics)
    assert counts["out"] == counts["in"] > 0, counts


def test_a_reserved_port_follows_the_client_to_its_worker(server_factory):
    """EVEN-PORT with R, then an Allocate with the RESERVATION-TOKEN from another client port,
    as RTP and RTCP do: that port may reach another worker than the one holding the reserved
    port, which must move there.  Twelve pairs (all on one worker: 4 ** -12); each second
    allocation gets the reserved port and relays."""
    server, _ = start(server_factory, 4)
    with running_echo_peer() as peer:
        for _ in range(12):
            rtp = WireClient((server.host, server.port), USER, PASSWORD, REALM)
            reply = rtp.request(stun.ALLOCATE, UDP, (stun.EVEN_PORT, True))
            assert reply.cls == stun.SUCCESS, reply
            port = reply.get(stun.XOR_RELAYED_ADDRESS)[1]
            rtcp = WireClient((server.host, server.port), USER, PASSWORD, REALM)
            reply = rtcp.request(stun.ALLOCATE, UDP,
                                 (stun.RESERVATION_TOKEN, reply.get(stun.RESERVATION_TOKEN)))
            assert reply.cls == stun.SUCCESS, reply
            assert reply.get(stun.XOR_RELAYED_ADDRESS)[1] == port + 1
            assert rtcp.request(stun.CREATE_PERMISSION,
                                (stun.XOR_PEER_ADDRESS, peer)).cls == stun.SUCCESS
            rtcp.send_indication(peer, b"rtcp")
            assert rtcp.receive_data() == (peer, b"rtcp")
            rtp.close()
            rtcp.close()
