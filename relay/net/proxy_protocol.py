"""PROXY protocol (v1 and v2) in front of a stream listener, believed only from trusted proxies.

Behind HAProxy, an AWS NLB or a Kubernetes load balancer every connection comes from the
balancer; its PROXY header says whose it is.  `ProxyProtocolFactory` wraps a listener's
factory (outside TLS: the header comes before the handshake) and builds the wrapped protocol
only once the header is read, with the client's address: everything above it (the per-source
connection limit, the core's quotas and logs, the ledger, the tokens API's key-failure limit)
sees the real client from its first call on.

Twisted's own `twisted.protocols.haproxy` connects the wrapped protocol before the header has
arrived (its `connectionMade` would see the balancer) and has neither a trust list nor a
deadline, hence this one.

- A connection from outside `--proxy-protocol-from` is reset at once: a listener behind a
  balancer takes no direct clients, so nobody can send a header of their own making, or go
  round the balancer's own limits.
- A trusted source must send a whole, valid header within `timeout` seconds and at most
  `relay.proto.proxy_protocol.MAX_HEADER` bytes, or the connection is reset.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import List, Optional, Sequence, Set, Union

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, TimeoutMixin, WrappingFactory
from zope.interface import directlyProvides, providedBy

from relay.proto.proxy_protocol import Address, ProxyHeaderError, parse

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
log = Logger(namespace="turnrelay")
LOGGED_SOURCES = 1024  # refused sources named in the log before the list starts over


def parse_networks(values: Sequence[str]) -> List[Network]:
    """`--proxy-protocol-from` values: addresses or CIDR networks (ValueError naming a bad one)."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    return networks


@dataclass(frozen=True)
class ProxyTrust:
    """`--proxy-protocol-from` and `--proxy-protocol-timeout`: which sources a listener takes
    PROXY headers (and only PROXY-headed connections) from, and how long a header may take."""

    networks: Sequence[Network]
    timeout: float

    def wrap(self, factory: Factory) -> "ProxyProtocolFactory":
        return ProxyProtocolFactory(factory, self.networks, self.timeout)


def _twisted_address(address: Address) -> IAddress:
    host, port = address
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)


class ProxyHeaderProtocol(ProtocolWrapper, TimeoutMixin):
    """Reads the PROXY header, then becomes a plain wrapper of the protocol built for the
    client it names (and its transport, whose getPeer and getHost say what the header said)."""

    factory: "ProxyProtocolFactory"
    buffer = b""
    peer: Optional[IAddress] = None
    host: Optional[IAddress] = None

    def __init__(self, factory: "ProxyProtocolFactory"):
        super().__init__(factory, None)  # type: ignore[arg-type]  # built once the header is in

    def makeConnection(self, transport) -> None:
        directlyProvides(self, providedBy(transport))  # a TLS layer above pauses it, etc.
        self.factory.registerProtocol(self)
        self.transport = transport
        self.connected = 1
        source = transport.getPeer().host
        if not self.factory.trusts(source):
            self.factory.refusing(source)
            self._abort()
            return
        self.setTimeout(self.factory.timeout or None)

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:  # refused, or the header was bad: nothing more is read
            return
        self.buffer += data
        try:
            header = parse(self.buffer)
        except ProxyHeaderError as err:
            log.warn("bad PROXY protocol header from {source}: {err}",
                     source=self.transport.getPeer().host, err=err)
            self._abort()
            return
        if header is None:
            return
        self.setTimeout(None)
        rest, self.buffer = self.buffer[header.size:], b""
        if header.source is not None and header.destination is not None:
            self.peer = _twisted_address(header.source)
            self.host = _twisted_address(header.destination)
        inner = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if inner is None:
            self._abort()
            return
        self.wrappedProtocol = inner
        inner.makeConnection(self)
        if rest and self.wrappedProtocol is not None and not self.disconnecting:
            self.dataReceived(rest)

    def getPeer(self) -> IAddress:
        return self.peer or self.transport.getPeer()

    def getHost(self) -> IAddress:
        return self.host or self.transport.getHost()

    def timeoutConnection(self) -> None:
        log.warn("no PROXY protocol header from {source} within {timeout} s",
                 source=self.transport.getPeer().host, timeout=self.factory.timeout)
        self._abort()

    def _abort(self) -> None:
        self.setTimeout(None)
        self.disconnecting = 1
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.setTimeout(None)
        if self.wrappedProtocol is None:
            self.factory.unregisterProtocol(self)
        else:
            super().connectionLost(reason)


class ProxyProtocolFactory(WrappingFactory):
    """Wraps a stream listener's factory: connections from `trusted` networks start with a
    PROXY header, which is read before the wrapped factory builds anything; others are reset."""

    protocol = ProxyHeaderProtocol
    noisy = False

    def __init__(self, wrapped: Factory, trusted: Sequence[Network], timeout: float):
        super().__init__(wrapped)
        self.trusted = list(trusted)
        self.timeout = timeout
        self._logged: Set[str] = set()

    def trusts(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:  # not an IP connection (a UNIX socket): nothing to trust
            return False
        return any(ip in network for network in self.trusted)

    def refusing(self, host: str) -> None:
        """Log a refused source once (until many have been): a flood must not flood the log."""
        if host in self._logged:
            return
        if len(self._logged) >= LOGGED_SOURCES:
            self._logged.clear()
        self._logged.add(host)
        log.warn("{host} is not in --proxy-protocol-from: its connections are refused",
                 host=host)

    def buildProtocol(self, addr: IAddress) -> ProxyHeaderProtocol:
        return self.protocol(self)
