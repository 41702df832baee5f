"""A longer network path in front of a real relay: UDP datagrams and TCP streams forwarded
from a port of 127.0.0.1 to the relay's, each direction delayed by a fixed time.

What `tc qdisc ... netem delay` does in the kernel, done in user space, because netem is not
in every kernel (it is not in this machine's: "Specified qdisc kind is unknown").  The relay
behind it runs unchanged, in its default configuration; a client sees a relay one round trip
of 2 x `delay` further away, as a region on another continent is.

UDP: one upstream socket per client address (so the relay sees one 5-tuple per client, as
through a NAT).  TCP (and TLS, which is bytes to it): one upstream connection per accepted
one, bytes kept in order, the close passed on after the last of them.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, List, Optional, Tuple

from support.servers import free_port

Address = Tuple[str, int]


class _Upstream(asyncio.DatagramProtocol):
    """The socket one client's datagrams leave by; the relay's answers come back to it."""

    def __init__(self, proxy: "_UdpListener", client: Address):
        self.proxy, self.client = proxy, client

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.proxy.later(self.proxy.reply, data, self.client)


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, target: Address, delay: float):
        self.loop, self.target, self.delay = loop, target, delay
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.upstreams: Dict[Address, asyncio.Future] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def later(self, function: Any, *args: Any) -> None:
        self.loop.call_later(self.delay, function, *args)

    def reply(self, data: bytes, client: Address) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, client)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if addr not in self.upstreams:
            self.upstreams[addr] = asyncio.ensure_future(self.loop.create_datagram_endpoint(
                lambda: _Upstream(self, addr), remote_addr=self.target))
        self.later(lambda: asyncio.ensure_future(self._send_up(self.upstreams[addr], data)))

    @staticmethod
    async def _send_up(upstream: asyncio.Future, data: bytes) -> None:
        transport, _ = await upstream
        transport.sendto(data)

    def close(self) -> None:
        for upstream in self.upstreams.values():
            if upstream.done() and not upstream.exception():
                upstream.result()[0].close()
        if self.transport is not None:
            self.transport.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay: float) -> None:
    """Copy `reader` to `writer`, every chunk `delay` seconds later, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the delay itself: what this proxy is for
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    pumping = asyncio.ensure_future(pump())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await pumping
    except (ConnectionError, OSError):
        pumping.cancel()
        writer.close()


class DelayProxy:
    """Forwarders on 127.0.0.1, each direction `delay` seconds late; runs in a thread of its
    own until `close`."""

    def __init__(self, delay: float):
        self.delay = delay
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="delay-proxy",
                                       daemon=True)
        self.thread.start()
        self._closers: List[Any] = []

    def forward(self, target_port: int, udp: bool = True, tcp: bool = True,
                host: str = "127.0.0.1") -> int:
        """A port of `host` forwarding to `target_port` of `host` (UDP and TCP alike)."""
        port = free_port(host)
        asyncio.run_coroutine_threadsafe(self._listen(host, port, (host, target_port), udp, tcp),
                                         self.loop).result(10)
        return port

    async def _listen(self, host: str, port: int, target: Address, udp: bool,
                      tcp: bool) -> None:
        if udp:
            _, listener = await self.loop.create_datagram_endpoint(
                lambda: _UdpListener(self.loop, target, self.delay), local_addr=(host, port))
            self._closers.append(listener.close)
        if tcp:
            async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                self._closers.append(writer.close)
                try:
                    up_reader, up_writer = await asyncio.open_connection(*target)
                except OSError:
                    writer.close()
                    return
                self._closers.append(up_writer.close)
                await asyncio.gather(_pipe(reader, up_writer, self.delay),
                                     _pipe(up_reader, writer, self.delay))
            server = await asyncio.start_server(accepted, host, port)
            self._closers.append(server.close)

    def __enter__(self) -> "DelayProxy":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close every socket, end every task, then the loop and its thread."""
        async def shut_down() -> None:
            for close in self._closers:
                close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shut_down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
