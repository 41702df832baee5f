"""Monthly byte quotas: an account that has relayed its quota this calendar month (UTC) gets
486 at Allocate, and its allocations are closed (reason "quota"), on every relay sharing the
usage ledger.

Usage is what the ledger records, billable bytes sent plus received.  Every `interval`
seconds a relay reads this month's totals of the accounts it watches from its SQL ledger
backend and adds what its own ledger has not stored there yet (`Ledger.unstored`: queued
deltas and live counters since their last reading).  The read runs on the ledger backend's
one connection, after the writes queued before it, so the two parts neither overlap nor leave
a gap.  With a PostgreSQL ledger shared by a fleet, a relay thus sees every relay's stored
usage plus its own live usage: the relay that relays the crossing byte acts within one
reading and one tick, the others one flush (`--accounting-interval`) later; what is relayed
meanwhile is recorded and billed, past the quota.  With a SQLite ledger per relay, a quota is
per relay.

A relay watches the accounts that have a quota and that allocated on it in the last
`WATCH_FOR` seconds, and only those are read.  An account's first Allocate on a relay is
let through, and closed within one reading if it was already over.  The quota an allocation
is held to is its login's (`Account.monthly_quota_bytes`, else `--monthly-quota-mb`); a
changed quota applies one reading after the account's next Allocate.  Months roll over at
00:00 UTC on the 1st: totals then start again from zero.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable, Dict, Mapping, Optional, Sequence, Set, Tuple

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.core.credentials import Account
from relay.core.server import TurnServer
from relay.ledger.records import IUsageBackend
from relay.ledger.sql import SqlUsageBackend
from relay.ledger.writer import Ledger
from relay.storage.sqldb import error_line

log = Logger(namespace="turnrelay.quota")

INTERVAL = 2.0
WATCH_FOR = 3600.0  # seconds an account stays watched after its last allocation here
def month_start(now: float) -> str:
    """The first second of `now`'s calendar month, UTC, as the ledger writes times."""
    moment = datetime.fromtimestamp(now, timezone.utc)
    return moment.strftime("%Y-%m-01T00:00:00Z")


class QuotaTracker:
    """Watches the accounts with a quota that allocate here, and answers the core's
    `over_quota` seam from its last reading."""

    def __init__(self, server: TurnServer, usage: MonthlyUsage, default_quota: int,
                 clock: Callable[[], float] = time.time, interval: float = INTERVAL,
                 report: Callable[[Set[str]], None] = lambda reached: None):
        self.server = server
        self.usage = usage
        self.default_quota = default_quota
        self.clock = clock
        # account id -> when it last allocated or held an allocation here, quota or not: the
        # accounts whose usage triggers this relay checks (relay.ledger.triggers)
        self.active: Dict[str, float] = {}
        # account id -> the quota in bytes of its newest login seen here, for the active
        # accounts that have one: the accounts each reading is for
        self.quotas: Dict[str, int] = {}
        self.reached: Set[str] = set()
        # With worker processes (relay.service.workers): `report` tells the parent this
        # worker's verdict when it changes, and the parent keeps `elsewhere`, the accounts
        # another worker found over, so an Allocate reaching a worker where the account was
        # not active yet gets its 486 at once, as it would from one process.
        self.report = report
        self.elsewhere: Set[str] = set()
        self._failing = False
        self.service = TimerService(interval, self.poll)
        server.over_quota = self.over_quota

    def quota_of(self, account: Account) -> int:
        quota = account.monthly_quota_bytes
        return self.default_quota if quota is None else quota

    def over_quota(self, account: Account) -> bool:
        """Asked at each Allocate and, each tick, for each allocation: so it only notes an
        account not seen yet, and one refused for its quota; `poll` notes the others."""
        account_id = account.account_id
        if account_id in self.reached or account_id in self.elsewhere:
            self._see(account, self.clock())
            return True
        if account_id not in self.active:  # first seen here: an Allocate
            self._see(account, self.clock())
        return False

    def _see(self, account: Account, now: float) -> None:
        """Note `account` active now, held to this login's quota: none (0) stops the readings
        of its usage, so the next one no longer finds it over."""
        self.active[account.account_id] = now
        quota = self.quota_of(account)
        if quota:
            self.quotas[account.account_id] = quota
        else:
            self.quotas.pop(account.account_id, None)

    def poll(self) -> defer.Deferred[None]:
        """Read this month's usage of the watched accounts; keep the last verdict on failure.
        Never fails: a failed call would stop the timer."""
        d = self._poll()
        d.addErrback(lambda failure: log.failure("monthly quotas: reading failed", failure))
        return d

    @defer.inlineCallbacks
    def _poll(self):
        now = self.clock()
        for allocation in self.server.allocations.values():  # the newest login's quota wins
            self._see(allocation.account, now)
        for account in [a for a, seen in self.active.items() if now - seen > WATCH_FOR]:
            del self.active[account]
            self.quotas.pop(account, None)
        since = month_start(now)
        quotas = dict(self.quotas)  # this reading's: logins while it runs may change them
        if not quotas:
            self._verdict(set())
            return
        accounts = sorted(quotas)
        try:
            usage = yield self.usage.read(since, accounts)
        except Exception:
            if not self._failing:
                self._failing = True
                failure = Failure()
                log.error("monthly quotas: cannot read usage from {backend} ({error}); keeping "
                          "the last verdict", backend=self.usage.backend_name,
                          error=error_line(failure.getErrorMessage()))
            return
        if self._failing:
            self._failing = False
            log.info("monthly quotas: usage readable again from {backend}",
                     backend=self.usage.backend_name)
        reached = {account for account in accounts if usage[account] >= quotas[account]}
        for account in sorted(reached - self.reached):
            log.warn("account {account} reached its monthly quota: {used} of {quota} bytes "
                     "since {since}; new allocations get 486 and live ones are closed",
                     account=account, used=usage[account], quota=quotas[account], since=since)
        self._verdict(reached)

    def _verdict(self, reached: Set[str]) -> None:
        if reached != self.reached:
            self.report(reached)
        self.reached = reached


def sql_backend(backends: Mapping[str, IUsageBackend]) -> Optional[Tuple[str, SqlUsageBackend]]:
    """The ledger's SQL backend usage is read from: a PostgreSQL one first, since it holds
    the whole fleet's usage, else a SQLite one; None with neither."""
    found = [(not backend.dsn.startswith("postgres"), index, name, backend)
             for index, (name, backend) in enumerate(backends.items())
             if isinstance(backend, SqlUsageBackend)]
    return min(found)[2:] if found else None


class MonthlyUsage:
    """Billable bytes of some accounts since a month's start: what the SQL backend has stored
    plus what this relay's ledger has not stored there yet."""

    def __init__(self, ledger: Ledger, backend_name: str, backend: SqlUsageBackend):
        self.ledger, self.backend_name, self.backend = ledger, backend_name, backend

    @defer.inlineCallbacks
    def read(self, since: str, accounts: Sequence[str]):
        stored = yield self.backend.billable_since(since, accounts)
        unstored = self.ledger.unstored(self.backend_name, since)
        return {account: stored.get(account, 0) + unstored.get(account, 0)
                for account in accounts}
