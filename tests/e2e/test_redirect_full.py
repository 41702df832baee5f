"""A full relay (at --total-quota, counted over its workers) sends new Allocates to the nearest
serving region of its --regions-file with 300 Try Alternate, and coturn's turnutils_uclient
follows the redirect and relays through that region's relay; once that region drains too,
the answer is 508."""
from __future__ import annotations

import re
import ssl
import subprocess

from relay.cli.turnclient import TLS, TurnClient
from relay.proto import stun
from support.accounting import HeldSession
from support.servers import PASSWORD, REALM, USER, free_port, tool
from support.uclient import relayed_all
from support.wire_client import WireClient, error_code

MESSAGES, CLIENTS = 10, 2
RFC5766 = "--rfc5766-channels"  # uclient's channel numbers


def regions_file(full, far, draining_port: int) -> str:
    """us-east is the full relay's own region; us-west, nearer it, drains; eu-west is served
    by `far`, named by host name as a real region is (its certificate's name)."""
    return (f'[regions.us-east]\nhost = "127.0.0.1"\nport = {full.port}\ntls-port = {full.tls_port}\n'
            'latitude = 38.94\nlongitude = -77.46\n'
            f'[regions.us-west]\nhost = "127.0.0.1"\nport = {draining_port}\n'
            f'tls-port = {draining_port}\nlatitude = 45.84\nlongitude = -119.70\ndraining = true\n'
            f'[regions.eu-west]\nhost = "localhost"\nport = {far.port}\ntls-port = {far.tls_port}\n'
            'latitude = 53.35\nlongitude = -6.26\n')


def test_a_full_relay_sends_new_allocations_to_the_nearest_serving_region(server_factory, tmp_path):
    far = server_factory(RFC5766, "--region", "eu-west", state_dir=str(tmp_path / "far"))
    path = tmp_path / "regions.toml"
    # The full relay's own listening ports are picked by the factory: write the file once
    # they are known, as the operator's directory is rewritten after the relays start.
    path.write_text("")
    full = server_factory(RFC5766, "--region", "us-east", "--regions-file", str(path),
                          "--total-quota", "1")
    path.write_text(regions_file(full, far, free_port()))
    full.read_everywhere(f"redirects beyond this region, nearest first: 127.0.0.1:{far.port}, "
                         f"127.0.0.1:{far.tls_port} (TLS, localhost)")
    held = HeldSession(full)  # the one allocation --total-quota allows, on one of its workers

    # Whichever worker a new client reaches, the relay is full: 300, signed, to eu-west.
    for _ in range(4):
        client = WireClient((full.host, full.port), USER, PASSWORD, REALM)
        reply = client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))
        client.close()
        assert (error_code(reply), reply.get(stun.ALTERNATE_SERVER)) == (300, ("127.0.0.1", far.port))
        assert reply.check_integrity(stun.long_term_key(USER, REALM, PASSWORD))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    stream = TurnClient.connect(TLS, (full.host, full.tls_port), USER, PASSWORD, REALM, context=context)
    reply = stream.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))
    stream.close()
    assert (error_code(reply), reply.get(stun.ALTERNATE_SERVER),
            reply.get(stun.ALTERNATE_DOMAIN)) == (300, ("127.0.0.1", far.tls_port), "localhost")

    # coturn's client follows the redirect: every allocation of its run is eu-west's.
    with_peer = subprocess.run(
        [tool("turnutils_uclient"), "-p", str(full.port), "-u", USER, "-w", PASSWORD,
         "-y", "-n", str(MESSAGES), "-m", str(CLIENTS), full.host],
        capture_output=True, text=True, timeout=60)
    output = with_peer.stdout + with_peer.stderr
    assert "error 300 (Try Alternate)" in output, output
    assert relayed_all(output, 2 * MESSAGES * CLIENTS), output  # -y: each client and its partner
    # eu-west drains too: within a second no region is left to send to, and the answer is 508.
    path.write_text(regions_file(full, far, free_port()).replace(
        'longitude = -6.26\n', 'longitude = -6.26\ndraining = true\n'))
    full.read_everywhere("redirects beyond this region, nearest first: none")
    client = WireClient((full.host, full.port), USER, PASSWORD, REALM)
    assert error_code(client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))) == 508
    client.close()
    held.relay(2, 100)  # the full relay's own allocation relays on
    held.close()
    full_log, far_log = full.stop(), far.stop()
    opened = re.compile(r"allocation opened user=alice .*transport=udp")
    # uclient -y: each client's allocation and its peer's, and the probe first.
    assert len(opened.findall(far_log)) >= 2 * CLIENTS, far_log
    assert len(opened.findall(full_log)) == 1, full_log  # the held one only
