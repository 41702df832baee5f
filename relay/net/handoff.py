"""What one worker process hands another: a stream connection whose ConnectionBind (RFC 6062)
reached the wrong worker, and a reserved relay port (RFC 8656 RESERVATION-TOKEN) asked for by
the worker an Allocate reached.

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

Reserved ports: EVEN-PORT with its R bit holds the next port for a second Allocate, which a
client sends from another port of its own (RTP, then RTCP), so the kernel may give it to
another worker than the one holding the port.  That worker asks the token's issuer for the
port, which sends its socket back the same way (`fetch_reservation`).
"""
from __future__ import annotations

import json
import os
import socket
import struct
from typing import Callable, Dict, List, Optional, Tuple, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.core.client import Client
from relay.core.credentials import StunCredentials
from relay.core.server import Reservation, TurnServer
from relay.net.listeners import Address, ClientStreamFactory, ClientStreamProtocol, RelayPort
from relay.net.stream_relay import splice
from relay.proto import stun

log = Logger(namespace="turnrelay")
# The bytes read before a ConnectionBind's answer: the request and little else (a client
# waits for the answer before it sends data), so a larger buffer is not handed over.
MOST_READ = 65536
_HEADER = struct.Struct("!H")
MESSAGE = MOST_READ + 1024  # the largest message an inbox reads
FETCH_TIMEOUT = 2.0  # seconds an Allocate waits for a reserved port from another worker


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
    """A worker's messages to the other workers' inboxes, and what it does with those sent to
    its own: a connection to carry on (`__call__` there), a reserved relay port asked for
    (`fetch_reservation`), and that port's socket in answer."""

    def __init__(self, reactor, server: TurnServer, index: int, outboxes: List[socket.socket],
                 inbox: socket.socket):
        self.reactor, self.server, self.index = reactor, server, index
        self.outboxes = outboxes  # worker i's inbox at [i]
        for sock in outboxes:
            sock.setblocking(False)
        self.inbox = _Inbox(reactor, inbox, self.received)
        # The stream listeners of this worker, by transport and address (the same in every
        # worker): where a connection handed over continues.
        self.factories: Dict[Tuple[str, Address], ClientStreamFactory] = {}
        # RESERVATION-TOKEN -> the Allocates waiting for its port to arrive from its owner.
        self.fetching: Dict[bytes, List[Deferred]] = {}

    def listen(self, factory: ClientStreamFactory) -> None:
        self.factories[(factory.transport_name, factory.listener)] = factory

    def start(self) -> None:
        self.inbox.start()

    def stop(self) -> None:
        self.inbox.close()

    def _post(self, worker: int, header: list, payload: bytes = b"",
              descriptor: Optional[int] = None) -> bool:
        encoded = json.dumps(header).encode()
        message = _HEADER.pack(len(encoded)) + encoded + payload
        try:
            socket.send_fds(self.outboxes[worker], [message],
                            [] if descriptor is None else [descriptor])
        except OSError as err:
            # A full inbox: that worker is stuck or restarting; the client may retry.
            log.warn("could not send {kind} to worker {worker}: {err}", kind=header[0],
                     worker=worker, err=os.strerror(err.errno) if err.errno else err)
            return False
        return True

    def received(self, message: bytes, descriptors: List[int]) -> None:
        try:
            size, = _HEADER.unpack_from(message)
            header = json.loads(message[_HEADER.size:_HEADER.size + size])
            kind = header[0]
        except (ValueError, struct.error, IndexError, TypeError):
            kind = None
        handle = {"connection": self._take_connection, "reservation?": self._give_reservation,
                  "reservation": self._take_reservation}.get(kind)
        if handle is None:
            for descriptor in descriptors:
                os.close(descriptor)
            log.error("a malformed message in the hand-over inbox: dropped")
            return
        handle(header, message[_HEADER.size + size:], descriptors)

    # -- connections (RFC 6062 ConnectionBind) -------------------------------------------------

    def __call__(self, protocol: ClientStreamProtocol, owner: int, read: bytes) -> None:
        """`ClientStreamFactory.hand_off`: send `protocol`'s connection to worker `owner`."""
        factory = protocol.factory
        if len(read) > MOST_READ:
            protocol.transport.loseConnection()
            return
        header = ["connection", factory.transport_name, list(factory.listener),
                  list(protocol.client.address)]
        if factory.transport_name == "tls":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with ours, theirs:
                if not self._post(owner, header, read, theirs.fileno()):
                    protocol.transport.loseConnection()
                    return
                factory.limits.handed_out += 1
                plain = _PlainSide(protocol)
                protocol.pass_to(_ToOwner(plain))
                self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _Made(plain))
            return
        tcp = _innermost(protocol.transport)
        tcp.stopReading()  # from now on the owner reads it
        if self._post(owner, header, read, tcp.socket.fileno()):
            factory.limits.handed_out += 1
            # Close this process's descriptor only: a shutdown would end the connection
            # the owner now holds (Twisted's documented switch for this).
            tcp._shouldShutdown = False
        protocol.transport.loseConnection()

    def _take_connection(self, header: list, read: bytes, descriptors: List[int]) -> None:
        """A connection from another worker: it continues here as if it had come first."""
        _, transport, listener, peer = header
        factory = self.factories.get((transport, tuple(listener)))
        with socket.socket(fileno=descriptors[0]) as sock:
            protocol = factory.handed((peer[0], peer[1]), counted=transport != "tls") \
                if factory is not None else None
            if protocol is None:  # no such listener here, or the client is over its limit
                return
            self.reactor.adoptStreamConnection(sock.fileno(), sock.family, _Made(protocol))
        factory.limits.handed_in += 1
        protocol.dataReceived(read)

    # -- reserved relay ports (RFC 8656 RESERVATION-TOKEN) -------------------------------------

    def fetch_reservation(self, client: Client, credentials: StunCredentials
                          ) -> Optional[Deferred]:
        """`LoginDispatcher.prepare`: an Allocate whose RESERVATION-TOKEN another worker
        issued waits until that worker has sent the reserved port's socket here (or said it
        has none, or did not answer in time: the core then answers 508 as for any unknown
        token).  The socket moves, so the relay port is served by the worker the client's
        datagrams reach; it lies in the other worker's slice of the ports, which that worker
        skips while it is taken."""
        msg = credentials.message
        token = msg.get(stun.RESERVATION_TOKEN) if msg.method == stun.ALLOCATE else None
        owner = self.server.reservation_owner(token) if token is not None else None
        if owner is None:
            return None
        waiting: Deferred = Deferred()
        waiters = self.fetching.setdefault(token, [])
        waiters.append(waiting)
        if len(waiters) == 1 and not self._post(owner, ["reservation?", token.hex(), self.index]):
            self._arrived(token)
            return waiting
        timer = self.reactor.callLater(FETCH_TIMEOUT, self._arrived, token)
        waiting.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return waiting

    def _give_reservation(self, header: list, _: bytes, descriptors: List[int]) -> None:
        """Another worker asks for a reserved port: its socket, if still reserved here."""
        _, token, asker = header
        reservation = self.server.take_reservation(bytes.fromhex(token), self.reactor.seconds())
        if reservation is None:
            self._post(asker, ["reservation", token, None])
            return
        endpoint = cast(RelayPort, reservation.endpoint)
        left = reservation.expires - self.reactor.seconds()
        self._post(asker, ["reservation", token, left], descriptor=endpoint.fileno())
        endpoint.close()  # this process's descriptor: the socket lives on in the message

    def _take_reservation(self, header: list, _: bytes, descriptors: List[int]) -> None:
        _, token, left = header
        key = bytes.fromhex(token)
        if descriptors:
            sock = socket.socket(fileno=descriptors[0])
            sock.setblocking(False)
            self.server.adopt_reservation(key, Reservation(RelayPort(self.reactor, sock),
                                                           self.reactor.seconds() + left))
        self._arrived(key)

    def _arrived(self, token: bytes) -> None:
        for waiting in self.fetching.pop(token, []):
            waiting.callback(None)


@implementer(IReadDescriptor)
class _Inbox:
    """A worker's inbox, read by the reactor: one connection per message."""

    BATCH = 16

    def __init__(self, reactor: IReactorFDSet, sock: socket.socket,
                 received: Callable[[bytes, List[int]], None]):
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
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)
                continue
            try:
                self.received(message, fds)
            except Exception:
                log.failure("a handed-over connection failed")
