"""The long-running parts of a relay process: its listeners, its HTTP ports, its orderly stop
(drain, then close) and its SIGHUP reloads."""
from __future__ import annotations

import gc
import signal
import socket
from typing import Callable, Dict, List, Optional, Tuple

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site

from relay.core.peers import OwnEndpoints
from relay.core.server import TurnServer
from relay.net.dataplane import DataPlaneError
from relay.net.dtls import DtlsListener
from relay.net.handoff import HandOff
from relay.net.listeners import (
    Address,
    ClientDatagramProtocol,
    ClientStreamFactory,
    LoginDispatcher,
    StreamLimits,
    adopt_datagram_socket,
    bound_socket,
)
from relay.net.native import NativeListener, NativeUdp
from relay.net.proxy_protocol import ProxyTrust
from relay.net.tls import ServerDTLS, ServerTLS
from relay.service.options import Options

log = Logger(namespace="turnrelay")


def adopt_stream_socket(reactor, sock: socket.socket, factory: Factory) -> IListeningPort:
    """Listen on a bound stream socket through the reactor, which keeps its own copy."""
    sock.listen(1024)
    try:
        port = reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
        sock.setblocking(False)  # as adopt_datagram_socket: PyPy's fromfd made it blocking
        return port
    finally:
        sock.close()


# A client listener's sockets by transport ("udp", "tcp", "tls"): one per process serving it.
class ListenersService(Service):
    """Serves the client listeners; `sockets` binds them (or hands over those a worker
    inherited), called before the reactor runs and before privileges drop.  In a worker
    process, `hand_off` passes connections to and takes them from the other workers."""

    def __init__(self, reactor, server: TurnServer, dispatch: LoginDispatcher, options: Options,
                 tls: Optional[ServerTLS], sockets: Callable[[], List[Tuple[str, socket.socket]]],
                 http: Optional[Factory] = None, dtls: Optional[ServerDTLS] = None,
                 hand_off: Optional[HandOff] = None):
        self.reactor = reactor
        self.dtls = dtls
        self.hand_off = hand_off
        # The tokens API's `http` factory, for the transports whose ports it shares.
        self.http = {transport: http for transport in ("tcp", "tls")
                     if options[f"api-on-{transport}-port"]}
        self.server = server
        self.dispatch = dispatch
        self.tls = tls
        self.sockets = sockets
        self.proxy: Optional[ProxyTrust] = options["proxy-trust"]
        self.stream_limits = StreamLimits(options["source-connection-quota"],
                                          options["tls-handshake-timeout"],
                                          options["connection-idle-timeout"])
        self.ports: List[object] = []
        self.bound: List[Tuple[str, str, int]] = []  # transport, host, port
        # --dataplane native: made with the first UDP listener, in the process that serves it.
        self.native_dataplane = options["dataplane"] == "native"
        self.native: Optional[NativeUdp] = None

    def privilegedStartService(self) -> None:
        sockets = self.sockets()
        # UDP listeners whose datagrams the kernel steers (relay.net.steering): STUN requests
        # to the reactor's socket, ChannelData and Send indications to the data plane's.
        steered: Dict[Address, Optional[ClientDatagramProtocol]] = {
            sock.getsockname()[:2]: None for transport, sock in sockets if transport == "udp-data"}
        for transport, sock in sockets:
            self._listen(transport, sock, steered)
        if self.hand_off is not None:
            self.hand_off.start()
        Service.privilegedStartService(self)

    def _listen(self, transport: str, sock: socket.socket,
                steered: Dict[Address, Optional[ClientDatagramProtocol]]) -> None:
        listener = sock.getsockname()[:2]
        if transport == "udp-data":  # the data plane's half of a steered "udp" listener
            protocol = ClientDatagramProtocol(self.server, self.dispatch, listener)
            native = self._listen_native(sock, protocol) if self.native_dataplane else None
            control = steered[listener]
            if native is not None and control is not None:
                control.catch_up = native.catch_up
            self.ports.append(native or adopt_datagram_socket(self.reactor, sock, protocol))
            return
        self.bound.append((transport, listener[0], listener[1]))
        self.server.config.policy.own.add(*listener)
        if transport == "udp":
            protocol = ClientDatagramProtocol(self.server, self.dispatch, listener)
            native = None
            if listener in steered:
                steered[listener] = protocol  # its "udp-data" half follows
            elif self.native_dataplane:
                native = self._listen_native(sock, protocol)
            self.ports.append(native or adopt_datagram_socket(self.reactor, sock, protocol))
        elif transport == "dtls":
            assert self.dtls is not None
            protocol = DtlsListener(self.server, self.dispatch, listener, self.dtls,
                                    self.stream_limits, self.reactor)
            self.ports.append(adopt_datagram_socket(self.reactor, sock, protocol))
        else:
            factory = ClientStreamFactory(self.server, self.dispatch, transport, listener,
                                          self.stream_limits, self.http.get(transport),
                                          self.hand_off)
            if self.hand_off is not None:
                self.hand_off.listen(factory)
            if transport == "tls":
                factory = TLSMemoryBIOFactory(self.tls, False, factory)
            if self.proxy is not None:  # the header comes first, before any TLS
                factory = self.proxy.wrap(factory)
            self.ports.append(adopt_stream_socket(self.reactor, sock, factory))
        log.debug("listening on {transport} [{host}]:{port}", transport=transport, host=listener[0],
                 port=listener[1])

    def _listen_native(self, sock: socket.socket,
                       protocol: ClientDatagramProtocol) -> Optional[NativeListener]:
        """The UDP listener served by the native data plane, or None where it refuses it (it
        reads 64 listeners at most): the reactor then serves that one, as the Python data plane
        would, and the log says so."""
        try:
            if self.native is None:
                self.native = NativeUdp(self.reactor, self.server)
            return self.native.listen(sock, protocol)
        except (DataPlaneError, MemoryError) as err:
            log.warn("the native data plane refused UDP listener [{host}]:{port} ({err}): the "
                     "reactor serves it", host=protocol.listener[0], port=protocol.listener[1],
                     err=err)
            return None

    def dataplane_stats(self) -> Dict[str, int]:
        """The native data plane's counters, for the metrics; none without one."""
        return self.native.plane.stats() if self.native is not None else {}

    def stopService(self) -> None:
        Service.stopService(self)
        self.server.shutdown()
        for port in self.ports:
            port.stopListening()
        self.ports = []
        if self.hand_off is not None:
            self.hand_off.stop()


class BannerService(Service):
    """Logs the start banner (relay.service.banner) once the services before it have
    started: a single relay process's whole start at the default --log-level."""

    def __init__(self, text: Callable[[], str]):
        self.text = text

    def startService(self) -> None:
        Service.startService(self)
        log.info("{banner}", banner=self.text())


class HTTPService(Service):
    """An HTTP listener (tokens API, metrics), bound like the client listeners: before
    privileges drop."""

    def __init__(self, reactor, site: Site, host: str, port: int, tls: Optional[ServerTLS],
                 what: str, flags: str, own: OwnEndpoints, proxy: Optional[ProxyTrust] = None):
        self.reactor = reactor
        self.own = own
        self.factory = site if tls is None else TLSMemoryBIOFactory(tls, False, site)
        if proxy is not None:
            self.factory = proxy.wrap(self.factory)
        self.host, self.port, self.scheme = host, port, "http" if tls is None else "https"
        self.what, self.flags = what, flags
        self.listening: Optional[IListeningPort] = None

    def privilegedStartService(self) -> None:
        try:
            sock = bound_socket(self.host, self.port, socket.SOCK_STREAM)
        except OSError as err:
            raise SystemExit(f"turnrelay: {self.flags}: cannot listen on "
                             f"[{self.host}]:{self.port}: {err.strerror}")
        port = self.port = sock.getsockname()[1]  # the one the kernel chose, for port 0
        self.own.add(self.host, port)
        self.listening = adopt_stream_socket(self.reactor, sock, self.factory)
        log.debug("{what} listening on {scheme} [{host}]:{port}", what=self.what,
                 scheme=self.scheme, host=self.host, port=port)
        Service.privilegedStartService(self)

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def stopService(self) -> Optional[Deferred]:
        Service.stopService(self)
        return self.listening.stopListening()


def freeze_start_up() -> None:
    """Put what start-up made (modules, the relay's tables) beyond CPython's cyclic collector.

    They live as long as the process, yet each full collection walked them all: 30-90 ms every
    few seconds under steady Allocates, in which the reactor served nothing.  Frozen, a full
    collection walks only what came since (3-8 ms).  Start-up's garbage is collected first,
    so that none is kept for good.  PyPy's collector, incremental, has no `freeze`.
    """
    gc.collect()
    if hasattr(gc, "freeze"):
        gc.freeze()


class OrderlyStop(MultiService):
    """A root service that SIGTERM (and SIGINT) stops in order, exiting 0 where twistd's own
    handlers would have the process end by the signal: the first signal stops the reactor,
    which stops this service (twistd waits for the Deferred its `stopService` returns); a
    second one asks it to `hurry`."""

    def __init__(self, reactor):
        super().__init__()
        self.reactor = reactor
        self.stopping = False

    def startService(self) -> None:
        # At once, and again once the reactor runs, replacing its own handlers installed as
        # it starts.  twistd starts the services before the reactor, and a single process
        # prints its start banner then: a SIGINT sent on seeing it (or any Ctrl-C) would
        # otherwise raise KeyboardInterrupt inside the reactor's start-up, which Twisted
        # logs and goes on from, the signal lost and the relay left running.
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._signalled)
            self.reactor.callWhenRunning(signal.signal, number, self._signalled)
        super().startService()
        freeze_start_up()

    def _signalled(self, number: int, frame: object) -> None:
        self.reactor.callFromThread(self._stop, signal.Signals(number).name)

    def _stop(self, name: str) -> None:
        if not self.stopping:
            try:
                self.reactor.stop()
            except ReactorNotRunning:
                pass  # stopping already: the first signal was handled in this same turn
            else:
                log.info("{signal}: shutting down", signal=name)
                return
        self.hurry(f"{name} again")

    def stopService(self) -> Optional[Deferred]:
        self.stopping = True
        return super().stopService()

    def hurry(self, reason: str) -> None:
        """The stop signal came again, or (in a worker process) the parent says to end the
        drain for `reason`."""


class RelayService(OrderlyStop):
    """The whole relay; stopping it drains first.

    The core starts draining at once (/readyz answers 503, new Allocates get 300 or 508), while
    the listeners, the timers and the ledger run on: live allocations keep relaying until they
    end or `grace` seconds pass.  Then the children stop as before: the listeners end what is
    left (reason "shutdown") and the ledger writes it all.  A second signal cuts the grace short.
    """

    POLL = 0.25  # seconds between two looks at whether the last allocation has ended

    def __init__(self, server: TurnServer, reactor, grace: float):
        super().__init__(reactor)
        self.server = server
        self.grace = grace
        self.deadline = 0.0
        # A worker process (relay.service.workers) tells its parent once it holds no more
        # allocations, and drains on, redirecting new clients, until the parent says every
        # worker is done (`hurry`): a worker that stopped alone would leave its copy of the
        # listeners to the kernel's hash with nobody reading it.
        self.report_drained: Optional[Callable[[], None]] = None

    def hurry(self, reason: str) -> None:
        log.info("{reason}: ending the drain now", reason=reason)
        # Also before `stopService` has run: in a worker, the parent's word may be read
        # before the worker's own SIGTERM handler has begun the drain.
        self.grace = self.deadline = 0.0

    def stopService(self) -> Deferred:
        self.stopping = True
        server, clock = self.server, self.reactor
        server.drain()
        log.info("draining: new allocations refused, {open} open ones may run {grace} s more",
                 open=len(server.allocations), grace=self.grace)
        self.deadline = clock.seconds() + self.grace
        drained: Deferred = Deferred()

        def look() -> None:
            over = clock.seconds() >= self.deadline
            if not server.allocations and self.report_drained is not None and not over:
                self.report_drained()
                self.report_drained = lambda: None  # once: the parent answers with `hurry`
            elif not server.allocations:
                log.info("drained: no allocation left")
                drained.callback(None)
                return
            elif over:
                log.info("drain grace over: ending {open} allocations", open=len(server.allocations))
                drained.callback(None)
                return
            clock.callLater(self.POLL, look)
        look()
        drained.addCallback(lambda _: MultiService.stopService(self))
        return drained


class SighupService(Service):
    """SIGHUP re-reads what can change without a restart; a failed reload keeps the old.
    `forward` passes the signal on (to the worker processes, which reload their own)."""

    def __init__(self, reactor, reloads: List[Tuple[str, Callable[[], None]]],
                 forward: Callable[[], None] = lambda: None):
        self.reactor = reactor
        self.reloads = reloads
        self.forward = forward

    def startService(self) -> None:
        Service.startService(self)
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    def reload(self) -> None:
        for what, reload in self.reloads:
            try:
                reload()
                log.info("{what} reloaded", what=what)
            except Exception as err:
                log.error("{what} reload failed, keeping the old: {err}", what=what, err=err)
        self.forward()


