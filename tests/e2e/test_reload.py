"""Reloads without a restart: certificates replaced on disk without a signal, as Kubernetes
updates a mounted Secret (the relay notices, while a TLS allocation made before relays on
throughout), and peer rules re-read from the config file on SIGHUP.

Every wait is on a log line or a reply.
"""
from __future__ import annotations

import os
import signal
import ssl

import pytest

from relay.cli.turnclient import TLS, TurnClient
from relay.proto import stun
from support.certs import make_cert
from support.core_harness import PEER, PEER2, Harness
from support.relay_clients import tls_connect, udp_socket
from support.servers import PASSWORD, REALM, USER
from support.wire_client import WireClient, error_code


def mount(directory, version: str, cert, key) -> None:
    """What the kubelet does with a Secret volume: the files live in a timestamped directory,
    `..data` points at it, and the names users see point through `..data`; an update writes a
    new directory and swaps `..data` with one rename."""
    target = directory / version
    target.mkdir()
    (target / "tls.crt").write_bytes(cert.read_bytes())
    (target / "tls.key").write_bytes(key.read_bytes())
    (directory / "..data_tmp").symlink_to(version)
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def test_a_certificate_swapped_on_disk_is_reloaded_while_a_tls_allocation_relays(
        server_factory, tmp_path):
    first = make_cert(tmp_path, "first")
    second = make_cert(tmp_path, "second")
    secret = tmp_path / "secret"
    secret.mkdir()
    mount(secret, "..2026_11_23_01", *first)
    server = server_factory("--cert", str(secret / "tls.crt"), "--pkey", str(secret / "tls.key"),
                            udp=False, tcp=False)
    assert ssl.DER_cert_to_PEM_cert(tls_connect(server)[2]).strip() == first[0].read_text().strip()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    client = TurnClient.connect(TLS, (server.host, server.tls_port), USER, PASSWORD, REALM,
                                context=context)
    peer = udp_socket(server.host)
    try:
        reply = client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))
        relayed = reply.get(stun.XOR_RELAYED_ADDRESS)
        assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS,
                                                       peer.getsockname())).cls == stun.SUCCESS

        def round_trip(data: bytes) -> None:
            client.send_indication(peer.getsockname(), data)
            assert peer.recvfrom(2048)[0] == data
            peer.sendto(data[::-1], relayed)
            assert client.receive_data() == (peer.getsockname(), data[::-1])

        round_trip(b"before the swap")
        mount(secret, "..2026_11_23_02", *second)
        server.read_everywhere("TLS certificate files changed: reloaded")
        round_trip(b"after the swap, same connection")
        after = tls_connect(server)[2]
        assert ssl.DER_cert_to_PEM_cert(after).strip() == second[0].read_text().strip()

        # A broken update is refused, the good certificate keeps serving, the session too.
        broken = tmp_path / "broken.pem"
        broken.write_text("not a certificate\n")
        mount(secret, "..2026_11_23_03", broken, second[1])
        server.read_everywhere("TLS certificate files changed but do not load, keeping the old")
        assert tls_connect(server)[2] == after
        round_trip(b"after a broken update")
    finally:
        client.close()
        peer.close()


def test_sighup_rereads_peer_rules_from_the_config_file(server_factory, tmp_path):
    config = tmp_path / "turnrelay.toml"
    config.write_text('denied-peer-ip = []\n')
    server = server_factory("--config", str(config), tcp=False, tls=False)
    client = WireClient((server.host, server.port), USER, PASSWORD, REALM)
    soon_denied, still_allowed = udp_socket("127.0.0.1"), udp_socket("127.0.0.2")
    try:
        relayed = client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17)).get(
            stun.XOR_RELAYED_ADDRESS)
        for peer in (soon_denied, still_allowed):
            assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS,
                                                           peer.getsockname())).cls == stun.SUCCESS
        client.send_indication(soon_denied.getsockname(), b"allowed for now")
        assert soon_denied.recvfrom(100)[0] == b"allowed for now"

        config.write_text('denied-peer-ip = ["127.0.0.1"]\n')
        server.process.send_signal(signal.SIGHUP)
        server.read_everywhere("peer rules reloaded")
        assert error_code(client.request(stun.CREATE_PERMISSION, (
            stun.XOR_PEER_ADDRESS, soon_denied.getsockname()))) == 403
        # Its permission is gone, both ways: what comes after a dropped datagram shows it
        # was dropped, and the allocation relays on to the peer still allowed.
        client.send_indication(soon_denied.getsockname(), b"dropped")
        client.send_indication(still_allowed.getsockname(), b"relayed")
        assert still_allowed.recvfrom(100)[0] == b"relayed"
        soon_denied.setblocking(False)
        with pytest.raises(BlockingIOError):
            soon_denied.recvfrom(100)
        soon_denied.sendto(b"dropped", relayed)
        still_allowed.sendto(b"relayed back", relayed)
        assert client.receive_data() == (still_allowed.getsockname(), b"relayed back")

        config.write_text('denied-peer-ip = ["not an address"]\n')
        server.process.send_signal(signal.SIGHUP)
        server.read_everywhere("peer rules reload failed, keeping the old: --denied-peer-ip: "
                          "'not an address'")
        assert error_code(client.request(stun.CREATE_PERMISSION, (
            stun.XOR_PEER_ADDRESS, soon_denied.getsockname()))) == 403
    finally:
        client.close()
        soon_denied.close()
        still_allowed.close()


def test_new_peer_rules_reach_every_holder_of_the_policy_all_or_none():
    harness = Harness()
    held = harness.server.config.policy  # as the usage triggers' callback checks hold it
    alice = harness.client()
    alice.allocate_ok()
    assert alice.create_permission(PEER, PEER2).cls == stun.SUCCESS
    harness.server.set_peer_rules([], [PEER[0]], [])
    assert not held.permits(PEER[0]) and held.permits(PEER2[0])
    assert set(alice.allocation.permissions) == {PEER2[0]}  # the forbidden one ended at once
    with pytest.raises(ValueError):
        harness.server.set_peer_rules([PEER[0]], ["not an address"], [])
    assert not held.permits(PEER[0])  # nothing of the bad set was taken
