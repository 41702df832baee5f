"""HTTP on a TURN port: the connections a client listener finds to be HTTP, passed on to the
tokens API's loopback listener with a PROXY protocol header naming the client.

The API lives in one process (the parent of workers: its key-failure limit, `/metrics` of
every worker, `/readyz`), while the TURN ports are served by every worker; so a worker that
finds an HTTP request on its TURN port (relay.proto.demux, in `ClientStreamProtocol`) does not
answer it itself but splices the connection, TLS already taken off, to the API's listener for
the shared ports (`relay.service.build.SHARED_API`), which believes PROXY headers from loopback
only.  A single-process relay does the same through its own loopback listener: one path.

Flow control runs both ways: each side is the other's producer, so a slow client pauses the
API's socket and a slow API the client's.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

from twisted.internet.interfaces import IAddress, IReactorTCP
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.net.listeners import producer_of
from relay.proto.proxy_protocol import encode_v2

Address = Tuple[str, int]
log = Logger(namespace="turnrelay")


class _ApiSide(Protocol):
    """The loopback connection to the API listener."""

    def __init__(self, client: "ForwardedHttp"):
        self.client = client

    def connectionMade(self) -> None:
        client = self.client
        peer, host = client.transport.getPeer(), client.transport.getHost()
        self.transport.write(encode_v2((peer.host, peer.port), (host.host, host.port))
                             + client.pending)
        client.pending = b""
        client.api = self
        self.transport.registerProducer(producer_of(client.transport), True)
        client.transport.registerProducer(self.transport, True)
        producer_of(client.transport).resumeProducing()
        if client.ended:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.client.api = None
        self.client.transport.loseConnection()


class _ApiConnector(ClientFactory):
    noisy = False

    def __init__(self, client: "ForwardedHttp"):
        self.client = client

    def buildProtocol(self, addr: IAddress) -> Protocol:
        return _ApiSide(self.client)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        log.error("HTTP on a TURN port: the tokens API listener does not answer: {err}",
                  err=reason.getErrorMessage())
        self.client.transport.abortConnection()


class ForwardedHttp(Protocol):
    """A client's HTTP connection, spliced to the API listener."""

    api: Optional[_ApiSide] = None
    pending = b""  # what the client sent before the API connection was up
    ended = False

    def __init__(self, reactor: IReactorTCP, target: Address):
        self.reactor, self.target = reactor, target

    def connectionMade(self) -> None:
        producer_of(self.transport).pauseProducing()  # until the API side is connected
        self.reactor.connectTCP(self.target[0], self.target[1], _ApiConnector(self), timeout=10)

    def dataReceived(self, data: bytes) -> None:
        if self.api is not None:
            self.api.transport.write(data)
        else:
            self.pending += data

    def connectionLost(self, reason: Failure = None) -> None:
        self.ended = True
        if self.api is not None:
            self.api.transport.loseConnection()


class HttpForwarder(Factory):
    """The `http` factory of a client listener whose port the tokens API shares: `target`
    says where the API's loopback listener is (known once it listens, or the parent said)."""

    noisy = False

    def __init__(self, reactor: IReactorTCP, target: Callable[[], Address]):
        self.reactor, self.target = reactor, target

    def buildProtocol(self, addr: IAddress) -> Protocol:
        protocol = ForwardedHttp(self.reactor, self.target())
        protocol.factory = self
        return protocol
