"""A draining relay's alternates from a file of TURN URIs (relay/service/alternates.py); the
relay reading it while it drains is tests/e2e/test_drain_alternates.py."""
from __future__ import annotations

import os

from relay.core.peers import OwnEndpoints
from relay.core.server import TurnConfig
from relay.service.alternates import AlternatesFile, parse_alternates


def test_parse_alternates_skips_its_own_endpoints_host_names_and_repeats():
    own = OwnEndpoints(local=["10.0.0.5"])
    own.add("0.0.0.0", 3478)
    own.add("0.0.0.0", 5349)
    text = ("turn:10.0.0.5:3478?transport=udp\n"          # this relay, on its own address
            "turn:10.0.0.6:3478?transport=udp\n"
            "turn:10.0.0.6:3478?transport=tcp\n"          # the same address for TCP clients
            "turns:10.0.0.6:5349?transport=tcp\n"
            "turn:[2001:db8::6]\n"                        # the default port
            "turns:turn-b.example.org:5349\n"             # no address for ALTERNATE-SERVER
            "# a comment\n\nnot a uri\n")
    assert parse_alternates(text, own) == ([("10.0.0.6", 3478), ("2001:db8::6", 3478)],
                                           [("10.0.0.6", 5349)])


def test_the_file_adds_to_the_static_alternates_and_is_reread_only_when_it_changes(tmp_path):
    config = TurnConfig(realm="r", relay_ips={}, alternate_servers=(("192.0.2.1", 3478),))
    path = tmp_path / "endpoints"
    alternates = AlternatesFile(str(path), config)
    alternates.refresh()  # no file yet (the operator has not written the ConfigMap): none added
    assert config.alternate_servers == (("192.0.2.1", 3478),) and config.tls_alternate_servers == ()
    path.write_text("turn:192.0.2.1:3478\nturn:192.0.2.2:3478\nturns:192.0.2.2:5349\n")
    alternates.refresh()
    assert config.alternate_servers == (("192.0.2.1", 3478), ("192.0.2.2", 3478))
    assert config.tls_alternate_servers == (("192.0.2.2", 5349),)
    config.alternate_servers = ()  # not touched again while the file stays the same
    alternates.refresh()
    assert config.alternate_servers == ()
    fresh = tmp_path / "endpoints.new"
    fresh.write_text("turn:192.0.2.3:3478\n")
    os.replace(fresh, path)  # as the kubelet swaps a ConfigMap's files
    alternates.refresh()
    assert config.alternate_servers == (("192.0.2.1", 3478), ("192.0.2.3", 3478))
    assert config.tls_alternate_servers == ()
    path.unlink()
    alternates.refresh()
    assert config.alternate_servers == (("192.0.2.1", 3478),)
