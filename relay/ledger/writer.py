"""The usage ledger: each session's usage, as deltas, written to every configured backend.

The relay counts payload bytes and packets per allocation as plain integer additions
(`relay.core.allocation`).  The ledger reads those counters on its own timer, every `interval`
seconds, and once more when the session ends, and queues the difference since its previous
reading as a `UsageDelta`; the hot path gains nothing, not a call.  It hooks into the core
through the server's seams: `opened_observers`, `closed_observers`, `may_allocate`.

Each backend has its own queue and at most one write in flight.  A record waits up to
`gather` seconds (GATHER) for others to join its batch, unless the batch is full: under a
stream of short sessions that makes a few transactions a second rather than one or two per
session, each a trip to the backend's thread (and on PyPy through cffi into SQLite).  A failed
write stays queued and is tried again with exponential backoff (RETRY_FIRST doubling up to
RETRY_CAP), so a backend's outage blocks neither the relay nor the other backends, and since
every record is keyed, a write retried after a lost answer stores nothing twice.

The queues are bounded.  When the slowest backend holds `limit` records, the ledger says so in
the log, loudly, and: periodic readings wait (the counters keep counting and the next reading
carries it all, so nothing is lost), and a new session is refused with 508 (`refuse`, the
default) or relayed unrecorded (`drop`).  The end of a recorded session is queued beyond the
bound, since its allocation is gone after: at most two records per live session.

A SIGKILL loses what is queued: one interval's deltas, and `gather` seconds of session starts
and ends, while the backends keep up.
`stopService` (SIGTERM) ends every recorded session still live with reason "shutdown" and
waits for every queue to drain, `shutdown_wait` seconds at most, before closing the backends.
"""
from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.core.allocation import Allocation
from relay.core.server import TurnServer
from relay.ledger.records import IUsageBackend, Record, SessionEnded, SessionStarted, UsageDelta
from relay.proto.stun import format_address
from relay.storage.sqldb import error_line
from relay.util.timefmt import rfc3339

log = Logger(namespace="turnrelay.ledger")

WHEN_FULL = ("refuse", "drop")
RETRY_FIRST = 0.5     # seconds before the first retry of a failed write; doubles each time
RETRY_CAP = 30.0
BATCH = 1000          # records per write
GATHER = 0.1          # seconds a record waits for others to share its write
ALARM_EVERY = 10.0    # seconds between two "queue full" errors in the log
SHUTDOWN_WAIT = 10.0
# Ended sessions named per "usage recorded" line: a line per session cost as much CPU as
# half an Allocate, and one per batch could run to a thousand identifiers.
SESSIONS_PER_LINE = 20

Counts = Tuple[int, int, int, int]  # bytes/packets from the client, bytes/packets to it


class _Reading:
    """What the ledger last took from one allocation's counters."""

    __slots__ = ("seq", "counts")

    def __init__(self) -> None:
        self.seq = 0
        self.counts: Counts = (0, 0, 0, 0)


class BackendQueue:
    """One backend's pending records, its one write in flight and its retry timer."""

    def __init__(self, name: str, backend: IUsageBackend, clock: IReactorTime,
                 written: Callable[[], None], gather: float = GATHER):
        self.name = name
        self.backend = backend
        self.clock = clock
        self.pending: Deque[Record] = deque()  # the batch being written stays here until stored
        self.writing = False
        self.ready = False  # a first write, if only of nothing, has succeeded
        self.failures = 0     # consecutive failed writes, for the backoff
        self.write_errors = 0  # every failed write since start, for the metrics
        self._retry: Optional[IDelayedCall] = None
        self.gather = gather
        self._gathering: Optional[IDelayedCall] = None
        self._written = written

    @property
    def idle(self) -> bool:
        return not self.pending and not self.writing

    def push(self, records: Sequence[Record]) -> None:
        self.pending.extend(records)
        self.kick()

    def kick(self) -> None:
        """Write the next batch, unless one is in flight or waiting for its retry.  Until the
        backend is ready, that may be an empty batch: at start-up, a SQL backend migrates its
        schema and the log says at once whether the ledger can write."""
        if self.writing or self._retry is not None or (self.ready and not self.pending):
            return
        if self.ready and self.gather and len(self.pending) < BATCH:
            if self._gathering is None:
                self._gathering = self.clock.callLater(self.gather, self._gathered)
            return
        self._write()

    def _gathered(self) -> None:
        self._gathering = None
        self._write()

    def _write(self) -> None:
        if self._gathering is not None:
            self._gathering.cancel()
            self._gathering = None
        batch = list(islice(self.pending, BATCH))
        self.writing = True
        d = defer.maybeDeferred(self.backend.write, batch)
        d.addCallbacks(self._stored, self._failed, callbackArgs=(batch,))

    def stop(self) -> None:
        for call in (self._retry, self._gathering):
            if call is not None:
                call.cancel()
        self._retry = self._gathering = None

    def _stored(self, _: object, batch: List[Record]) -> None:
        self.writing = False
        for _ in batch:
            self.pending.popleft()
        if not self.ready:
            self.ready = True
            log.debug("usage backend {backend} ready", backend=self.name)
        if self.failures:
            log.info("usage backend {backend} writes again after {failures} failed attempts",
                     backend=self.name, failures=self.failures)
            self.failures = 0
        ended = [record.session_id for record in batch if isinstance(record, SessionEnded)]
        for start in range(0, len(ended), SESSIONS_PER_LINE):
            log.info("usage recorded in {backend} for ended sessions {sessions}",
                     backend=self.name, sessions=" ".join(ended[start:start + SESSIONS_PER_LINE]))
        self.kick()
        self._written()

    def _failed(self, failure: Failure) -> None:
        self.writing = False
        self.failures += 1
        self.write_errors += 1
        delay = min(RETRY_CAP, RETRY_FIRST * 2 ** min(self.failures - 1, 16))
        log.error("usage backend {backend} failed ({error}: {message}); {pending} records kept, "
                  "retrying in {delay:.1f} s", backend=self.name, error=failure.type.__name__,
                  message=error_line(failure.getErrorMessage()),
                  pending=len(self.pending), delay=delay)
        self._retry = self.clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self.kick()


class Ledger(Service):
    """Reads every recorded session's counters and queues its records for the backends."""

    def __init__(self, server: TurnServer, backends: Mapping[str, IUsageBackend], region: str,
                 clock: IReactorTime, interval: float = 10.0, limit: int = 100_000,
                 when_full: str = "refuse", shutdown_wait: float = SHUTDOWN_WAIT,
                 gather: float = GATHER):
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {WHEN_FULL}")
        self.server = server
        self.region = region
        self.clock = clock
        self.interval = interval
        self.limit = limit
        self.refuse_when_full = when_full == "refuse"
        self.shutdown_wait = shutdown_wait
        self.queues = [BackendQueue(name, backend, clock, self._written, gather)
                       for name, backend in backends.items()]
        self.unrecorded = 0  # sessions relayed without a record (when_full "drop")
        self._readings: Dict[Allocation, _Reading] = {}
        # The accounts of ended sessions whose records may still be queued, for `unstored`;
        # forgotten whenever every queue is empty.
        self._ended: Dict[str, str] = {}
        self._full = False
        self._alarmed_at = 0.0
        self._drain_waiters: List[defer.Deferred[None]] = []
        self._timer = LoopingCall(self.read_counters)
        self._timer.clock = clock
        server.opened_observers.append(self.opened)
        server.closed_observers.append(self.closed)
        server.may_allocate = self.may_allocate

    # -- the server's seams -------------------------------------------------------------------

    def may_allocate(self) -> bool:
        return not (self.full() and self.refuse_when_full)

    def opened(self, allocation: Allocation) -> None:
        if self.full():  # only with "drop": "refuse" answered 508 before the allocation
            self.unrecorded += 1
            return
        self._readings[allocation] = _Reading()
        external = self.server.config.external_ips
        relays = tuple(format_address((external.get(host, host), port))
                       for host, port in (r.address for r in allocation.relays.values()))
        self._push([SessionStarted(
            allocation.session_id, allocation.account.account_id, allocation.username,
            self.region, allocation.transport, format_address(allocation.client), relays,
            rfc3339(int(allocation.started)))])

    def closed(self, allocation: Allocation, reason: str) -> None:
        reading = self._readings.pop(allocation, None)
        if reading is None:
            return
        self._ended[allocation.session_id] = allocation.account.account_id
        now = rfc3339(int(self.clock.seconds()))
        delta = self._delta(allocation, reading, now)
        end = SessionEnded(allocation.session_id, now, reason)
        self._push([end] if delta is None else [delta, end])

    # -- readings -----------------------------------------------------------------------------

    def read_counters(self) -> None:
        """Queue a delta for every recorded session that relayed since its last one."""
        if self.full():
            return
        self.server.refresh_counters()
        now = rfc3339(int(self.clock.seconds()))
        deltas = [self._delta(allocation, reading, now)
                  for allocation, reading in self._readings.items()]
        self._push([delta for delta in deltas if delta is not None])

    @staticmethod
    def _delta(allocation: Allocation, reading: _Reading, at: str) -> Optional[UsageDelta]:
        counts = (allocation.bytes_from_client, allocation.packets_from_client,
                  allocation.bytes_to_client, allocation.packets_to_client)
        if counts == reading.counts:
            return None
        reading.seq += 1
        delta = UsageDelta(allocation.session_id, reading.seq,
                           *(new - old for new, old in zip(counts, reading.counts)), at=at)
        reading.counts = counts
        return delta

    def unstored(self, backend: str, since: str) -> Dict[str, int]:
        """Billable bytes (sent plus received) per account that `backend` has not stored yet,
        of usage at `since` (RFC 3339) or later: its queued deltas and what the live sessions'
        counters hold beyond their last reading.  With what the backend has stored, that is
        every byte relayed, to this instant."""
        queue = next(queue for queue in self.queues if queue.name == backend)
        self.server.refresh_counters()
        accounts = dict(self._ended)
        totals: Dict[str, int] = {}
        for allocation, reading in self._readings.items():
            account = accounts[allocation.session_id] = allocation.account.account_id
            totals[account] = (totals.get(account, 0) + allocation.bytes_from_client
                               + allocation.bytes_to_client - reading.counts[0] - reading.counts[2])
        for record in queue.pending:
            if isinstance(record, UsageDelta) and record.at >= since:
                account = accounts.get(record.session_id)
                if account is not None:
                    totals[account] = (totals.get(account, 0) + record.bytes_from_client
                                       + record.bytes_to_client)
        return totals

    # -- queues -------------------------------------------------------------------------------

    def backlog(self) -> int:
        """Records waiting for the slowest backend."""
        return max((len(queue.pending) for queue in self.queues), default=0)

    def full(self) -> bool:
        """Whether the slowest backend holds `limit` records; says so, loudly, when it does.
        Asked twice per Allocate: a plain loop first, not `backlog`'s generator."""
        for queue in self.queues:
            if len(queue.pending) >= self.limit:
                break
        else:
            if not self._full:
                return False
        backlog = self.backlog()
        if backlog < self.limit:
            if self._full:
                self._full = False
                log.info("usage ledger queue has room again ({backlog} of {limit} records): "
                         "recording new sessions", backlog=backlog, limit=self.limit)
            return False
        now = self.clock.seconds()
        if not self._full or now - self._alarmed_at >= ALARM_EVERY:
            self._alarmed_at = now
            slowest = max(self.queues, key=lambda queue: len(queue.pending))
            log.error("usage ledger queue full: {backlog} records wait for backend {backend} "
                      "(--accounting-queue {limit}); {action}", backlog=backlog,
                      backend=slowest.name, limit=self.limit,
                      action="refusing new allocations (508)" if self.refuse_when_full else
                      f"new sessions are relayed unrecorded ({self.unrecorded} so far)")
        self._full = True
        return True

    def _push(self, records: List[Record]) -> None:
        if records:
            for queue in self.queues:
                queue.push(records)

    def _written(self) -> None:
        if self._full:
            self.full()
        if all(queue.idle for queue in self.queues):
            self._ended.clear()
        if self._drain_waiters and all(queue.idle for queue in self.queues):
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def drained(self) -> defer.Deferred[None]:
        """Fires once every backend has stored every record queued so far (and since)."""
        if all(queue.idle for queue in self.queues):
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        for queue in self.queues:
            queue.kick()
        self._timer.start(self.interval, now=False)

    def stopService(self) -> defer.Deferred[None]:
        """End every recorded session ("shutdown"), drain the queues (bounded), close."""
        Service.stopService(self)
        if self._timer.running:
            self._timer.stop()
        for allocation in list(self._readings):
            self.closed(allocation, "shutdown")
        d = self.drained()
        d.addTimeout(self.shutdown_wait, self.clock)
        d.addErrback(self._lost)
        d.addCallback(lambda _: self._close_backends())
        return d

    def _lost(self, failure: Failure) -> None:
        failure.trap(defer.TimeoutError)
        for queue in self.queues:
            queue.stop()
            if queue.pending:
                log.error("usage backend {backend}: {pending} records not written before "
                          "shutdown, lost", backend=queue.name, pending=len(queue.pending))

    def _close_backends(self) -> defer.Deferred[None]:
        closing = [defer.maybeDeferred(queue.backend.close) for queue in self.queues]
        d = defer.DeferredList(closing, consumeErrors=True)
        d.addCallback(self._closed)
        return d

    @staticmethod
    def _closed(results: List[Tuple[bool, object]]) -> None:
        for ok, result in results:
            if not ok:
                log.failure("a usage backend failed to close", result)
