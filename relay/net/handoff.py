"""Stream connections handed from one worker process to another (RFC 6062 ConnectionBind).

A ConnectionBind arrives on a new TCP or TLS connection, which the kernel's SO_REUSEPORT
hash gives to any worker, while the peer connection it binds to lives in the worker that
issued its CONNECTION-ID (the ID says which: `relay.core.tcp_relay`).  The worker it reaches
sends the connection on, directly, to the owner's inbox: a SOCK_SEQPACKET socket pair per
worker, made by the parent, which keeps both ends (as it keeps the listeners), so a restarted
worker reads what was sent to it meanwhile.  One message per connection: a header (transport,
listener, client address), the bytes already read from the ConnectionBind on, and the
connection's descriptor passed with SCM_RIGHTS.  The owner carries on as if the connection
had reached it first.

TCP: the accepted socket itself moves, and the worker it reached closes its copy without a
shutdown, so the connection stays up with no byte relayed through that worker.

TLS: the ConnectionBind is inside the TLS stream, read only after the handshake, and an
OpenSSL session cannot move to another process.  So the TLS session stays where it was made
and the worker that terminates it relays the plain stream over a UNIX socket pair, one end
handed to the owner like a TCP socket; the owner sees a plain connection from the client's
address.  The cost is one more hop for those data connections, with flow control both ways
(`splice`); the alternative of handing over before the handshake would need the
CONNECTION-ID before it, which the client does not send there.
"""
from __future__ import annotations

import json
import os
import socket
import struct
from typing import Callable, Dict, List, Tuple

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.net.listeners import Address, ClientStreamFactory, ClientStreamProtocol
from relay.net.stream_relay import splice

log = Logger(namespace="turnrelay")
# The bytes read before a ConnectionBind's answer: the request and little else (a client
# waits for the answer before it sends data), so a larger buffer is not handed over.
MOST_READ = 65536
_HEADER = struct.Struct("!H")
MESSAGE = MOST_READ + 1024  # the largest message an inbox reads


def inbox_pair() -> Tuple[socket.socket, socket.socket]:
    """A worker's inbox: (the end others send to, the end it reads)."""
    send, receive = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return send, receive


def _innermost(transport):
    """The socket transport under any TLS or PROXY protocol wrapper."""
    while not hasattr(transport, "socket"):
        transport = transport.transport
    return transport


class _PlainSide(Protocol):
    """The TLS-terminating worker's end of a plain stream handed over: what the owner
    writes goes into the client's TLS connection."""

    def __init__(self, client: ClientStreamProtocol):
        self.client = client

    def connectionMade(self) -> None:
        splice(self.transport, self.client.transport)

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.client.transport.loseConnection()


class _ToOwner(Protocol):
    """Reads the client's TLS connection once handed over: the plain bytes go to the owner."""

    def __init__(self, plain: _PlainSide):
        self.plain = plain

    def dataReceived(self, data: bytes) -> None:
        self.plain.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.plain.transport.loseConnection()


class _Made(Factory):
    """Gives the reactor a protocol made already (whose own factory is its listener's)."""

    noisy = False

    def __init__(self, protocol: Protocol):
        self.made = protocol

    def buildProtocol(self, addr) -> Protocol:
        return self.made


class HandOff:
    """Sends connections to the other workers' inboxes, and takes those sent to this one."""

    def __init__(self, reactor, index: int, outboxes: List[socket.socket], inbox: socket.socket):
        self.reactor = reactor
        self.index = index
        self.outboxes = outboxes  # worker i's inbox at [i]
        for sock in outboxes:
            sock.setblocking(False)
        self.inbox = _Inbox(reactor, inbox, self.received)
        # The stream listeners of this worker, by transport and address (the same in every
        # worker): where a connection handed over continues.
        self.factories: Dict[Tuple[str, Address], ClientStreamFactory] = {}

    def listen(self, factory: ClientStreamFactory) -> None:
        self.factories[(factory.transport_name, factory.listener)] = factory

    def start(self) -> None:
        self.inbox.start()

    def stop(self) -> None:
        self.inbox.close()

    def __call__(self, protocol: ClientStreamProtocol, owner: int, read: bytes) -> None:
        """`ClientStreamFactory.hand_off`: send `protocol`'s connection to worker `owner`."""
        factory = protocol.factory
        if len(read) > MOST_READ:
            protocol.transport.loseConnection()
            return
        header = json.dumps([factory.transport_name, list(factory.listener),
                             list(protocol.client.address)]).encode()
        message = _HEADER.pack(len(header)) + header + read
        if factory.transport_name == "tls":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with ours, theirs:
                if not self._send(owner, message, theirs, factory):
                    protocol.transport.loseConnection()
                    return
                plain = _PlainSide(protocol)
                protocol.pass_to(_ToOwner(plain))
                self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _Made(plain))
            return
        tcp = _innermost(protocol.transport)
        tcp.stopReading()  # from now on the owner reads it
        if self._send(owner, message, tcp.socket, factory):
            # Close this process's descriptor only: a shutdown would end the connection
            # the owner now holds (Twisted's documented switch for this).
            tcp._shouldShutdown = False
        protocol.transport.loseConnection()

    def _send(self, owner: int, message: bytes, sock: socket.socket,
              factory: ClientStreamFactory) -> bool:
        try:
            socket.send_fds(self.outboxes[owner], [message], [sock.fileno()])
        except OSError as err:
            # A full inbox: the owner is stuck or restarting; the client may retry.
            log.warn("could not hand a connection to worker {owner}: {err}", owner=owner,
                     err=os.strerror(err.errno) if err.errno else err)
            return False
        factory.limits.handed_out += 1
        return True

    def received(self, message: bytes, descriptor: int) -> None:
        """A connection from another worker: it continues here as if it had come first."""
        try:
            size, = _HEADER.unpack_from(message)
            transport, listener, peer = json.loads(message[_HEADER.size:_HEADER.size + size])
            factory = self.factories.get((transport, tuple(listener)))
        except (ValueError, struct.error):
            os.close(descriptor)
            log.error("a malformed hand-over message: dropped")
            return
        read = message[_HEADER.size + size:]
        sock = socket.socket(fileno=descriptor)
        protocol = factory.handed((peer[0], peer[1]), counted=transport != "tls") \
            if factory is not None else None
        if protocol is None:  # no such listener here, or the client is over its limit
            sock.close()
            return
        with sock:
            self.reactor.adoptStreamConnection(sock.fileno(), sock.family, _Made(protocol))
        factory.limits.handed_in += 1
        protocol.dataReceived(read)


@implementer(IReadDescriptor)
class _Inbox:
    """A worker's inbox, read by the reactor: one connection per message."""

    BATCH = 16

    def __init__(self, reactor: IReactorFDSet, sock: socket.socket,
                 received: Callable[[bytes, int], None]):
        self.reactor, self.socket, self.received = reactor, sock, received
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.socket.fileno()

    def start(self) -> None:
        self.reactor.addReader(self)

    def close(self) -> None:
        if self.socket.fileno() != -1:
            self.reactor.removeReader(self)
            self.socket.close()

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def logPrefix(self) -> str:
        return "HandOffInbox"

    def doRead(self) -> None:
        for _ in range(self.BATCH):
            try:
                message, fds, flags, _ = socket.recv_fds(self.socket, MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.error("hand-over inbox: {err}", err=err)
                return
            if not fds:
                continue
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)
                continue
            try:
                self.received(message, fds[0])
            except Exception:
                log.failure("a handed-over connection failed")
