"""TCP/TLS floods and stalled handshakes are bounded, and an established session never notices.

A real aioice client holds a TCP allocation from 127.0.0.1 and relays round trips to an echo
peer before, during and after: a flood of connections from 127.0.0.2 (beyond
--source-connection-quota they are reset), TLS handshakes left hanging from 127.0.0.3 (closed
after --tls-handshake-timeout) and connections without an allocation (closed after
--connection-idle-timeout).  Every wait is on an event: a reply, an EOF, a reset.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Optional, Tuple

from aioice.turn import create_turn_endpoint
from twisted.logger import globalLogPublisher

from relay.net.listeners import StreamLimits
from relay.proto import stun
from support.aioice_client import Collector, Echo
from support.servers import PASSWORD, USER

QUOTA, HANDSHAKE, IDLE = 4, 1, 8
FLOOD = 12
Streams = Tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(port: int, source: str, tls: bool = False) -> Streams:
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0), ssl=context), timeout=10)


async def attempt(port: int, source: str) -> Optional[Streams]:
    """A connection, or None when the server reset it before asyncio saw it connected."""
    try:
        return await connect(port, source)
    except ConnectionError:
        return None


async def binding(streams: Optional[Streams]) -> bool:
    """True when a Binding request is answered, False when the server closed the connection."""
    if streams is None:
        return False
    reader, writer = streams
    request = stun.Message(stun.BINDING, stun.REQUEST)
    try:
        writer.write(request.encode())
        header = await asyncio.wait_for(reader.readexactly(20), timeout=10)
        body = await asyncio.wait_for(reader.readexactly(int.from_bytes(header[2:4], "big")), 10)
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    assert stun.parse(header + body).transaction_id == request.transaction_id
    return True


async def closed_by_server(streams: Streams, timeout: float) -> None:
    """Wait for the server to close (EOF) or reset the connection; we never send a byte."""
    try:
        data = await asyncio.wait_for(streams[0].read(), timeout)
    except ConnectionError:
        return
    assert data == b"", data


async def scenario(server) -> None:
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = echo.get_extra_info("sockname")
    turn, collector = await create_turn_endpoint(Collector, (server.host, server.port), USER,
                                                 PASSWORD, transport="tcp")

    async def round_trip(data: bytes) -> None:
        turn.sendto(data, peer)
        echoed, _ = await asyncio.wait_for(collector.received.get(), timeout=10)
        assert echoed == data

    try:
        await round_trip(b"before")

        # A flood from one address: QUOTA connections are served, the rest are reset.
        flood = [await attempt(server.port, "127.0.0.2") for _ in range(FLOOD)]
        answered = await asyncio.gather(*(binding(streams) for streams in flood))
        assert sorted(answered) == [False] * (FLOOD - QUOTA) + [True] * QUOTA
        served = [streams for streams, ok in zip(flood, answered) if ok]
        server.read_until("127.0.0.2 has 4 TCP/TLS connections open")
        # The quota spans listeners: no TLS either from there; other addresses are served.
        try:
            refused = await connect(server.tls_port, "127.0.0.2", tls=True)
        except (ConnectionError, ssl.SSLError):
            pass
        else:
            assert not await binding(refused)
        assert await binding(await connect(server.tls_port, "127.0.0.4", tls=True))
        await round_trip(b"during the flood")

        # Handshakes left hanging are closed after HANDSHAKE seconds; a plain connection
        # opened with them is still open then (its timeout is IDLE, much longer).
        stalled = [await connect(server.tls_port, "127.0.0.3") for _ in range(3)]
        stalled[0][1].write(b"\x16\x03\x01\x00")        # half a TLS record header
        quiet = await connect(server.port, "127.0.0.3")
        await asyncio.gather(*(closed_by_server(streams, 30) for streams in stalled))
        assert await binding(quiet)
        await round_trip(b"while handshakes stall")

        # Without an allocation, a connection lasts IDLE seconds; the client's, older than
        # that, has one and lives on.
        await closed_by_server(quiet, 60)
        for streams in served:
            await closed_by_server(streams, 60)
        await round_trip(b"after the idle timeout")
        # The flood's connections are gone, so its address is served again.
        assert await binding(await connect(server.port, "127.0.0.2"))
    finally:
        turn.close()
        echo.close()


def test_floods_and_stalled_handshakes_are_bounded_while_a_session_relays(server_factory):
    server = server_factory("--source-connection-quota", str(QUOTA),
                            "--tls-handshake-timeout", str(HANDSHAKE),
                            "--connection-idle-timeout", str(IDLE))
    asyncio.run(scenario(server))
    log = server.stop()
    assert "Traceback" not in log
    assert "allocation closed" in log, log


def test_the_limit_counts_per_address_and_logs_once_per_flood():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        limits = StreamLimits(per_source=2)
        assert limits.admit("192.0.2.1") and limits.admit("192.0.2.1")
        assert limits.admit("2001:db8::1")
        # A flood that reconnects at the limit: refused each time, logged once.
        for _ in range(3):
            assert not limits.admit("192.0.2.1")
            limits.release("192.0.2.1")
            assert limits.admit("192.0.2.1")
        assert limits.refused == 3 and limits.open == {"192.0.2.1": 2, "2001:db8::1": 1}
        # Once the address has no connection left, a new flood is logged again.
        limits.release("192.0.2.1")
        limits.release("192.0.2.1")
        assert limits.admit("192.0.2.1") and limits.admit("192.0.2.1")
        assert not limits.admit("192.0.2.1")
    finally:
        globalLogPublisher.removeObserver(events.append)
    refusals = [e for e in events if "refusing more" in e.get("log_format", "")]
    assert [e["host"] for e in refusals] == ["192.0.2.1", "192.0.2.1"]
