"""A drain with several workers: the workers drain together.  One holding no allocation does
not stop while another still drains (its copy of the listeners would get new clients from
the kernel's hash with nobody to answer them): it answers them as the relay does while
draining, and every worker stops once the last allocation has ended."""
from __future__ import annotations

import signal

from relay.cli.turnclient import TCP, TurnClient
from relay.proto import stun
from support.accounting import HeldSession
from support.servers import PASSWORD, REALM, USER
from support.wire_client import error_code

CLIENTS = 12  # each on its own connection: all on the draining worker 2 ** -12


def test_new_clients_are_answered_until_every_worker_has_drained(server_factory):
    server = server_factory("--workers", "2", "--drain-grace", "60")
    held = HeldSession(server)  # a live allocation keeps its worker draining
    server.process.send_signal(signal.SIGTERM)
    server.read_until("draining: new allocations refused")
    for _ in range(CLIENTS):
        client = TurnClient.connect(TCP, (server.host, server.port), USER, PASSWORD, REALM,
                                    timeout=10)
        assert error_code(client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))) == 508
        client.close()
    held.relay(2, 100)  # the live allocation relays on
    assert server.process.poll() is None
    held.delete()
    assert server.process.wait(timeout=30) == 0
    log = server.stop()
    assert log.count("every worker drained: stopping them") == 1, log
    assert "#error]" not in log, log
