"""`--workers N`: one relay served by N processes, for N cores.

The parent binds every client listener N times with SO_REUSEPORT, so the kernel spreads
clients over the copies by their address and port and keeps each flow on one; it hands copy i
to worker i and keeps its own reference.  A worker that dies is restarted with the same
sockets: what reached its copy meanwhile waits in that socket's queue and no other worker's
flows move.  Each worker is the single-process relay (`relay.service.build.relay_service` with a
`WorkerRole`): its own core, ledger writer and slice of the relay ports, so a peer's packets
reach the worker holding the allocation.

The parent keeps what is one per relay: the quotas that span workers (relay.service.quota_book),
the nonce keys (any worker accepts any worker's nonces), the tokens API, `/metrics` (every
worker's, each sample labelled `worker`) and `/readyz`.  It passes SIGTERM and SIGHUP on.

A worker writes its log lines to the relay's log stream itself when twistd logs to one (`-n`,
`--logfile=-`, as containers run it: the same text, one write per event); to a `--logfile`
file or another observer, the parent writes them, read from the worker's standard output.
Passed on by the parent, the two lines of an Allocate+Refresh(0) cycle cost the relay about
100 us of CPU (590 against 500 us a cycle, the default two workers on two cores).

Parent and worker talk AMP over a socket pair (descriptor 3 in the worker); the listeners
follow from descriptor 4, in the order the TURNRELAY_LISTENERS environment variable names their
transports; after them the memory in which every worker marks its live relayed addresses
(relay.core.peers.LiveRelays), so that two allocations on different workers may relay to each
other, and the one in which they count TCP/TLS connections per client address
(relay.net.source_counts); then the worker's own inbox for connections other workers hand it,
and every worker's inbox to hand them to, by index (relay.net.handoff: a ConnectionBind
reaching a worker that did not issue its CONNECTION-ID). The parent keeps the inboxes too, so a
restarted worker finds its own.
"""
from __future__ import annotations

import itertools
import mmap
import os
import signal
import site
import socket
import sys
import tempfile
import zlib
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import (
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
    ReactorNotRunning,
)
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, globalLogBeginner
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relay.core.peers import LiveRelays
from relay.net import source_counts
from relay.net.handoff import inbox_pair
from relay.net.source_counts import SourceCounts
from relay.service import first_run, logtext
from relay.service.banner import banner
from relay.service.build import (
    ListenerSockets,
    WorkerRole,
    announced,
    api_tls_context,
    bind_listeners,
    client_dtls_context,
    client_tls_context,
    http_services,
    ledger_to_read,
    migrate_schemas,
    nonce_secrets,
    peer_policy,
    relay_addresses,
    relay_port_slice,
    relay_service,
    reload_peer_rules,
    shared_api_endpoint,
    usage_backends,
    watch_certificates,
)
from relay.service.first_run import FirstRun
from relay.service.loglevel import filtered
from relay.service.logtext import BatchedFile, LineBatch, classic_line, emit_line, event_text
from relay.service.options import Options
from relay.service.quota_book import GRANTED, Place, QuotaBook
from relay.service.runtime import PYPY_GC
from relay.service.services import HTTPService, OrderlyStop, RelayService, SighupService
from relay.web.metrics import CONTENT_TYPE

log = Logger(namespace="turnrelay")
CONTROL_FD = 3
QUICK_DEATH = 10.0   # seconds: a worker that dies sooner is restarted after a longer wait
LONGEST_WAIT = 30.0  # seconds between two restarts of a worker that keeps dying
SCRAPE_TIMEOUT = 5.0
STOP_MARGIN = 30.0  # seconds a stopping worker has after its drain grace, for its last writes
GIVE_UP = 5  # quick deaths in a row after which /healthz says the relay is not alive
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE_IN_FLIGHT = 0.25  # seconds a refused reservation waits for a release to arrive


def worker_line(index: int, line: str) -> str:
    """A worker's log line as the relay's log shows it, whether the parent passes it on or the
    worker writes it to the shared stream itself."""
    return f"[worker {index}] {line}"


# -- what parent and worker say to each other ---------------------------------------------

class Hello(amp.Command):
    """Worker to parent, first: what it needs from the parent before it can start: the nonce
    keys, the parent's own endpoints ("HOST PORT"), which no worker may relay to, and the one
    of them HTTP found on the TURN ports goes to ("" without --api-on-tls/tcp-port)."""
    response = [(b"secrets", amp.ListOf(amp.String())), (b"endpoints", amp.ListOf(amp.Unicode())),
                (b"api", amp.Unicode())]


class Ready(amp.Command):
    """Worker to parent: listening and taking allocations."""
    requiresAnswer = False


class Drained(amp.Command):
    """Worker to parent, while stopping: it holds no allocation any more."""
    requiresAnswer = False


class EndDrain(amp.Command):
    """Parent to worker, while stopping: end the drain now, for `reason` (the stop signal came
    to the parent again, or every worker has drained).  Not a second SIGTERM: one that
    reaches a worker before its handler has run for the first is merged with it, and the
    worker would drain for its whole grace."""
    arguments = [(b"reason", amp.Unicode())]
    requiresAnswer = False


class ReservePlace(amp.Command):
    """Worker to parent: a place in the quotas for a new allocation (relay.service.quota_book)."""
    arguments = [(b"reservation", amp.Integer()), (b"username", amp.Unicode()),
                 (b"account", amp.Unicode()), (b"source", amp.Unicode()),
                 (b"max_allocations", amp.Integer())]
    response = [(b"code", amp.Integer())]


class ReleasePlace(amp.Command):
    arguments = [(b"reservation", amp.Integer())]
    requiresAnswer = False


class AccountShare(amp.Command):
    """Parent to worker: its part of an account's rate limits (`TurnServer.set_account_share`)."""
    arguments = [(b"account", amp.Unicode()), (b"share", amp.Float())]
    requiresAnswer = False


class QuotaReached(amp.Command):
    """Worker to parent: the accounts it now finds over their monthly quota."""
    arguments = [(b"accounts", amp.ListOf(amp.Unicode()))]
    requiresAnswer = False


class QuotaElsewhere(amp.Command):
    """Parent to worker: the accounts some worker finds over their monthly quota."""
    arguments = [(b"accounts", amp.ListOf(amp.Unicode()))]
    requiresAnswer = False


class Scrape(amp.Command):
    """Parent to worker: its metrics, compressed (an AMP value holds at most 64 KiB)."""
    response = [(b"metrics", amp.String())]


class _Control(amp.AMP):
    """AMP without its lines at each connection and disconnection: a worker's start and end
    are logged already."""

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)


# -- the parent -------------------------------------------------------------------------------

class _ParentSide(_Control):
    """The parent's end of one worker run's control channel.  `key` tells runs apart, so a
    late message from a dead worker never touches its successor's places."""

    _keys = itertools.count(1)

    def __init__(self, supervisor: "Supervisor", index: int):
        super().__init__()
        self.supervisor, self.index = supervisor, index
        self.key = next(self._keys)
        self.gone = False

    @Hello.responder
    def hello(self) -> dict:
        return {"secrets": self.supervisor.secrets,
                "endpoints": [f"{host} {port}" for host, port in self.supervisor.endpoints()],
                "api": " ".join(map(str, shared_api_endpoint(self.supervisor.https()) or ()))}

    @Ready.responder
    def ready(self) -> dict:
        if not self.gone:
            self.supervisor.worker_ready(self.index)
        return {}

    @Drained.responder
    def drained(self) -> dict:
        if not self.gone:
            self.supervisor.worker_drained(self.index)
        return {}

    @ReservePlace.responder
    def reserve(self, reservation: int, username: str, account: str, source: str,
                max_allocations: int):
        def look() -> dict:
            if self.gone:  # died while its request waited: a place now would never be freed
                return {"code": 508}
            code = self.supervisor.book.reserve(self.key, reservation,
                                                Place(username, account, source), max_allocations)
            if code == GRANTED:
                self.supervisor.share_limits({account})
            return {"code": code}
        answer = look()
        if answer["code"] == GRANTED:
            return answer
        # A place another worker has just released may still be on its way here (a client
        # deleting one allocation and making another from a new port, as ICE restarts do):
        # look again a moment later before refusing.
        return deferLater(self.supervisor.reactor, RELEASE_IN_FLIGHT, look)

    @QuotaReached.responder
    def quota_reached(self, accounts: List[str]) -> dict:
        if not self.gone:
            self.supervisor.quota_reached(self.key, set(accounts))
        return {}

    @ReleasePlace.responder
    def release(self, reservation: int) -> dict:
        place = self.supervisor.book.release(self.key, reservation)
        if place is not None:
            self.supervisor.share_limits({place.account})
        return {}

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        # Nothing more can come from this worker: its allocations are gone with it.
        self.gone = True
        self.supervisor.share_limits(self.supervisor.book.forget(self.key))
        self.supervisor.quota_reached(self.key, set())


class _WorkerProcess(ProcessProtocol):
    """One run of worker `index`: its log lines become the parent's, its end is reported."""

    LONGEST_LINE = 65536  # bytes: a longer one is cut, rather than held in memory whole

    def __init__(self, supervisor: "Supervisor", index: int, control: _ParentSide):
        self.supervisor, self.index, self.control = supervisor, index, control
        self.started = supervisor.reactor.seconds()
        self.pid: Optional[int] = None
        self.ready = False          # listening and taking allocations
        self.drained = False        # stopping, and holding no allocation any more
        self.reload_missed = False  # a SIGHUP came before it was ready
        self.pending = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # kept: the transport forgets it when the process ends

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, rest = (self.pending[fd] + data).split(b"\n")
        if len(rest) > self.LONGEST_LINE:
            lines.append(rest)
            rest = b""
        self.pending[fd] = rest
        for line in lines:
            self._emit(fd, line.decode("utf-8", "replace"))

    def _emit(self, fd: int, line: str) -> None:
        level = LogLevel.error  # standard error: what the interpreter itself printed
        if fd == 1:
            name, _, rest = line.partition(" ")
            try:
                level, line = LogLevel.levelWithName(name), rest
            except InvalidLogLevelError:
                level = LogLevel.info
        # Pre-formatted (relay.service.logtext writes it as it is), the same text as before.
        emit_line(log, level, worker_line(self.index, line))

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self.pending.items():
            if rest:
                self._emit(fd, rest.decode("utf-8", "replace"))
        self.supervisor.worker_ended(self, reason)


def _how_it_ended(ended: ProcessTerminated) -> str:
    if ended.signal is not None:
        try:
            return f"killed by {signal.Signals(ended.signal).name}"
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {ended.signal}"
    return f"exit code {ended.exitCode}"


class Supervisor(OrderlyStop):
    """Starts the workers, restarts those that die, and stops them all on SIGTERM."""

    def __init__(self, reactor, options: Options, secrets: List[bytes], book: QuotaBook):
        super().__init__(reactor)
        self.options, self.secrets, self.book = options, secrets, book
        self.count: int = options["workers"]
        # twistd changes to --rundir after this is made: workers start where the relay did, so
        # relative paths in the arguments they parse again mean the same files.
        self.workdir = os.getcwd()
        self.sockets: ListenerSockets = []
        self.inboxes: List[Tuple[socket.socket, socket.socket]] = []  # (send end, read end)
        self.reached: Dict[int, Set[str]] = {}  # worker run -> accounts it finds over quota
        self.processes: Dict[int, _WorkerProcess] = {}
        self.quick_deaths = [0] * self.count
        self.all_ended: Optional[Deferred] = None
        self.banner: Callable[[], str] = lambda: ""  # set by `supervisor`
        self.announced = False  # the banner logged, at the first time all are ready
        self.drain_over = False  # every worker drained, and told to stop
        # The workers' live relayed addresses: a file no other process can open (unlinked),
        # mapped by the parent and by each worker, which gets its descriptor.
        self.live_file = tempfile.TemporaryFile()
        self.live_file.truncate(LiveRelays.SIZE)
        self.live = mmap.mmap(self.live_file.fileno(), LiveRelays.SIZE)
        # And their TCP/TLS connections per client address (relay.net.source_counts).
        self.sources_file = tempfile.TemporaryFile()
        self.sources_file.truncate(source_counts.size(self.count))
        self.sources = mmap.mmap(self.sources_file.fileno(), source_counts.size(self.count))

    def privilegedStartService(self) -> None:
        self.sockets = bind_listeners(self.options, self.count)
        self.inboxes = [inbox_pair() for _ in range(self.count)]
        for transport, socks in self.sockets:
            host, port = socks[0].getsockname()[:2]
            log.debug("listening on {transport} [{host}]:{port} for {count} workers",
                     transport=transport, host=host, port=port, count=self.count)
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        for index in range(self.count):
            self._spawn(index)

    def https(self) -> List[HTTPService]:
        return [service for service in self if isinstance(service, HTTPService)]

    def endpoints(self) -> List[Tuple[str, int]]:
        """The parent's own HTTP listeners, which no worker may relay to."""
        return [(service.host, service.port) for service in self.https()]

    def _spawn(self, index: int) -> None:
        if self.stopping:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        control = _ParentSide(self, index)
        process = _WorkerProcess(self, index, control)
        # Standard output: the relay's log stream when twistd logs to one (`_to_stream`).
        stream = logtext.shared_stream
        fds = {0: "w", 1: "r" if stream is None else stream, 2: "r", CONTROL_FD: theirs.fileno()}
        for k, (_, socks) in enumerate(self.sockets):
            fds[CONTROL_FD + 1 + k] = socks[index].fileno()
        fds[CONTROL_FD + 1 + len(self.sockets)] = self.live_file.fileno()
        fds[CONTROL_FD + 2 + len(self.sockets)] = self.sources_file.fileno()
        first = CONTROL_FD + 3 + len(self.sockets)
        fds[first] = self.inboxes[index][1].fileno()
        for k, (send, _) in enumerate(self.inboxes):
            fds[first + 1 + k] = send.fileno()
        env = dict(PYPY_GC, **os.environ)  # PyPy's collector: the operator's settings win
        env.update(TURNRELAY_WORKER=f"{index} {self.count}",
                   TURNRELAY_WORKER_LOG="relayed" if stream is None else "stream",
                   TURNRELAY_LISTENERS=" ".join(t for t, _ in self.sockets),
                   PYTHONIOENCODING="utf-8:backslashreplace")
        if PACKAGE_ROOT not in site.getsitepackages():  # a checkout: PYTHONPATH, or the cwd
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                              PACKAGE_ROOT]))
        try:
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                               Factory.forProtocol(lambda: control))
            self.reactor.spawnProcess(process, sys.executable,
                                      [sys.executable, "-m", "relay.service.workers", *self.options.argv],
                                      env=env, path=self.workdir, childFDs=fds)
        except OSError as err:  # out of descriptors or processes, for now
            if control.transport is not None:
                control.transport.loseConnection()
            log.error("worker {index} could not be started: {err}; trying again in {wait} s",
                      index=index, err=err, wait=LONGEST_WAIT)
            self.reactor.callLater(LONGEST_WAIT, self._spawn, index)
            return
        finally:
            ours.close()
            theirs.close()
        self.processes[index] = process
        log.debug("worker {index} started, pid {pid}", index=index, pid=process.pid)

    def ready_count(self) -> int:
        return sum(process.ready for process in self.processes.values())

    def worker_ready(self, index: int) -> None:
        process = self.processes[index]
        process.ready = True
        log.debug("worker {index} (pid {pid}) ready", index=index, pid=process.pid)
        reached = set().union(*self.reached.values())
        if reached:  # what it missed of the monthly quotas while it started
            process.control.callRemote(QuotaElsewhere, accounts=sorted(reached))
        if process.reload_missed:  # SIGHUP came while it started: it may have missed it
            self._signal(process, signal.SIGHUP)
        if self.ready_count() == self.count:
            log.debug("all {count} workers ready", count=self.count)
            if not self.announced:
                self.announced = True
                log.info("{banner}", banner=self.banner())

    def worker_ended(self, process: _WorkerProcess, reason: Failure) -> None:
        index = process.index
        del self.processes[index]
        # Its allocations died with it: their ports are no peers any more.
        LiveRelays((), {}, self.live).clear(*relay_port_slice(
            self.options["min-port"], self.options["max-port"], index, self.count))
        SourceCounts.clear(self.sources, index)  # and its connections
        how = _how_it_ended(reason.value)
        if self.stopping:
            # Its listener copies leave the port group, so the kernel gives new clients to the
            # workers still draining (which redirect them) instead of queueing them on a
            # socket nobody will accept from again.
            for _, socks in self.sockets:
                socks[index].close()
            self._end_drain_if_done()
            if reason.check(ProcessDone):
                log.info("worker {index} stopped", index=index)
            elif not process.ready and getattr(reason.value, "signal", None) == signal.SIGTERM:
                # Stopped while it started, before its own handler was in place: as asked.
                log.info("worker {index} stopped while starting", index=index)
            else:
                log.error("worker {index} (pid {pid}) stopped: {how}", index=index,
                          pid=process.pid, how=how)
            if not self.processes and self.all_ended is not None:
                self.all_ended.callback(None)
            return
        lived = self.reactor.seconds() - process.started
        self.quick_deaths[index] = self.quick_deaths[index] + 1 if lived < QUICK_DEATH else 0
        wait = min(LONGEST_WAIT, 0.25 * 2 ** self.quick_deaths[index])
        log.error("worker {index} (pid {pid}) died after {lived:.1f} s: {how}; restarting it in "
                  "{wait} s", index=index, pid=process.pid, lived=lived, how=how, wait=wait)
        self.reactor.callLater(wait, self._spawn, index)

    def quota_reached(self, run: int, accounts: Set[str]) -> None:
        """A worker's monthly-quota verdict changed: every worker hears the union."""
        before = set().union(*self.reached.values())
        if accounts:
            self.reached[run] = accounts
        else:
            self.reached.pop(run, None)
        now = set().union(*self.reached.values())
        if now != before:
            for process in self.processes.values():
                process.control.callRemote(QuotaElsewhere, accounts=sorted(now))

    def share_limits(self, accounts: Set[str]) -> None:
        """Tell every worker its part of these accounts' --account-max-bps/pps, which follow
        where the accounts' allocations are (relay.service.quota_book), when there are such limits."""
        if not (self.options["account-max-bps"] or self.options["account-max-pps"]):
            return
        for account in accounts:
            for process in self.processes.values():
                process.control.callRemote(AccountShare, account=account,
                                           share=self.book.share(account, process.control.key))

    @staticmethod
    def _signal(process: _WorkerProcess, number: int) -> None:
        try:
            process.transport.signalProcess(number)
        except (OSError, ProcessExitedAlready):
            pass  # ended meanwhile: processEnded is on its way

    def signal_workers(self, number: int) -> None:
        for process in list(self.processes.values()):
            self._signal(process, number)

    def reload_workers(self) -> None:
        """SIGHUP to the ready workers; one still starting gets it once ready, not before:
        until its own handler is in place, SIGHUP would end it."""
        for process in list(self.processes.values()):
            if process.ready:
                self._signal(process, signal.SIGHUP)
            else:
                process.reload_missed = True

    def not_ready(self) -> Optional[str]:
        if self.stopping:
            return "draining"
        missing = self.count - self.ready_count()
        return f"{missing} of {self.count} workers not ready" if missing else None

    def not_live(self) -> Optional[str]:
        """A worker that keeps dying at start will not get better by itself."""
        dying = [index for index, deaths in enumerate(self.quick_deaths) if deaths >= GIVE_UP]
        return f"worker {dying[0]} keeps dying at start" if dying else None

    def hurry(self, reason: str) -> None:
        log.info("{reason}: the workers end their drain now", reason=reason)
        self._end_drains(reason)

    def _end_drains(self, reason: str) -> None:
        for process in list(self.processes.values()):
            if not process.control.gone:
                process.control.callRemote(EndDrain, reason=reason)

    def worker_drained(self, index: int) -> None:
        process = self.processes.get(index)
        if process is not None:
            process.drained = True
            self._end_drain_if_done()

    def _end_drain_if_done(self) -> None:
        """The workers drain together: those without allocations wait, still listening and
        redirecting, until none is left (`RelayService.report_drained`), then all stop."""
        if self.stopping and not self.drain_over and self.processes \
                and all(process.drained for process in self.processes.values()):
            # Once: a worker that ends first must not have the others told again.
            self.drain_over = True
            log.info("every worker drained: stopping them")
            self._end_drains("every worker drained")

    def stopService(self) -> Deferred:
        self.stopping = True
        self.all_ended = Deferred()
        if not self.processes:
            self.all_ended.callback(None)
        self.signal_workers(signal.SIGTERM)
        # A worker that does not end after its drain and its ledger's last writes is stuck.
        deadline = self.reactor.callLater(self.options["drain-grace"] + STOP_MARGIN, self._kill)
        self.all_ended.addCallback(lambda _: deadline.active() and deadline.cancel())
        self.all_ended.addCallback(lambda _: super(Supervisor, self).stopService())
        return self.all_ended

    def _kill(self) -> None:
        for index, process in list(self.processes.items()):
            log.error("worker {index} (pid {pid}) did not stop within --drain-grace and "
                      "{margin} s: killing it", index=index, pid=process.pid, margin=STOP_MARGIN)
            self._signal(process, signal.SIGKILL)


class WorkersMetrics(Resource):
    """`/metrics` of the parent: each ready worker's, scraped at once, every sample labelled
    with its worker, in one exposition (per-worker figures add up in a PromQL `sum`), and
    `turnrelay_worker_up` saying which answered."""

    isLeaf = True

    def __init__(self, supervisor: Supervisor):
        super().__init__()
        self.supervisor = supervisor

    def render_GET(self, request: Request):
        supervisor = self.supervisor
        indices = list(range(supervisor.count))
        scrapes = []
        for index in indices:
            process = supervisor.processes.get(index)
            if process is None or not process.ready:
                scrapes.append(succeed(None))  # nothing to ask: down
                continue
            scrape = process.control.callRemote(Scrape).addCallback(
                lambda answer: zlib.decompress(answer["metrics"]).decode())
            timer = supervisor.reactor.callLater(SCRAPE_TIMEOUT, scrape.cancel)
            scrape.addBoth(lambda result, timer=timer: (timer.active() and timer.cancel(),
                                                        result)[1])
            scrapes.append(scrape)

        def answer(results: list) -> None:
            texts = {}
            for index, (ok, result) in zip(indices, results):
                if not ok:
                    log.warn("worker {index} did not answer a metrics scrape: {why}",
                             index=index, why=result.getErrorMessage())
                elif result is not None:
                    texts[index] = result
            request.setHeader(b"content-type", CONTENT_TYPE.encode())
            request.setHeader(b"cache-control", b"no-store")
            request.write(_labelled(texts, indices))
            request.finish()
        DeferredList(scrapes, consumeErrors=True).addCallback(answer)
        return NOT_DONE_YET


def _labelled(texts: Dict[int, str], workers: List[int]) -> bytes:
    """One exposition of the workers' that answered, each sample labelled `worker`."""
    families: Dict[str, Metric] = {}
    for index, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, family)
            labelled = [s._replace(labels={**s.labels, "worker": str(index)})
                        for s in family.samples]
            if merged is family:
                family.samples = labelled
            else:
                merged.samples.extend(labelled)
    answered = GaugeMetricFamily("turnrelay_worker_up", "1 if the worker process answered this "
                                 "scrape, 0 if not", labels=["worker"])
    for index in workers:
        answered.add_metric([str(index)], 1 if index in texts else 0)

    class Gathered:
        def collect(self):
            return [answered, *families.values()]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Gathered())
    return generate_latest(registry)


def supervisor(options: Options, reactor, first: Optional[FirstRun] = None) -> Supervisor:
    """The parent of `options["workers"]` worker processes."""
    # Checked here, once, so a bad setting stops the relay rather than every worker in a loop;
    # the self-signed certificate, when needed, is made before the workers look for it.
    relay_ips, external_ips = relay_addresses(options)
    client_tls_context(options)
    secrets = nonce_secrets(options)
    client_dtls_context(options, secrets)
    api_tls = api_tls_context(options)
    backends = usage_backends(options)
    migrate_schemas(options, backends)
    ledger_sql = ledger_to_read(options, backends)
    policy = peer_policy(options, relay_ips, external_ips)
    service = Supervisor(reactor, options, secrets,
                         QuotaBook(options["total-quota"], options["user-quota"],
                                   options["source-quota"]))
    http_services(reactor, options, relay_ips, ledger_sql, policy, WorkersMetrics(service),
                  service.not_ready, api_tls, service, service.not_live)
    service.banner = lambda: banner(
        options, service.count, [(transport, *socks[0].getsockname()[:2])
                                 for transport, socks in service.sockets
                                 if transport != "udp-data"],  # a "udp" listener's other half
        relay_ips, external_ips, announced(service.https()), backends, first)
    reloads = watch_certificates([("tokens API TLS certificate", api_tls)], service)
    reloads.append(("peer rules", reload_peer_rules(options, policy.set_rules)))
    SighupService(reactor, reloads, forward=service.reload_workers).setServiceParent(service)
    return service


# -- a worker ---------------------------------------------------------------------------------

class _WorkerSide(_Control):
    service: Optional[RelayService] = None  # set once the worker's relay is made (`main`)

    def __init__(self, reactor):
        super().__init__()
        self.reactor = reactor
        self.reached_elsewhere: Set[str] = set()  # the parent's QuotaElsewhere

    @AccountShare.responder
    def account_share(self, account: str, share: float) -> dict:
        if self.service is not None:
            self.service.server.set_account_share(account, share)
        return {}

    @QuotaElsewhere.responder
    def quota_elsewhere(self, accounts: List[str]) -> dict:
        self.reached_elsewhere.clear()
        self.reached_elsewhere.update(accounts)
        return {}

    @EndDrain.responder
    def end_drain(self, reason: str) -> dict:
        if self.service is not None:
            self.service.hurry(reason)
        return {}

    @Scrape.responder
    def scrape(self) -> dict:
        return {"metrics": zlib.compress(generate_latest(self.service.registry))}

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        # The parent is gone (killed, or it crashed, or it ended the stop it began): stop at
        # once, its usage written, rather than run on unsupervised in the listeners' port
        # group, where a new relay would share the clients with it.
        service = self.service
        if service is not None and service.stopping:
            service.hurry("the parent process is gone")
        else:
            log.warn("the parent process is gone: stopping")
            if service is not None:
                service.grace = 0.0
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # stopping already: the parent's last SIGTERM came first


def _event_lines(event: dict) -> Tuple[LogLevel, List[str]]:
    text = event_text(event)
    if "log_failure" in event:
        text += "\n" + event["log_failure"].getTraceback()
    return event.get("log_level", LogLevel.info), text.splitlines() or [""]


def _to_parent(reactor: Any) -> Callable[[dict], None]:
    """A worker's log for the parent to write, a line per line of text, each starting with its
    level's name: written a reactor iteration at a time (`BatchedFile`)."""
    write = BatchedFile(sys.stdout, reactor).write

    def observe(event: dict) -> None:
        level, lines = _event_lines(event)
        write("".join(f"{level.name} {line}\n" for line in lines))
    return observe


def _to_stream(index: int, reactor: Any) -> Callable[[dict], None]:
    """A worker's log written to the relay's log stream (its standard output, shared with the
    parent) as the parent would write it: the parent's namespace, `[worker N]` before each
    line, a reactor iteration's lines at a time in writes that a pipe keeps whole
    (`LineBatch`)."""
    def write(text: str) -> None:
        data = text.encode("utf-8", "backslashreplace")
        try:
            while data:
                data = data[os.write(1, data):]
        except OSError:
            pass  # a log stream that is gone or full must not end the worker
    batch = LineBatch(write, reactor)

    def observe(event: dict) -> None:
        level, lines = _event_lines(event)
        when = event.get("log_time")
        batch.add("".join(classic_line(when, log.namespace, level, worker_line(index, line))
                          for line in lines))
    return observe


def main() -> None:
    index, count = (int(n) for n in os.environ["TURNRELAY_WORKER"].split())
    transports = os.environ["TURNRELAY_LISTENERS"].split()
    # In its own process group, a terminal's Ctrl-C reaches only the parent, which stops
    # the workers in order; and a reload before its own handler is in place must not end it.
    os.setpgrp()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    options = Options()
    options.parseOptions(sys.argv[1:])
    first_run.apply(options)  # made by the parent: read back
    from twisted.internet import reactor
    to_stream = os.environ.get("TURNRELAY_WORKER_LOG") == "stream"
    observer = _to_stream(index, reactor) if to_stream else _to_parent(reactor)
    globalLogBeginner.beginLoggingTo([filtered(observer, options["log-level"])],
                                     redirectStandardIO=False)
    sockets = [(transport, socket.socket(fileno=CONTROL_FD + 1 + k))
               for k, transport in enumerate(transports)]
    live_fd = CONTROL_FD + 1 + len(transports)
    live = mmap.mmap(live_fd, LiveRelays.SIZE)
    os.close(live_fd)
    sources = mmap.mmap(live_fd + 1, source_counts.size(count))
    os.close(live_fd + 1)
    first = live_fd + 2
    inbox = socket.socket(fileno=first)
    outboxes = [socket.socket(fileno=first + 1 + k) for k in range(count)]
    control = _WorkerSide(reactor)
    reactor.adoptStreamConnection(CONTROL_FD, socket.AF_UNIX, Factory.forProtocol(lambda: control))
    os.close(CONTROL_FD)
    exit_code = []

    def stop(code: int) -> None:
        exit_code.append(code)
        if reactor.running:
            reactor.stop()

    def start(answer: dict) -> None:
        api = answer["api"].split()
        role = WorkerRole(
            index, count, answer["secrets"], sockets,
            reserve=lambda reservation, place, most: control.callRemote(
                ReservePlace, reservation=reservation, username=place.username,
                account=place.account, source=place.source, max_allocations=most,
            ).addCallback(lambda answer: answer["code"]),
            release=lambda reservation: control.callRemote(ReleasePlace, reservation=reservation),
            parent_endpoints=[(host, int(port)) for host, port in
                              (endpoint.split() for endpoint in answer["endpoints"])],
            shared_api=(api[0], int(api[1])) if api else None, live=live, sources=sources,
            inbox=inbox, outboxes=outboxes,
            report_reached=lambda accounts: control.callRemote(QuotaReached,
                                                               accounts=sorted(accounts)),
            reached_elsewhere=control.reached_elsewhere)
        try:
            service = relay_service(options, reactor, role)
            service.privilegedStartService()
            service.startService()
        except SystemExit as err:  # a setting the parent could not check, such as a file
            log.critical("{error}", error=err)
            stop(1)
            return
        control.service = service
        service.report_drained = lambda: control.callRemote(Drained)
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        control.callRemote(Ready)

    def failed(failure: Failure) -> None:
        log.failure("worker start-up failed", failure)
        stop(1)

    reactor.callWhenRunning(
        lambda: control.callRemote(Hello).addCallback(start).addErrback(failed))
    reactor.run()
    sys.exit(exit_code[0] if exit_code else 0)


if __name__ == "__main__":
    main()
