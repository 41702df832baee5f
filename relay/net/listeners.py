"""Thin Twisted adapters around `TurnServer`: client listeners (UDP, TCP/TLS) and relay sockets.

Sockets are made here rather than by `listenUDP`/`listenTCP` so that an IPv6 listener can set
IPV6_V6ONLY beside an IPv4 one on the same port, and a relay socket can set DONT-FRAGMENT
before Twisted adopts it.  Datagrams on the hot path go straight to `socket.sendto`:
`udp.Port.write` re-validates the address of every packet.
"""
from __future__ import annotations

import errno
import socket
import sys
import typing
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Set, Tuple

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet import udp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IPushProducer,
    IReactorFDSet,
    IReactorSocket,
    IReactorTime,
    IReadDescriptor,
)
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.auth.cred import IAccount
from relay.core.credentials import Account, StunCredentials
from relay.core.server import Client, TurnServer
from relay.core.tcp import TcpConnection
from relay.net.source_counts import SourceCounts
from relay.proto import stun
from relay.proto.demux import ALPN_STUN_TURN, HTTP, stream_kind

Address = Tuple[str, int]
MAX_DATAGRAM = 65536
# Datagrams a UDP socket is read for per wake-up, so that one busy socket cannot starve the rest.
READ_BATCH = 64
_SEND_INDICATION = stun.SEND_INDICATION  # its first byte is 0
log = Logger(namespace="turnrelay")


def bound_socket(host: str, port: int, kind: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK)  # one system call fewer than setblocking
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def producer_of(transport) -> IPushProducer:
    """What to pause to stop reading `transport`: a TLS transport is paused below its TLS layer."""
    return transport if IPushProducer.providedBy(transport) else transport.transport


class UdpSender:
    """Sends to one UDP client through its listener's socket: the `Client.send` of a request,
    kept by the allocation it makes for as long as it lives.

    A slotted object and its bound `send`, holding the `sendto` its listener shares: a third
    of the memory of a closure with its cells and a bound `sendto` of its own, for an idle
    allocation (bench/compare.py --idle), and as fast to call.
    """

    __slots__ = ("sendto", "address")

    def __init__(self, sendto: Callable[[bytes, Address], int], address: Address):
        self.sendto = sendto
        self.address = address

    def send(self, data: bytes) -> None:
        try:
            self.sendto(data, self.address)
        except OSError:
            pass  # a full buffer or an ICMP error: UDP may drop, and so may we


class Admission(typing.Protocol):
    """What may hold an authenticated Allocate back before the core runs it: in a worker
    process, the parent's quotas spanning every worker (`relay.service.quota_book`)."""

    def wants(self, client: Client, credentials: StunCredentials, account: Account) -> bool:
        """Whether this request must wait for `allocate` instead of running at once."""

    def allocate(self, client: Client, credentials: StunCredentials, account: Account) -> None:
        """Run the request through the core once it may (or answer the refusal)."""


class LoginDispatcher:
    """Runs a request through the core, logging in through the Portal when it asks, and in a
    worker process reserving a new allocation's place in the parent's quotas first.

    With `verify` (the checkers all decide at once: `ISynchronousChecker`), a login is that
    call, without the Portal's Deferreds; the Portal serves third-party checkers that wait.

    `prepare`, in a worker process, may hold a logged-in request back until what it names
    has come from another worker (a reserved relay port, relay.net.handoff): it returns a
    Deferred to wait for, or None."""

    def __init__(self, server: TurnServer, portal: Portal, clock: IReactorTime,
                 shared: Optional[Admission] = None,
                 verify: Optional[Callable[[StunCredentials], Optional[Account]]] = None):
        self.server = server
        self.portal = portal
        self.clock = clock
        self.shared = shared
        self.verify = verify
        self.prepare: Optional[Callable[[Client, StunCredentials], Optional[Deferred]]] = None

    def __call__(self, client: Client, data: bytes) -> None:
        credentials = self.server.receive(client, data, self.clock.seconds())
        if credentials is None:
            return
        if self.verify is None:
            d = self.portal.login(credentials, None, IAccount)
            d.addCallbacks(self._succeeded, self._failed, callbackArgs=(client, credentials),
                           errbackArgs=(client, credentials))
            return
        try:
            account = self.verify(credentials)
        except Exception:
            self._failed(Failure(), client, credentials)
            return
        if account is None:
            self.server.login_failed(client, credentials, self.clock.seconds())
        else:
            self._succeeded((IAccount, account, None), client, credentials)

    def _succeeded(self, result: tuple, client: Client, credentials: StunCredentials) -> None:
        waiting = self.prepare(client, credentials) if self.prepare is not None else None
        if waiting is None:
            self._admit(client, credentials, result[1])
        else:
            waiting.addCallback(lambda _: self._admit(client, credentials, result[1]))

    def _admit(self, client: Client, credentials: StunCredentials, account: Account) -> None:
        if self.shared is not None and self.shared.wants(client, credentials, account):
            self.shared.allocate(client, credentials, account)
        else:
            self.server.authenticated(client, credentials, account, self.clock.seconds())

    def _failed(self, failure: Failure, client: Client, credentials: StunCredentials) -> None:
        if failure.check(UnauthorizedLogin, UnhandledCredentials):
            self.server.login_failed(client, credentials, self.clock.seconds())
        else:
            log.failure("auth backend failed", failure)
            self.server.server_error(client, credentials.message)


class ClientDatagramProtocol(DatagramProtocol):
    """A UDP listener: ChannelData goes straight to its allocation, the rest to the core."""

    noisy = False

    def __init__(self, server: TurnServer, dispatch: LoginDispatcher, listener: Address):
        self.allocations = server.allocations
        self.dispatch = dispatch
        self.listener = listener
        # The reactor's half of a steered listener (relay.net.steering) reads the native data
        # plane's half up to now before each request of a client with an allocation
        # (relay.net.native.NativeUdp.catch_up).  Without one, what it sent there is dropped
        # whenever it is read, so an Allocate or a challenge spares that system call.
        self.catch_up: Optional[Callable[[], None]] = None

    def startProtocol(self) -> None:
        self._sendto = self.transport.socket.sendto  # every client's UdpSender shares it

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        # ChannelData and Send indications, the relayed packets, skip the core's parser.
        if len(data) >= 4:
            first = data[0]
            if 0x40 <= first < 0x80:
                allocation = self.allocations.get((self.listener, addr))
                if allocation is not None:
                    allocation.from_client_channel(data)
                return
            if first == 0 and data[1] == _SEND_INDICATION:
                allocation = self.allocations.get((self.listener, addr))
                if allocation is not None:
                    allocation.from_client_send(data)
                return
        if self.catch_up is not None and (self.listener, addr) in self.allocations:
            self.catch_up()
        self.dispatch(Client("udp", self.listener, addr, UdpSender(self._sendto, addr).send),
                      data)


@dataclass
class StreamLimits:
    """Bounds on TCP/TLS client connections, shared by every stream listener of a process.

    Each connection holds a descriptor and a buffer before it has authenticated anything, so
    a flood from one address, or handshakes left hanging, must not use them all up: at most
    `per_source` connections per client IP (0: no limit; in a worker process `shared` adds the
    other workers' connections, so the limit holds for the relay), a TLS handshake finished within
    `handshake_timeout` seconds, and an allocation made within `idle_timeout` seconds
    (0: no timeout).  An established session is not touched by any of them.
    """

    per_source: int = 64
    handshake_timeout: float = 10
    idle_timeout: float = 60
    open: Dict[str, int] = field(default_factory=dict)   # client IP -> open connections
    # In a worker process: the other workers' counts, and where this one's go.
    shared: Optional[SourceCounts] = None
    refusing: Set[str] = field(default_factory=set)      # client IPs refused, logged once
    refused: int = 0    # connections reset for the per-source limit, for the metrics
    timed_out: int = 0  # connections closed by either timeout
    handed_out: int = 0  # connections handed to another worker process (relay.net.handoff)
    handed_in: int = 0   # and taken from one

    def admit(self, host: str) -> bool:
        mine = self.open.get(host, 0)
        count = mine + (self.shared.others(host) if self.shared is not None else 0)
        if self.per_source and count >= self.per_source:
            if host not in self.refusing:
                self.refusing.add(host)
                log.warn("{host} has {count} TCP/TLS connections open, the most "
                         "--source-connection-quota allows: refusing more", host=host, count=count)
            self.refused += 1
            return False
        self.open[host] = mine + 1
        if self.shared is not None:
            self.shared.add(host, 1)
        return True

    def release(self, host: str) -> None:
        if self.shared is not None:
            self.shared.add(host, -1)
        count = self.open.pop(host) - 1
        if count:
            self.open[host] = count
        else:
            # Logged again only once the address has left: a flood that keeps reconnecting
            # at the limit must not write a line per connection.
            self.refusing.discard(host)


class _Refused(Protocol):
    """A connection over the per-source limit: reset at once, before any byte is read."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


@implementer(IHandshakeListener)
class ClientStreamProtocol(Protocol, TimeoutMixin):
    """A TCP or TLS client: the only work beyond the core is framing the byte stream.

    Until its TLS handshake completes a connection has `handshake_timeout` seconds; then, as
    long as it has no allocation, `idle_timeout` (a port scanner, a client that gave up).

    After a successful RFC 6062 ConnectionBind the connection is a client data connection:
    no more framing, its bytes go to the peer as they are, and it closes when nothing has
    moved either way for the configured idle time.

    On a port shared with the tokens API (`factory.http`) the first bytes come to `_sniff`
    first, unless ALPN said `stun.turn`: an HTTP request hands the connection to `http`.

    In a worker process, a ConnectionBind for a CONNECTION-ID another worker issued hands the
    connection to that worker (`factory.hand_off`, relay.net.handoff); there it starts again
    as a connection `handed` over from `peer`, TLS (if any) already taken off.
    """

    factory: "ClientStreamFactory"
    buffer = b""
    connection: Optional[TcpConnection] = None
    # Where the connection's bytes go instead once it is not TURN here: HTTP for the tokens
    # API, or a TLS connection's plain stream handed over to another worker.
    passed: Optional[Protocol] = None
    peer: Optional[Address] = None  # set on a connection handed over by another worker
    counted = True  # in `limits.open`: not a TLS connection's plain stream, counted where TLS is
    owner: Optional[int] = None     # the worker to hand this connection to

    def connectionMade(self) -> None:
        factory = self.factory
        self.server, self.dispatch = factory.server, factory.dispatch
        handed = self.peer is not None
        if self.peer is None:
            address = self.transport.getPeer()
            self.peer = (address.host, address.port)
        self.client = Client(factory.transport_name, factory.listener, self.peer,
                             self.transport.write, become_data=self.become_data,
                             hand_over=self.hand_over if factory.hand_off is not None else None)
        limits = factory.limits
        self.setTimeout((limits.handshake_timeout if factory.transport_name == "tls" and not handed
                         else limits.idle_timeout) or None)
        if handed:
            return  # TURN already, and perhaps a UNIX socket, which has no Nagle to turn off
        # Media in small frames: Nagle would hold a frame back for the client's delayed ACK
        # (measured with `turnrelay probe` on loopback: TCP p99 RTT 45 ms with it, below 2 without).
        self.transport.setTcpNoDelay(True)
        if factory.http is not None:
            self.dataReceived = self._sniff  # type: ignore[method-assign]

    def handshakeCompleted(self) -> None:
        self.setTimeout(self.factory.limits.idle_timeout or None)
        if self.transport.negotiatedProtocol in ALPN_STUN_TURN:
            self.__dict__.pop("dataReceived", None)  # STUN or TURN said so: no sniffing

    def _sniff(self, data: bytes) -> None:
        """The first bytes on a port shared with HTTP: once they tell, the connection is
        TURN (the class's `dataReceived` from then on, no cost per frame) or HTTP."""
        self.buffer += data
        kind = stream_kind(self.buffer)
        if kind is None:
            return
        data, self.buffer = self.buffer, b""
        del self.dataReceived
        if kind != HTTP:
            self.dataReceived(data)
            return
        self.pass_to(self.factory.http.buildProtocol(self.transport.getPeer()))
        self.dataReceived(data)

    def pass_to(self, protocol: Protocol) -> None:
        """From now on `protocol` reads this connection (and keeps its own timeouts)."""
        self.setTimeout(None)
        self.passed = protocol
        self.dataReceived = protocol.dataReceived  # type: ignore[method-assign]
        protocol.makeConnection(self.transport)

    def hand_over(self, owner: int) -> None:
        """The core's `Client.hand_over`, called while `dataReceived` dispatches a request."""
        self.owner = owner

    def become_data(self, connection: TcpConnection) -> "ClientStreamProtocol":
        self.connection = connection
        self.setTimeout(self.server.config.tcp_idle_timeout or None)
        return self

    def write(self, data: bytes) -> None:
        """Bytes from the peer (data connections only)."""
        self.resetTimeout()
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()

    def pause(self) -> None:
        producer_of(self.transport).pauseProducing()

    def resume(self) -> None:
        producer_of(self.transport).resumeProducing()

    def timeoutConnection(self) -> None:
        if self.connection is None and self.client.key in self.server.allocations:
            self.resetTimeout()
        else:
            self.factory.limits.timed_out += 1
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.connection is not None:
            self.resetTimeout()
            self.connection.from_client(data)
            return
        buffer = self.buffer + data if self.buffer else data
        offset = 0
        while True:
            size = stun.stream_frame_length(buffer, offset)
            if size is None:
                break
            if size < 0:
                self.transport.loseConnection()
                return
            frame = buffer[offset:offset + size]
            offset += size
            if frame[0] >= 0x40:
                self.server.channel_data(self.client, frame)
            elif frame[1] == _SEND_INDICATION and frame[0] == 0:
                self.server.send_indication(self.client, frame)
            else:
                self.dispatch(self.client, frame)
                if self.owner is not None:  # a ConnectionBind another worker is to answer
                    self.buffer = b""
                    self.factory.hand_off(self, self.owner, buffer[offset - size:])
                    return
                if self.connection is not None:  # that was a ConnectionBind: raw bytes follow
                    self.buffer = b""
                    if offset < len(buffer):
                        self.dataReceived(buffer[offset:])
                    return
        self.buffer = buffer[offset:]

    def connectionLost(self, reason: Failure = None) -> None:
        self.setTimeout(None)
        if self.passed is not None:
            self.passed.connectionLost(reason)
        if self.counted:
            self.factory.limits.release(self.client.address[0])
        if self.connection is not None:
            self.connection.close()
        self.server.connection_lost(self.client)


# hand_off(protocol, worker index, the bytes from the ConnectionBind on): relay.net.handoff
HandOff = Callable[[ClientStreamProtocol, int, bytes], None]


class ClientStreamFactory(Factory):
    protocol = ClientStreamProtocol
    noisy = False

    def __init__(self, server: TurnServer, dispatch: LoginDispatcher, transport_name: str,
                 listener: Address, limits: StreamLimits, http: Optional[Factory] = None,
                 hand_off: Optional[HandOff] = None):
        self.server = server
        self.http = http  # the tokens API's, on a port it shares (relay.net.shared_port)
        self.hand_off = hand_off  # to another worker process (relay.net.handoff)
        self.dispatch = dispatch
        self.transport_name = transport_name
        self.listener = listener
        self.limits = limits

    def buildProtocol(self, addr: IAddress) -> Protocol:
        # Refused by a protocol rather than None: a TLS wrapper cannot wrap None.
        if not self.limits.admit(addr.host):
            return _Refused()
        return Factory.buildProtocol(self, addr)

    def handed(self, peer: Address, counted: bool) -> Optional[ClientStreamProtocol]:
        """A protocol for a connection from `peer` another worker handed over; None over the
        per-source limit.  Not `counted` (the plain stream of a TLS connection) it is not
        counted again: the worker that terminates its TLS counts it."""
        if counted and not self.limits.admit(peer[0]):
            return None
        protocol = self.protocol()
        protocol.factory, protocol.peer, protocol.counted = self, peer, counted
        return protocol


class ReadSocket:
    """A relay socket the reactor reads directly, without a Twisted port object around it.

    There is one per allocation, so it keeps little: slots, and the relay IP as one interned
    string shared by every socket on it rather than a copy each.
    """

    __slots__ = ("reactor", "socket", "address")

    def __init__(self, reactor: IReactorFDSet, sock: socket.socket, address: Optional[Address] = None):
        """`address`, when the caller knows it (the host as the kernel spells it, interned),
        spares a `getsockname`."""
        self.reactor = reactor
        self.socket = sock
        if address is None:
            host, port = sock.getsockname()[:2]
            address = (sys.intern(host), port)
        self.address: Address = address

    def fileno(self) -> int:
        return self.socket.fileno()

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def close(self) -> None:
        if self.socket.fileno() != -1:
            self.reactor.removeReader(self)
            self.socket.close()


@implementer(IReadDescriptor)
class RelayPort(ReadSocket):
    """One relay socket of an allocation, read by the reactor directly.

    Twisted's udp.Port would log every open and close (thousands a minute on a busy relay)
    and re-validate addresses on every write; a relay socket needs neither.  The reactor reads
    it from `attach` on, for the receiver given (the allocation's hot path); one the native
    data plane reads (relay.net.native) is never attached, and never costs the reactor an
    epoll registration.
    """

    __slots__ = ("_recvfrom", "_sendto", "_receive")

    BATCH = READ_BATCH

    def __init__(self, reactor: IReactorFDSet, sock: socket.socket, address: Optional[Address] = None):
        super().__init__(reactor, sock, address)
        self._recvfrom = sock.recvfrom
        self._sendto = sock.sendto
        self._receive: Callable[[bytes, Address], None]  # set by `attach`, before any read

    def attach(self, receiver: Callable[[bytes, Address], None]) -> None:
        self._receive = receiver
        self.reactor.addReader(self)

    def logPrefix(self) -> str:
        return "RelayPort"

    def doRead(self) -> None:
        recvfrom, receive = self._recvfrom, self._receive
        try:
            for _ in range(self.BATCH):
                data, peer = recvfrom(MAX_DATAGRAM)
                receive(data, peer[:2])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass  # an ICMP error reported on the socket: nothing to do for UDP
        except Exception:
            log.failure("relay receive failed on {address}", address=self.address)

    def send(self, data: bytes, peer: Address) -> None:
        try:
            self._sendto(data, peer)
        except OSError:
            pass


class ListenerPort(udp.Port):
    """A client listener's UDP port: Twisted's, reading at most `READ_BATCH` datagrams a wake-up.

    Twisted's port reads up to 256 KiB a wake-up: some 2,600 STUN requests of 100 bytes, which
    under a steady stream of Allocates made one reactor iteration last 30-150 ms, and no timer,
    thread result (the ledger's writes) or other socket was served meanwhile.  The usage
    ledger's queue then grew by a thousand records a second until it refused allocations with
    508.  Bounded by count, as a relay socket is.  An error the socket reports ends the
    wake-up, as on a relay socket, where Twisted's port would have closed the listener for good.
    """

    BATCH = READ_BATCH

    def doRead(self) -> None:
        recvfrom, size = self.socket.recvfrom, self.maxPacketSize
        received = self.protocol.datagramReceived
        v6 = self.addressFamily == socket.AF_INET6
        for _ in range(self.BATCH):
            try:
                data, addr = recvfrom(size)
            except OSError:
                return  # nothing more to read, or an error (ICMP, buffers): UDP may drop
            try:
                received(data, addr[:2] if v6 else addr)  # no flow and scope ids
            except Exception:
                log.failure("datagram from {address} failed", address=addr)


def adopt_datagram_socket(reactor: IReactorSocket, sock: socket.socket,
                          protocol: DatagramProtocol) -> object:
    """Hand a bound UDP socket to the reactor as a `ListenerPort`, which keeps its own
    duplicate descriptor."""
    try:
        # Made as the reactor's adoptDatagramPort makes its port, which takes no port class.
        port = ListenerPort._fromListeningDescriptor(reactor, sock.fileno(), sock.family,
                                                     protocol, maxPacketSize=MAX_DATAGRAM)
        port.startListening()
        # PyPy's socket.fromfd, which Twisted calls there, makes the descriptor blocking, and
        # the duplicate shares that flag: one recvfrom too many would then hang the reactor.
        sock.setblocking(False)
        return port
    finally:
        sock.close()


class RelayBinder:
    """The `bind` that `TurnServer` is given: opens relay sockets on this reactor."""

    def __init__(self, reactor: IReactorFDSet):
        self.reactor = reactor
        # Each relay IP as the kernel spells it (`getsockname` of its first socket), interned:
        # the port of a socket bound to a given one is known without asking again.
        self._hosts: Dict[str, str] = {}

    def __call__(self, host: str, port: int, dont_fragment: bool) -> Optional[RelayPort]:
        try:
            sock = bound_socket(host, port, socket.SOCK_DGRAM)
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return None
            raise
        if dont_fragment:
            _set_dont_fragment(sock)
        known = self._hosts.get(host)
        if known is None:
            relay = RelayPort(self.reactor, sock)
            self._hosts[host] = relay.address[0]
            return relay
        return RelayPort(self.reactor, sock, (known, port))


def _set_dont_fragment(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_MTU_DISCOVER", 23), 2)
    else:
        sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MTU_DISCOVER", 10), 2)  # IP_PMTUDISC_DO
