"""Twisted adapters for TCP allocations (RFC 6062): relayed listeners, outgoing connections, splices.

The core (`relay.core.server`, `relay.core.tcp`) decides; this module only does what needs a
socket.  A relayed TCP address is a listening socket; Connect opens a second socket bound to
the same address (RFC 6062 section 5.2: "the local endpoint is the relayed transport
address"), so both carry SO_REUSEPORT, and a probe bind without it first makes sure no other
socket already holds the port.  Accepted and connected sockets are handed to the reactor with
`adoptStreamConnection`, which logs nothing per connection.

Flow control: once bound, each side's transport is registered as the other's producer, so a
reader that falls behind fills its socket's send buffer, Twisted pauses reading the other
side, and that side's kernel window closes: memory stays bounded by the socket buffers.
"""
from __future__ import annotations

import errno
import socket
from typing import Callable, Optional

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor, IWriteDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.core.tcp import Address, ConnectResult, IncomingConnection, TcpConnection
from relay.net.listeners import ReadSocket, bound_socket, producer_of

log = Logger(namespace="turnrelay")
CONNECT_TIMEOUT = 30.0  # RFC 6062 section 5.2: "The timeout value MUST be at least 30 seconds"


def splice(a, b) -> None:
    """Each transport pauses reading the other while its own send buffer is full."""
    a.registerProducer(producer_of(b), True)
    b.registerProducer(producer_of(a), True)


class PeerProtocol(Protocol):
    """A peer data connection.  Reads nothing until bound: the kernel holds the peer back."""

    connection: Optional[TcpConnection] = None

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.transport.setTcpNoDelay(True)  # as on client connections: small media frames
        self.factory.made(self)

    def start(self, connection: TcpConnection) -> None:
        self.connection = connection
        splice(self.transport, connection.client_end.transport)
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.connection.from_peer(data)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = None) -> None:
        if self.connection is not None:
            self.connection.close()


class PeerFactory(Factory):
    protocol = PeerProtocol
    noisy = False

    def __init__(self, made: Callable[[PeerProtocol], None]):
        self.made = made


@implementer(IReadDescriptor)
class StreamRelayPort(ReadSocket):
    """The relayed transport address of a TCP allocation: accepts peers, connects to peers."""

    BATCH = 16  # connections accepted per wake-up

    def __init__(self, reactor, sock: socket.socket, connect_timeout: float = CONNECT_TIMEOUT):
        super().__init__(reactor, sock)
        self.connect_timeout = connect_timeout
        self._incoming: Optional[IncomingConnection] = None

    def listen(self, incoming: IncomingConnection) -> None:
        self._incoming = incoming
        self.reactor.addReader(self)

    def logPrefix(self) -> str:
        return "StreamRelayPort"

    def doRead(self) -> None:
        for _ in range(self.BATCH):
            try:
                sock, peer = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and the like: the peer waits in the backlog
                log.warn("accept on {address} failed: {err}", address=self.address, err=err)
                return
            self._adopt(sock, lambda end, peer=peer[:2]: self._incoming(peer, end,
                                                                        self.reactor.seconds()))

    def _adopt(self, sock: socket.socket, made: Callable[[PeerProtocol], None]) -> None:
        try:
            self.reactor.adoptStreamConnection(sock.fileno(), sock.family, PeerFactory(made))
        finally:
            sock.close()  # the reactor holds its own duplicate

    def connect(self, peer: Address, result: ConnectResult) -> None:
        """Connect from this relayed address to `peer`; `result` gets the end or None."""
        try:
            sock = bound_socket(self.address[0], self.address[1], socket.SOCK_STREAM,
                                reuse_port=True)
        except OSError:
            result(None, self.reactor.seconds())
            return
        code = sock.connect_ex(peer)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            result(None, self.reactor.seconds())
            return
        _Connecting(self, sock, result)


@implementer(IWriteDescriptor)
class _Connecting:
    """A non-blocking connect in progress: writable means done; the timer means 447."""

    def __init__(self, port: StreamRelayPort, sock: socket.socket, result: ConnectResult):
        self.port, self.socket, self.result = port, sock, result
        self.reactor = port.reactor
        self.timer = self.reactor.callLater(port.connect_timeout, self._fail)
        self.reactor.addWriter(self)

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "StreamRelayConnect"

    def doWrite(self) -> None:
        self.reactor.removeWriter(self)
        self.timer.cancel()
        if self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.socket.close()
            self.result(None, self.reactor.seconds())
            return
        self.port._adopt(self.socket, lambda end: self.result(end, self.reactor.seconds()))

    def _fail(self) -> None:
        self.reactor.removeWriter(self)
        self.socket.close()
        self.result(None, self.reactor.seconds())

    def connectionLost(self, reason: Failure) -> None:
        if self.timer.active():
            self.timer.cancel()
            self._fail()


class StreamRelayBinder:
    """The `bind_stream` that `TurnServer` is given: opens TCP relayed addresses."""

    def __init__(self, reactor: IReactorFDSet, connect_timeout: float = CONNECT_TIMEOUT):
        self.reactor = reactor
        self.connect_timeout = connect_timeout

    def __call__(self, host: str, port: int) -> Optional[StreamRelayPort]:
        try:
            # Without SO_REUSEPORT this bind fails if any socket holds the port, so two
            # allocations (or another process) never share a relayed address.
            bound_socket(host, port, socket.SOCK_STREAM).close()
            sock = bound_socket(host, port, socket.SOCK_STREAM, reuse_port=True)
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return None
            raise
        sock.listen(128)
        return StreamRelayPort(self.reactor, sock, self.connect_timeout)
