"""The aioice TURN client (what aiortc uses) allocates over UDP and TCP and relays both ways."""
import asyncio

import pytest
from aioice.turn import create_turn_endpoint

from conftest import PASSWORD, USER

DATAGRAMS = 20


def PAYLOAD(i):
    return b"datagram %03d " % i * (i + 1)


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


class Collector(asyncio.DatagramProtocol):
    def __init__(self):
        self.received = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.received.put_nowait((data, addr))


async def relay_round_trips(server, transport_name):
    loop = asyncio.get_running_loop()
    echo_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = echo_transport.get_extra_info("sockname")
    turn, collector = await create_turn_endpoint(
        Collector, server_addr=(server.host, server.port), username=USER, password=PASSWORD,
        transport=transport_name)
    try:
        relayed = turn.get_extra_info("sockname")
        assert relayed[0] == server.host and 61000 <= relayed[1] <= 65000
        sent = [PAYLOAD(i) for i in range(DATAGRAMS)]
        for data in sent:
            turn.sendto(data, peer)
            echoed, source = await asyncio.wait_for(collector.received.get(), timeout=5)
            assert (echoed, source[:2]) == (data, peer)
    finally:
        turn.close()
        echo_transport.close()


@pytest.mark.parametrize("transport_name", ["udp", "tcp"])
def test_aioice_relays_to_a_peer_and_back(turnrelay, transport_name):
    asyncio.run(relay_round_trips(turnrelay, transport_name))
    log = turnrelay.stop()
    assert f"transport={transport_name}" in log
    # Payload bytes, counted each way, exactly: no STUN or ChannelData header, no padding.
    size = sum(len(PAYLOAD(i)) for i in range(DATAGRAMS))
    assert f"from_client={DATAGRAMS}/{size}B to_client={DATAGRAMS}/{size}B" in log, log
