"""A draining relay redirects new allocations to a ready peer named in its
--alternate-servers-file (a TurnRegion's endpoints, kept current by the kubelet), re-reading it
when it changes, and answers 508 when no peer but itself is left."""
from __future__ import annotations

import os
import signal
import ssl

from relay.cli.turnclient import TLS, TurnClient
from relay.proto import stun
from support.accounting import HeldSession
from support.servers import PASSWORD, REALM, USER
from support.wire_client import WireClient, error_code


def replace_file(path, text: str) -> None:
    """As the kubelet updates a ConfigMap volume: a new file swapped in."""
    fresh = f"{path}.new"
    with open(fresh, "w") as f:
        f.write(text)
    os.replace(fresh, path)


def allocate(address, transport: str = "udp"):
    if transport == "udp":
        client = WireClient(address, USER, PASSWORD, REALM)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        client = TurnClient.connect(transport, address, USER, PASSWORD, REALM, context=context)
    try:
        return client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))
    finally:
        client.close()


def test_draining_relay_redirects_to_a_ready_peer_from_the_file(server_factory, tmp_path):
    peer = server_factory("--workers", "2", state_dir=str(tmp_path / "peer"))
    alternates = tmp_path / "endpoints"
    draining = server_factory("--workers", "2", "--drain-grace", "60",
                              "--alternate-servers-file", str(alternates))
    for server in (peer, draining):
        server.read_until("all 2 workers ready")
    # Written after the start, as the operator does once the region's relays are ready.
    replace_file(alternates, "".join(
        f"turn:127.0.0.1:{server.port}?transport=udp\nturns:127.0.0.1:{server.tls_port}?transport=tcp\n"
        for server in (draining, peer)))
    for index in (0, 1):  # each worker reads the file within a second
        draining.read_until(f"[worker {index}] redirects in this region: 127.0.0.1:{peer.port} "
                            f"(UDP, TCP) and 127.0.0.1:{peer.tls_port} (TLS)")
    held = HeldSession(draining)  # a live allocation keeps the drain going
    draining.process.send_signal(signal.SIGTERM)
    for index in (0, 1):  # the parent passes SIGTERM on: each worker has heard it
        draining.read_until(f"[worker {index}] draining: new allocations refused")

    reply = allocate(("127.0.0.1", draining.port))
    assert (error_code(reply), reply.get(stun.ALTERNATE_SERVER)) == (300, ("127.0.0.1", peer.port))
    assert reply.check_integrity(stun.long_term_key(USER, REALM, PASSWORD))
    # The client follows the redirect: the peer allocates.
    followed = allocate(reply.get(stun.ALTERNATE_SERVER))
    assert error_code(followed) is None and followed.get(stun.XOR_RELAYED_ADDRESS)
    reply = allocate(("127.0.0.1", draining.tls_port), TLS)
    assert (error_code(reply), reply.get(stun.ALTERNATE_SERVER)) == (300, ("127.0.0.1", peer.tls_port))

    # The peer left the region's endpoints: the file says so, and nowhere is left but itself.
    replace_file(alternates, f"turn:127.0.0.1:{draining.port}?transport=udp\n")
    for index in (0, 1):  # both still draining, both re-read it
        draining.read_until(f"[worker {index}] redirects in this region: none (UDP, TCP) and none (TLS)")
    assert error_code(allocate(("127.0.0.1", draining.port))) == 508
    held.relay(2, 100)  # and the live allocation relays on
    held.close()
