"""The aioice TURN client (what aiortc uses) allocates over UDP and TCP and relays both ways."""
import pytest

from support.aioice_client import relay_round_trips
from support.servers import PASSWORD, USER

DATAGRAMS = 20


def PAYLOAD(i):
    return b"datagram %03d " % i * (i + 1)


@pytest.mark.parametrize("transport_name", ["udp", "tcp"])
def test_aioice_relays_to_a_peer_and_back(turnrelay, transport_name):
    payloads = [PAYLOAD(i) for i in range(DATAGRAMS)]
    host, port = relay_round_trips(turnrelay, USER, PASSWORD, payloads, transport_name)
    assert host == turnrelay.host and 61000 <= port <= 65000
    log = turnrelay.stop()
    assert f"transport={transport_name}" in log
    # Payload bytes, counted each way, exactly: no STUN or ChannelData header, no padding.
    size = sum(len(PAYLOAD(i)) for i in range(DATAGRAMS))
    assert f"from_client={DATAGRAMS}/{size}B to_client={DATAGRAMS}/{size}B" in log, log
