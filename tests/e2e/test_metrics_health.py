"""/metrics, /healthz and /readyz of a real turnrelay, scraped over real HTTP after real clients
(aioice over UDP and TCP, the wire client) relayed a known number of bytes.

Every wait is on a log line or an HTTP answer.
"""
from __future__ import annotations

import http.client
import json
import signal
import socket
import ssl
from typing import Dict, Tuple

from prometheus_client.parser import text_string_to_metric_families

from relay.cli.turnclient import TCP, TLS, TurnClient
from relay.proto import stun
from support.accounting import HeldSession, sql_usage
from support.aioice_client import relay_round_trips
from support.db import raw_rows
from support.postgres import throwaway_cluster
from support.relay_clients import (
    bind_data,
    burst,
    counters,
    recv_exactly,
    refused,
    tcp_allocation,
    udp_socket,
)
from support.servers import PASSWORD, REALM, USER, free_port
from support.wire_client import WireClient, error_code

Labels = Tuple[Tuple[str, str], ...]


def with_metrics(server_factory, *extra: str, **kwargs) -> Tuple[object, int]:
    """A relay with --prometheus on a free port, once that port listens too; and the port."""
    port = free_port()
    server = server_factory("--prometheus", "--prometheus-port", str(port), *extra, **kwargs)
    server.read_until(f"metrics listening on http [127.0.0.1]:{port}")  # the secure default
    return server, port


def get(port: int, path: str) -> Tuple[int, str, str]:
    """(status, content type, body) of a GET on loopback."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("content-type"), response.read().decode()
    finally:
        connection.close()


def scrape(port: int) -> Dict[str, Dict[Labels, float]]:
    """Every turnrelay sample of /metrics: name -> sorted labels -> value, summed over the
    workers (PromQL's `sum without (worker)`, as a dashboard for the relay does), or for the
    draining flag their `max`."""
    status, content_type, text = get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4"), content_type
    samples: Dict[str, Dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("turnrelay_") and sample.name != "turnrelay_worker_up":
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "worker"))
                found = samples.setdefault(sample.name, {})
                combine = max if sample.name == "turnrelay_draining" else sum
                found[labels] = combine((found.get(labels, 0), sample.value))
    return samples


def relayed(samples, unit: str, direction: str, transport: str) -> float:
    return samples[f"turnrelay_relayed_{unit}_total"][
        (("direction", direction), ("region", "default"), ("transport", transport))]


def by_transport(samples, name: str, transport: str) -> float:
    return samples[name][(("region", "default"), ("transport", transport))]


def test_metrics_count_what_was_relayed_and_keep_closed_allocations(server_factory):
    users = ["udp-user", "tcp-user", "held-user"]
    server, port = with_metrics(server_factory, tls=False,
                                users=[(user, PASSWORD) for user in users])

    udp_payloads = [b"u" * (10 * i + 1) for i in range(12)]
    relay_round_trips(server, "udp-user", PASSWORD, udp_payloads, "udp")
    tcp_payloads = [b"t" * (7 * i + 3) for i in range(5)]
    relay_round_trips(server, "tcp-user", PASSWORD, tcp_payloads, "tcp")
    for user in ("udp-user", "tcp-user"):
        server.read_until(f"allocation closed user={user} ")
    held = HeldSession(server, "held-user", PASSWORD)
    held.relay(3, 100)

    wrong = WireClient((server.host, server.port), "held-user", "not the password", REALM)
    assert error_code(wrong.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))) == 401
    wrong.close()
    sctp_relay = WireClient((server.host, server.port), "udp-user", PASSWORD, REALM)
    assert error_code(sctp_relay.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 132))) == 442
    sctp_relay.close()

    samples = scrape(port)
    udp_bytes = sum(map(len, udp_payloads)) + 300
    for direction in ("from_client", "to_client"):
        assert relayed(samples, "bytes", direction, "udp") == udp_bytes
        assert relayed(samples, "packets", direction, "udp") == len(udp_payloads) + 3
        assert relayed(samples, "bytes", direction, "tcp") == sum(map(len, tcp_payloads))
        assert relayed(samples, "packets", direction, "tcp") == len(tcp_payloads)
        assert relayed(samples, "bytes", direction, "tls") == 0
    assert by_transport(samples, "turnrelay_allocations", "udp") == 1
    assert by_transport(samples, "turnrelay_allocations", "tcp") == 0
    assert by_transport(samples, "turnrelay_allocations_created_total", "udp") == 2
    assert by_transport(samples, "turnrelay_allocations_created_total", "tcp") == 1
    assert samples["turnrelay_allocations_failed_total"] == {
        (("code", "442"), ("region", "default")): 1}
    assert samples["turnrelay_auth_failures_total"] == {(): 1}
    assert samples["turnrelay_draining"] == {(): 0}
    # Records in flight to SQLite, however many at this instant (the outage test fills it).
    assert samples["turnrelay_ledger_queue_depth"][(("backend", "sqlite"),)] >= 0
    assert samples["turnrelay_ledger_write_errors_total"] == {(("backend", "sqlite"),): 0}

    held.delete()  # closed: its bytes stay in the totals
    held.close()
    after = scrape(port)
    closed = {labels[0][1]: count
              for labels, count in after["turnrelay_allocations_closed_total"].items()}
    # aioice deletes its allocations (over TCP it may hang up first), the held one is deleted.
    assert sum(closed.values()) == 3 and closed["deleted"] >= 2, closed
    assert set(closed) <= {"deleted", "disconnected"}, closed
    assert by_transport(after, "turnrelay_allocations", "udp") == 0
    assert relayed(after, "bytes", "to_client", "udp") == udp_bytes
    assert relayed(after, "packets", "from_client", "udp") == len(udp_payloads) + 3
    text = get(port, "/metrics")[2]
    assert not any(user in text for user in users), "no username is ever a label"
    assert "process_resident_memory_bytes" in text


def test_health_and_readiness_on_the_metrics_port_and_the_api_port(server_factory, tmp_path):
    api_port = free_port()
    secret = tmp_path / "mint.secret"
    secret.write_text("a minting secret\n")
    server, port = with_metrics(server_factory, "--api-port", str(api_port), "--api-db",
                                f"sqlite:///{tmp_path / 'accounts.db'}", "--api-secret-file",
                                str(secret))
    server.read_until(f"tokens API listening on http [127.0.0.1]:{api_port}")
    for where in (port, api_port):
        assert get(where, "/healthz")[::2] == (200, "ok\n")
        assert get(where, "/readyz")[::2] == (200, "ok\n")
        assert "turnrelay_allocations{" in get(where, "/metrics")[2]
    # Every other path of the API port is still the tokens API's, with its JSON answers.
    status, content_type, body = get(api_port, "/v1/accounts/nobody")
    assert (status, content_type) == (404, "application/json")
    assert json.loads(body)["code"] == 404
    status, _, body = get(port, "/v1/accounts/nobody")
    assert status == 404
    # Probes and scrapes stay out of the access log; other requests are logged.
    log = server.read_until('"GET /v1/accounts/nobody HTTP/1.1" 404')
    assert "/readyz" not in "".join(server.log) + log


def drain_started(server) -> None:
    server.process.send_signal(signal.SIGTERM)
    server.read_until("draining: new allocations refused")


def test_sigterm_drains_redirects_new_allocations_and_records_the_shutdown(server_factory,
                                                                            tmp_path):
    server, port = with_metrics(server_factory, "--drain-grace", "6",
                                "--alternate-server", "192.0.2.7:3478",
                                "--alternate-server", "[2001:db8::7]:3478",
                                "--tls-alternate-server", "192.0.2.7:5349",
                                "--alternate-domain", "turn-b.example.org")
    assert get(port, "/readyz")[::2] == (200, "ok\n")
    held = HeldSession(server)
    held.relay(2, 100)

    drain_started(server)
    assert get(port, "/readyz")[::2] == (503, "not ready: draining\n")
    assert get(port, "/healthz")[0] == 200
    assert scrape(port)["turnrelay_draining"] == {(): 1}
    newcomer = WireClient((server.host, server.port), USER, PASSWORD, REALM)
    reply = newcomer.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))
    newcomer.close()
    assert error_code(reply) == 300
    assert reply.get(stun.ALTERNATE_SERVER) == ("192.0.2.7", 3478)  # the client's family
    assert not reply.has(stun.ALTERNATE_DOMAIN)  # only for TLS
    assert reply.check_integrity(stun.long_term_key(USER, REALM, PASSWORD))  # RFC 8489 10
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    for transport, listener, alternate in ((TCP, server.port, ("192.0.2.7", 3478)),
                                           (TLS, server.tls_port, ("192.0.2.7", 5349))):
        stream = TurnClient.connect(transport, (server.host, listener), USER, PASSWORD, REALM,
                                    context=context)
        reply = stream.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))
        stream.close()
        assert (error_code(reply), reply.get(stun.ALTERNATE_SERVER)) == (300, alternate)
        # The name a TLS client checks the alternate's certificate against.
        assert reply.get(stun.ALTERNATE_DOMAIN) == ("turn-b.example.org" if transport == TLS
                                                    else None)
    assert scrape(port)["turnrelay_allocations_redirected_total"] == {
        (("reason", "draining"), ("region", "default")): 3}
    usage = held.relay(3, 50)  # the live allocation keeps relaying through the grace

    server.read_until("drain grace over: ending 1 allocations", timeout=30)
    assert server.process.wait(timeout=30) == 0
    held.close()
    dsn = f"sqlite:///{tmp_path / 'state' / 'usage.db'}"
    assert raw_rows(dsn, "SELECT end_reason FROM sessions") == [("shutdown",)]
    assert sql_usage(dsn)[USER][1:] == usage[1:]


def test_a_drain_ends_as_soon_as_the_last_allocation_does(server_factory):
    server, port = with_metrics(server_factory, "--drain-grace", "600", tcp=False, tls=False)
    held = HeldSession(server)
    drain_started(server)
    newcomer = WireClient((server.host, server.port), USER, PASSWORD, REALM)
    # No alternate configured: 508, on which a client tries another server.
    assert error_code(newcomer.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))) == 508
    newcomer.close()
    assert get(port, "/readyz")[0] == 503
    held.delete()
    held.close()
    server.read_until("drained: no allocation left")
    assert server.process.wait(timeout=30) == 0


def test_connection_limits_show_in_the_metrics(server_factory):
    server, port = with_metrics(server_factory, "--source-connection-quota", "2", udp=False,
                                tls=False)
    held = [socket.create_connection((server.host, server.port), timeout=5) for _ in range(2)]
    for connection in held:  # accepted, by whichever worker, before the third comes
        binding = stun.Message(stun.BINDING, stun.REQUEST)
        connection.sendall(binding.encode())
        assert stun.parse(connection.recv(1000)).transaction_id == binding.transaction_id
    assert refused((server.host, server.port))  # the third: over the quota
    samples = scrape(port)
    assert samples["turnrelay_stream_connections"] == {(): 2}
    assert samples["turnrelay_stream_connections_refused_total"] == {(): 1}
    assert samples["turnrelay_stream_connections_timed_out_total"] == {(): 0}
    for connection in held:
        connection.close()


def test_rate_limit_drops_show_in_the_metrics(server_factory):
    server, port = with_metrics(server_factory, "--max-pps", "5", tcp=False, tls=False)
    client = WireClient((server.host, server.port), USER, PASSWORD, REALM)
    with udp_socket("127.0.0.1") as sink:
        assert client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17)).cls == stun.SUCCESS
        assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS,
                                                       sink.getsockname())).cls == stun.SUCCESS
        burst(client, sink.getsockname(), 20, 10)
        relayed, limited = counters(server, client)  # deletes it: its drops stay counted
    client.close()
    assert limited >= 10, (relayed, limited)
    samples = scrape(port)
    assert samples["turnrelay_rate_limited_packets_total"] == {(): limited}
    assert samples["turnrelay_rate_limited_bytes_total"] == {(): 10 * limited}


def test_a_ledger_outage_shows_in_the_metrics_and_leaves_the_relay_ready(server_factory):
    with throwaway_cluster() as cluster:  # its own PostgreSQL server, to stop
        server, port = with_metrics(server_factory, "--accounting",
                                    f"postgresql:dsn={cluster.dsn}", "--accounting-interval", "1",
                                    tcp=False, tls=False)
        server.read_until("usage backend postgresql ready")
        cluster.stop()
        session = HeldSession(server)  # its start record cannot be written
        session.relay(2, 100)
        server.read_until("usage backend postgresql failed")
        backend = (("backend", "postgresql"),)
        samples = scrape(port)
        assert samples["turnrelay_ledger_backend_failing"] == {backend: 1}
        assert samples["turnrelay_ledger_write_errors_total"][backend] >= 1
        assert samples["turnrelay_ledger_queue_depth"][backend] >= 1
        assert get(port, "/readyz")[::2] == (200, "ok\n")
        newcomer = WireClient((server.host, server.port), USER, PASSWORD, REALM)
        # Still taking allocations while the ledger is down (its queue has room).
        assert newcomer.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17)).cls == stun.SUCCESS
        newcomer.close()
        session.close()


def test_a_second_sigterm_cuts_the_grace_short(server_factory, tmp_path):
    server = server_factory("--drain-grace", "600", tcp=False, tls=False)
    held = HeldSession(server)
    usage = held.relay(2, 80)
    drain_started(server)
    server.process.send_signal(signal.SIGTERM)
    server.read_until("SIGTERM again: ending the drain now")
    assert server.process.wait(timeout=30) == 0
    held.close()
    dsn = f"sqlite:///{tmp_path / 'state' / 'usage.db'}"
    assert raw_rows(dsn, "SELECT end_reason FROM sessions") == [("shutdown",)]
    assert sql_usage(dsn)[USER][1:] == usage[1:]


def test_tcp_relay_connections_show_in_the_metrics(server_factory, tcp_echo_peer):  # noqa: F811
    server, port = with_metrics(server_factory, udp=False, tls=False)
    client, _ = tcp_allocation(server)
    reply = client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, tcp_echo_peer))
    data = bind_data(server, client, reply.get(stun.CONNECTION_ID))
    payload = bytes(range(256)) * 40
    data.sock.sendall(payload)
    assert recv_exactly(data, len(payload)) == payload
    samples = scrape(port)
    assert samples["turnrelay_tcp_peer_connections"] == {(): 1}
    assert by_transport(samples, "turnrelay_allocations", "tcp") == 1
    for direction in ("from_client", "to_client"):
        assert relayed(samples, "bytes", direction, "tcp") == len(payload)
    client.close()
    data.close()
    server.read_until("allocation closed")
    samples = scrape(port)
    assert samples["turnrelay_tcp_peer_connections"] == {(): 0}
    assert relayed(samples, "bytes", "to_client", "tcp") == len(payload)
