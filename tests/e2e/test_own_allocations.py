"""coturn's `turnutils_uclient -y` (its clients' allocations relaying to each other, the
simplest self-test there is) against the default several workers on a loopback relay address,
with no --allow-loopback-peers: the relay's own live allocations are peers, on any worker
(relay.core.peers.LiveRelays), while every other loopback peer stays refused."""
import re
import subprocess

import pytest

from support.servers import PASSWORD, USER, tool
from support.uclient import relayed_all

MESSAGES, CLIENTS = 20, 8


@pytest.mark.parametrize("flags", [pytest.param((), id="channels"),
                                   pytest.param(("-s",), id="send-indications"),
                                   pytest.param(("-t",), id="tcp-to-the-relay")])
def test_uclient_y_relays_between_allocations_of_different_workers(server_factory, flags):
    server = server_factory("--rfc5766-channels", "--workers", "2", loopback_peers=False,
                            tls=False)
    # uclient's RTP/RTCP pairs (EVEN-PORT, RESERVATION-TOKEN) land on either worker too.
    done = subprocess.run([tool("turnutils_uclient"), "-y", *flags, "-p", str(server.port),
                           "-u", USER, "-w", PASSWORD, "-n", str(MESSAGES), "-m", str(CLIENTS),
                           server.host], capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert relayed_all(output, MESSAGES * CLIENTS), output
    log = server.stop()
    # Allocations on both workers: some pairs crossed from one worker's ports to the other's.
    workers = set(re.findall(r"\[worker (\d)\] .*allocation opened", log))
    assert workers == {"0", "1"}, log
