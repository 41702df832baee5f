"""The aioice TURN client against a running turnrelay: relay datagrams to an echo peer and back."""
import asyncio
from typing import List, Optional, Tuple

from aioice.turn import create_turn_endpoint


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


async def _round_trips(server: Tuple[str, int], username: str, password: str,
                       payloads: List[bytes], transport: str, peer_host: str) -> Tuple[str, int]:
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=(peer_host, 0))
    peer = echo.get_extra_info("sockname")
    try:
        turn, collector = await create_turn_endpoint(Collector, server, username, password,
                                                     transport=transport)
        try:
            for data in payloads:
                turn.sendto(data, peer)
                echoed, source = await asyncio.wait_for(collector.received.get(), timeout=5)
                assert (echoed, source[:2]) == (data, peer)
            return turn.get_extra_info("sockname")
        finally:
            turn.close()
    finally:
        echo.close()


def relay_round_trips(server, username: str, password: str, payloads: Optional[List[bytes]] = None,
                      transport: str = "udp", peer_host: str = "127.0.0.1") -> Tuple[str, int]:
    """Allocate, send each payload to an echo peer on `peer_host`, assert it came back; the
    relayed address.

    Raises what aioice raises when the allocation is refused (a 401 among them).
    """
    payloads = payloads or [b"hello through the relay"]
    return asyncio.run(_round_trips((server.host, server.port), username, password, payloads,
                                    transport, peer_host))
