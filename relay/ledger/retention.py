"""`--client-address-retention DAYS`: the ledger forgets client addresses, never usage.

A client address is personal data; the usage of its session is billing data, kept as long as
the ledger is.  Every RETENTION_EVERY seconds, and once at start-up, this service asks each
usage backend that can (`relay.ledger.records.IClientAddressRetention`: the SQL ones) to blank the
client address of every session that ended more than DAYS days ago (0: any ended session).
Live sessions keep theirs.  Every relay sharing a ledger may run it: a pass is one idempotent
UPDATE.  A backend that cannot (JSON lines are append-only) is named in the log at start-up.
"""
from __future__ import annotations

from typing import Dict

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.ledger.records import IClientAddressRetention, IUsageBackend
from relay.storage.sqldb import error_line
from relay.util.timefmt import rfc3339

log = Logger(namespace="turnrelay.retention")

RETENTION_EVERY = 3600.0
DAY = 86400


class ClientAddressRetention(TimerService):
    """Blanks old client addresses in every backend that can, periodically: a TimerService,
    as quotas and usage triggers are, so the first pass runs at start-up."""

    def __init__(self, backends: Dict[str, IUsageBackend], days: int, clock: IReactorTime):
        super().__init__(RETENTION_EVERY, self.apply)
        self.days = days
        self.clock = clock
        self.backends = {name: backend for name, backend in backends.items()
                         if IClientAddressRetention.providedBy(backend)}
        for name in sorted(set(backends) - set(self.backends)):
            log.warn("usage backend {backend} keeps client addresses: "
                     "--client-address-retention does not apply to it", backend=name)

    def apply(self) -> defer.Deferred[None]:
        """One pass over every backend; a failure is logged and the next pass tries again."""
        cutoff = rfc3339(int(self.clock.seconds()) - self.days * DAY)
        passes = []
        for name, backend in self.backends.items():
            d = defer.maybeDeferred(backend.forget_client_addresses, cutoff)
            d.addCallbacks(self._done, self._failed, callbackArgs=(name, cutoff),
                           errbackArgs=(name,))
            passes.append(d)
        return defer.gatherResults(passes).addCallback(lambda _: None)

    @staticmethod
    def _done(count: int, name: str, cutoff: str) -> None:
        log.info("client-address retention: {count} client addresses of sessions ended before "
                 "{cutoff} blanked in {backend}", count=count, cutoff=cutoff, backend=name)

    @staticmethod
    def _failed(failure: Failure, name: str) -> None:
        log.error("client-address retention failed in {backend} ({error}: {message}); the next "
                  "pass tries again", backend=name, error=failure.type.__name__,
                  message=error_line(failure.getErrorMessage()))
