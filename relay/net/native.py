"""`--dataplane native`: a process's UDP client listeners read by the native data plane
(relay.net.dataplane), which relays the datagrams of their allocations from the tables the
core keeps filled, and hands every other datagram back to the listener's protocol here.

What goes native: an allocation made on a UDP listener, with UDP relays.  Its rate limits
come along: every limited budget of the process is a `NativeBudget`, whose balance the data
plane's thread and the Python path (the account's TCP allocations, what the data plane hands
over) spend alike, and which the core's tick refills every second.  The allocation is
installed when the core opens it (its relay sockets go to the data plane, never to the reactor),
mirrored on every permission and channel change (`ForwardingTables`), and released before its
relay sockets close, its last counts added to its counters.
"""
from __future__ import annotations

import socket
from typing import Any, Dict, Optional, Set, Tuple

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.core.allocation import Address, Allocation
from relay.core.server import TurnServer
from relay.net.dataplane import DataPlaneError, NativeBudget, NativeDataPlane
from relay.net.listeners import ClientDatagramProtocol, RelayPort
from relay.proto import stun

log = Logger(namespace="turnrelay")
BATCH = 256  # queued datagrams handled per wake-up, so the reactor's other work gets its turn


class NativeTables:
    """One allocation's entries in the native data plane (`ForwardingTables`)."""

    __slots__ = ("plane", "handle", "allocation")

    def __init__(self, plane: NativeDataPlane, handle: Any, allocation: Allocation):
        self.plane, self.handle, self.allocation = plane, handle, allocation

    def permit(self, ip: str, native_send: bool) -> None:
        self.plane.permit(self.handle, ip, native_send)

    def unpermit(self, ip: str) -> None:
        self.plane.unpermit(self.handle, ip)

    def bind(self, number: int, peer: Address) -> None:
        self.plane.bind_channel(self.handle, number, peer)

    def unbind(self, number: int) -> None:
        self.plane.unbind_channel(self.handle, number)

    def collect(self) -> None:
        self._add(self.plane.take_counters(self.handle))

    def close(self) -> None:
        # The last counts come with the removal: the thread may free the entry right after.
        self._add(self.plane.remove_allocation(self.handle))

    def _add(self, taken: Tuple[int, ...]) -> None:
        if any(taken):
            a = self.allocation
            a.bytes_from_client += taken[0]
            a.packets_from_client += taken[1]
            a.bytes_to_client += taken[2]
            a.packets_to_client += taken[3]
            a.limited_packets += taken[4]
            a.limited_bytes += taken[5]


class NativeListener:
    """A UDP client listener the data plane reads: `stopListening` like a Twisted port."""

    def __init__(self, udp: "NativeUdp", listener: int, sock: socket.socket):
        self.udp, self.listener, self.socket = udp, listener, sock

    def stopListening(self) -> None:
        self.udp.stop_listening(self)

    def catch_up(self) -> None:
        """`NativeUdp.catch_up` for this listener: the steered reactor socket's hook."""
        self.udp.catch_up(self.listener)


@implementer(IReadDescriptor)
class NativeUdp:
    """A process's native data plane, its UDP listeners and the reader of its queue."""

    def __init__(self, reactor: Any, server: TurnServer):
        self.reactor = reactor
        self.server = server
        self.plane = NativeDataPlane()
        try:
            self.plane.start()
        except DataPlaneError:
            self.plane.close()
            raise
        self.protocols: Dict[int, ClientDatagramProtocol] = {}
        self.listeners: Dict[Address, int] = {}
        self.own_ports: Set[int] = set()  # the relay's own ports the data plane knows
        server.opened_observers.insert(0, self.opened)  # only once its thread runs
        server.limited_budget = NativeBudget
        reactor.addReader(self)

    def listen(self, sock: socket.socket, protocol: ClientDatagramProtocol) -> NativeListener:
        """Serve the bound UDP socket `sock` through the data plane; it stays open here, for
        the replies the core sends through it."""
        sock.setblocking(False)  # a worker's inherited socket is blocking on PyPy
        listener = self.plane.add_listener(sock.fileno())
        protocol._sendto = sock.sendto  # what startProtocol sets on a reactor's port
        self.protocols[listener] = protocol
        self.listeners[protocol.listener] = listener
        return NativeListener(self, listener, sock)

    def stop_listening(self, port: NativeListener) -> None:
        self.plane.remove_listener(port.listener)
        protocol = self.protocols.pop(port.listener)
        del self.listeners[protocol.listener]
        port.socket.close()
        if not self.protocols:
            self.reactor.removeReader(self)
            self.plane.close()

    def opened(self, allocation: Allocation) -> None:
        listener = self.listeners.get(allocation.key[0]) if allocation.transport == "udp" else None
        if listener is None or allocation.tcp:
            return
        relays: Dict[int, Optional[int]] = {stun.FAMILY_IPV4: None, stun.FAMILY_IPV6: None}
        for family, relay in allocation.relays.items():
            assert isinstance(relay, RelayPort)
            relays[family] = relay.fileno()
        own = self.server.config.policy.own.ports
        if len(own) != len(self.own_ports):  # ports are only ever added to OwnEndpoints
            for port in own - self.own_ports:
                self.plane.set_own_port(port)
            self.own_ports = set(own)
        own, shared = (budget if isinstance(budget, NativeBudget) else None
                       for budget in (allocation.budget, allocation.account_budget))
        try:
            handle = self.plane.add_allocation(listener, allocation.client,
                                               relays[stun.FAMILY_IPV4], relays[stun.FAMILY_IPV6],
                                               own, shared)
        except (DataPlaneError, MemoryError) as err:
            log.warn("native data plane refused {client}'s allocation ({err}): the reactor "
                     "relays it", client=allocation.client, err=err)
            return
        tables = allocation.tables = NativeTables(self.plane, handle, allocation)
        for ip in allocation.permissions:  # none yet from the core; kept for any opener's
            tables.permit(ip, ip not in allocation.relay_only)

    # -- the queue: what the data plane hands back -----------------------------------------

    def catch_up(self, listener: int) -> None:
        """Before a request that reached the reactor's own socket (relay.net.steering): what
        its client sent earlier to `listener`'s is relayed, counted or handled first, as when
        one socket carried both (a Refresh(0) after a burst closes with the burst counted)."""
        if self.plane.catch_up(listener):
            self.doRead()

    def fileno(self) -> int:
        return self.plane.fileno()

    def doRead(self) -> None:
        pop, protocols = self.plane.pop, self.protocols
        for _ in range(BATCH):
            item = pop()
            if item is None:
                return
            listener, data, address = item
            protocol = protocols.get(listener)
            if protocol is not None:
                try:
                    protocol.datagramReceived(data, address)
                except Exception:
                    log.failure("datagram from {address} failed", address=address)

    def logPrefix(self) -> str:
        return "NativeUdp"

    def connectionLost(self, reason: Failure) -> None:
        pass
