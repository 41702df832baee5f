"""The native data plane, the default with the workers, as a user runs it: coturn's uclient
relays every message through it (its own counters say it relayed them, Python did not), and
the relay's metrics count the same bytes.  The whole suite runs on it; scripts/test.sh runs
the UDP interop tests again with TURNRELAY_TEST_DATAPLANE=python, the reference path.
"""
import http.client
import re
import subprocess
from typing import Dict, Tuple

from prometheus_client.parser import text_string_to_metric_families

from support.relay_clients import bursting, connect, udp_socket
from support.servers import PASSWORD, USER, free_port, tool
from support.uclient import relayed_all

MESSAGES, CLIENTS, LENGTH = 50, 4, 100


def samples(port: int, name: str) -> Dict[tuple, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


def test_uclient_through_the_default_native_data_plane(server_factory, echo_peer, monkeypatch):
    monkeypatch.delenv("TURNRELAY_TEST_DATAPLANE", raising=False)  # the default, whatever the run
    metrics = free_port()
    server = server_factory("--rfc5766-channels", "--prometheus", "--prometheus-port", str(metrics))
    server.read_until(f"metrics listening on http [127.0.0.1]:{metrics}")
    server.search(r"ready: \d+ workers \(CPython [0-9.]+, data plane native: the default\)")
    for flags in ((), ("-s",)):  # channels, then Send/Data indications
        # -c: no RTCP pair, whose RESERVATION-TOKEN may reach the other worker (508).
        result = subprocess.run(
            [tool("turnutils_uclient"), "-c", *flags, "-p", str(server.port), "-u", USER,
             "-w", PASSWORD, "-e", echo_peer[0], "-r", str(echo_peer[1]), "-n", str(MESSAGES),
             "-m", str(CLIENTS), "-l", str(LENGTH), server.host],
            capture_output=True, text=True, timeout=120)
        output = result.stdout + result.stderr
        expected = str(MESSAGES * CLIENTS)
        assert re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)[-1] == \
            (expected, expected), output
        assert "Total lost packets 0 (" in output, output
    relayed = 2 * 2 * MESSAGES * CLIENTS  # both ways, both runs
    native = samples(metrics, "turnrelay_dataplane_datagrams_total")
    forwarded = sum(v for labels, v in native.items() if ("what", "forwarded") in labels)
    assert forwarded == relayed, native
    assert sum(v for labels, v in native.items() if ("what", "queue_dropped") in labels) == 0
    # The kernel steered the STUN requests to the reactor's own sockets (relay.net.steering):
    # not one crossed from the data plane's thread through its queue.
    assert sum(v for labels, v in native.items() if ("what", "queued") in labels) == 0, native
    packets = samples(metrics, "turnrelay_relayed_packets_total")
    assert sum(v for labels, v in packets.items() if ("transport", "udp") in labels) == relayed


def test_udp_listeners_past_the_native_data_planes_64_are_served_by_the_reactor(server_factory,
                                                                              echo_peer):
    """The data plane reads 64 listeners a process: a relay given more still serves them all,
    the rest through the reactor, and says which."""
    more = [free_port() for _ in range(65)]
    listening = [arg for port in more for arg in ("--listening-port", str(port))]
    server = server_factory("--rfc5766-channels", *listening, tcp=False, tls=False)
    refused = more[-2:]  # of 66 UDP listeners in each process
    for port in refused:
        server.search(rf"native data plane refused UDP listener \[127\.0\.0\.1\]:{port} .*"
                      r"the reactor serves it")
    for port in (server.port, refused[-1]):  # the first, natively; the last, by the reactor
        result = subprocess.run(
            [tool("turnutils_uclient"), "-c", "-p", str(port), "-u", USER, "-w", PASSWORD,
             "-e", echo_peer[0], "-r", str(echo_peer[1]), "-n", "20", "-m", "2", server.host],
            capture_output=True, text=True, timeout=120)
        assert relayed_all(result.stdout + result.stderr, 40), result.stdout + result.stderr


def bursts(server_factory, limit: str, transports: Tuple[str, ...]) -> Tuple[list, float]:
    """A relay with `limit` (a rate-limit flag and its value): one allocation per client
    transport sends 20 Send indications at once (`bursting`).  What each relayed and had
    dropped, and the datagrams the data plane forwarded."""
    metrics = free_port()
    server = server_factory(*limit.split(), "--prometheus", "--prometheus-port", str(metrics))
    server.read_until(f"metrics listening on http [127.0.0.1]:{metrics}")
    with udp_socket("127.0.0.1") as sink:
        results = bursting(server, [connect(server, transport) for transport in transports], 20,
                           sink)
    native = samples(metrics, "turnrelay_dataplane_datagrams_total")
    return results, sum(v for labels, v in native.items() if ("what", "forwarded") in labels)


def test_an_allocations_own_rate_limit_is_spent_by_the_native_data_plane(server_factory):
    """--max-pps: the allocation is still relayed natively; the data plane drops and counts
    what its budget does not cover, and the core's tick refills that budget every second."""
    [(relayed, limited)], forwarded = bursts(server_factory, "--max-pps 5", ("udp",))
    assert 5 <= relayed <= 10, (relayed, limited)
    assert forwarded == relayed


def test_an_accounts_budget_is_spent_by_both_data_planes(server_factory):
    """--account-max-pps: the account's UDP client is relayed natively and its TCP client by
    Python, and both spend one balance.  One worker, so that both clients reach it (with
    several, each holds its share of the limit, which test_limits covers)."""
    [(native, _), (python, _)], forwarded = bursts(
        server_factory, "--account-max-pps 4 --workers 1", ("udp", "tcp"))
    assert 4 <= native + python <= 8, (native, python)
    assert forwarded == native > 0  # the UDP client's burst went first
