"""Black box: garbage datagrams and streams at a running relay while real clients use it.

A short run of what bench/blackbox.py does at 100,000 datagrams: mutations of real signed
requests and random bytes over UDP, malformed TCP streams and damaged TLS handshakes, while
aioice clients relay round trips over UDP and TCP the whole time.  The relay answers garbage
only with well-formed messages, stays up, serves every real round trip, and logs no traceback.
"""
from __future__ import annotations

from support.aioice_client import relay_round_trips
from support.blackbox import RealClients, fire_datagrams, malformed_streams
from support.servers import PASSWORD, USER

# Paced well below what the relay reads on a busy CI machine: a datagram the kernel drops from
# a full receive buffer may be a real client's, and UDP data is not retransmitted.
DATAGRAMS, RATE, STREAMS = 5000, 1500, 35


def test_garbage_while_real_clients_relay(server_factory):
    server = server_factory()
    clients = RealClients(server)
    clients.start()
    try:
        sent, answers = fire_datagrams((server.host, server.port), DATAGRAMS, seed=1, rate=RATE)
        malformed_streams(server, STREAMS, seed=2)
    finally:
        clients.stop()
    assert sent == DATAGRAMS and answers > 0
    assert clients.failures == [] and clients.rounds >= 2
    assert server.process.poll() is None
    relay_round_trips(server, USER, PASSWORD, [b"after the garbage"], "udp")
    log = server.stop()
    assert "Traceback" not in log and "Unhandled" not in log, log
