"""`--dataplane native` with two workers, as a user would run it: coturn's uclient relays every
message through the native data plane (its own counters say it relayed them, Python did
not), and the relay's metrics count the same bytes.  The rest of the interop suite runs on it
too: scripts/test.sh runs it again with TURNRELAY_TEST_DATAPLANE=native.
"""
import http.client
import re
import subprocess
from typing import Dict

from prometheus_client.parser import text_string_to_metric_families

from support.servers import PASSWORD, USER, free_port, tool

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


def test_uclient_through_the_native_data_plane_of_two_workers(server_factory, echo_peer):
    metrics = free_port()
    server = server_factory("--rfc5766-channels", "--dataplane", "native", "--workers", "2",
                            "--prometheus", "--prometheus-port", str(metrics))
    server.read_until(f"metrics listening on http [127.0.0.1]:{metrics}")
    server.search(r"ready: 2 workers \(CPython [0-9.]+, data plane native\)")
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
    packets = samples(metrics, "turnrelay_relayed_packets_total")
    assert sum(v for labels, v in packets.items() if ("transport", "udp") in labels) == relayed
