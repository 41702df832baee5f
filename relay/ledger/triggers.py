"""Usage triggers: a JSON notice POSTed to an account's callback URL once its billable bytes
of the calendar month (UTC) reach a threshold, once per trigger and month.

Triggers live in the account database (`usage_triggers`, registered through the tokens API,
`relay.web.triggers_api`).  Every `interval` seconds each relay reads the triggers that have not
fired this month, keeps those of accounts that allocated on it in the last hour (the relays
an account relays on are the ones that see its usage grow), reads those accounts' usage as
quotas do (`relay.ledger.monthly_quota.MonthlyUsage`: the SQL ledger plus this relay's
unstored usage), and for each trigger reached inserts the (trigger, month) row of
`trigger_firings`.  That row's key makes the notice go out once: only the relay whose
insert succeeded delivers it, however many relays saw the crossing.  It
retries a failed delivery (no answer, an answer other than 2xx, a host that now resolves to a
forbidden address) after 1, 2, 4... seconds, RETRIES times, then gives up and says so.  A
firing not delivered TAKEOVER seconds after its claim (its relay stopped, or gave up) is
claimed again by the next relay that sees the trigger reached, which starts over: delivery is
at least once.  A notice carries an idempotency token (the trigger and the month), the same
on every attempt, for receivers that may see a notice twice.

Triggers recur monthly (Twilio's `recurring=monthly`): a month that starts finds every
trigger due again.  With a SQLite ledger per relay, each relay sees only its own usage.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Container, Dict, Optional
from urllib.parse import quote

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.core.peers import PeerPolicy
from relay.ledger.monthly_quota import MonthlyUsage, month_start
from relay.ledger.webhooks import post_json
from relay.storage.accounts import AccountStore, UsageTrigger
from relay.storage.sqldb import error_line
from relay.util.timefmt import rfc3339
from relay.util.units import MB

log = Logger(namespace="turnrelay.triggers")

INTERVAL = 2.0
RETRIES = 8  # after the first attempt: 1 + 2 + ... + 128 s, about four minutes in all
# A firing claimed this long ago and never delivered is taken over by the next relay that sees
# its trigger reached: longer than the claimer's retries with their timeouts (about 6 min).
TAKEOVER = 600
USAGE_CATEGORY = "relayed-bytes"


def megabytes(size: int) -> str:
    """Bytes as a decimal string of MB (10^6 bytes), exact: "0.012", "5"."""
    return str(Decimal(size) / MB)


def trigger_uri(trigger: UsageTrigger) -> str:
    return f"/v1/accounts/{quote(trigger.account_id, safe='')}/triggers/{trigger.trigger_id}"


def notice(trigger: UsageTrigger, period: str, used: int, fired_at: float) -> Dict[str, Any]:
    """The JSON a callback receives, Twilio's usage-trigger callback fields in JSON."""
    return {"account": trigger.account_id, "trigger_sid": trigger.trigger_id,
            "friendly_name": trigger.friendly_name, "usage_category": USAGE_CATEGORY,
            "trigger_by": "megabytes", "trigger_value": megabytes(trigger.threshold_bytes),
            "current_value": megabytes(used), "current_bytes": used,
            "threshold_bytes": trigger.threshold_bytes, "recurring": "monthly",
            "period": period, "date_fired": rfc3339(int(fired_at)),
            "idempotency_token": f"{trigger.trigger_id}-{period}", "uri": trigger_uri(trigger)}


class UsageTriggers:
    """Fires the triggers whose accounts reached their thresholds this month."""

    def __init__(self, store: AccountStore, usage: MonthlyUsage, policy: PeerPolicy, reactor: Any,
                 active: Container[str], interval: float = INTERVAL):
        self.store = store
        self.usage = usage
        self.active = active
        self.policy = policy
        self.reactor = reactor
        self.service = TimerService(interval, self.poll)
        self._failing = False

    def poll(self) -> defer.Deferred[None]:
        """Never fails: a failed call would stop the timer."""
        d = self._poll()
        d.addErrback(self._read_failed)
        return d

    def _read_failed(self, failure: Failure) -> None:
        if not self._failing:
            self._failing = True
            log.error("usage triggers: cannot read triggers or usage ({error}); retrying",
                      error=error_line(failure.getErrorMessage()))

    @defer.inlineCallbacks
    def _poll(self):
        now = self.reactor.seconds()
        since = month_start(now)
        period = since[:7]
        stale = int(now) - TAKEOVER
        due = [trigger for trigger in (yield self.store.triggers(period, due_before=stale))
               if trigger.account_id in self.active]
        if due:
            usage = yield self.usage.read(since, sorted({t.account_id for t in due}))
            for trigger in due:
                used = usage[trigger.account_id]
                if used >= trigger.threshold_bytes and (
                        yield self.store.claim_firing(trigger.trigger_id, period, used, stale)):
                    log.info("usage trigger {trigger} of account {account} fired: {used} of "
                             "{threshold} bytes in {period}", trigger=trigger.trigger_id,
                             account=trigger.account_id, used=used,
                             threshold=trigger.threshold_bytes, period=period)
                    self._deliver(trigger, period, notice(trigger, period, used, now), 0)
        self._failing = False

    def _deliver(self, trigger: UsageTrigger, period: str, body: Dict[str, Any],
                 attempt: int) -> None:
        d = post_json(self.reactor, trigger.callback_url, body, self.policy)
        d.addCallbacks(self._answered, self._failed,
                       callbackArgs=(trigger, period, body, attempt),
                       errbackArgs=(trigger, period, body, attempt))

    def _answered(self, code: int, trigger: UsageTrigger, period: str, body: Dict[str, Any],
                  attempt: int) -> Optional[defer.Deferred[None]]:
        if not 200 <= code < 300:
            self._retry(f"HTTP {code}", trigger, period, body, attempt)
            return None
        log.info("usage trigger {trigger} notice delivered (HTTP {code})",
                 trigger=trigger.trigger_id, code=code)
        d = self.store.firing_delivered(trigger.trigger_id, period)
        d.addErrback(lambda failure: log.failure("usage trigger delivery not recorded", failure))
        return d

    def _failed(self, failure: Failure, trigger: UsageTrigger, period: str,
                body: Dict[str, Any], attempt: int) -> None:
        problem = failure.getErrorMessage() or failure.type.__name__
        self._retry(problem, trigger, period, body, attempt)

    def _retry(self, problem: str, trigger: UsageTrigger, period: str, body: Dict[str, Any],
               attempt: int) -> None:
        """Log the failed attempt (never the URL, whose query may hold a secret) and retry."""
        if attempt >= RETRIES:
            log.error("usage trigger {trigger} notice not delivered after {attempts} attempts: "
                      "{problem}; giving up", trigger=trigger.trigger_id, attempts=attempt + 1,
                      problem=problem)
            return
        delay = 2 ** attempt
        log.warn("usage trigger {trigger} notice not delivered: {problem}; retrying in "
                 "{delay} s", trigger=trigger.trigger_id, problem=problem, delay=delay)
        self.reactor.callLater(delay, self._deliver, trigger, period, body, attempt + 1)


def trigger_fields(trigger: UsageTrigger, period: str) -> Dict[str, Any]:
    """A trigger as the API shows it, Twilio's usage-trigger fields."""
    return {"sid": trigger.trigger_id, "account": trigger.account_id,
            "friendly_name": trigger.friendly_name, "usage_category": USAGE_CATEGORY,
            "trigger_by": "megabytes", "trigger_value": megabytes(trigger.threshold_bytes),
            "callback_url": trigger.callback_url, "callback_method": "POST",
            "recurring": "monthly", "date_created": rfc3339(trigger.created_at),
            "date_fired": None if trigger.fired_at is None else rfc3339(trigger.fired_at),
            "period": period, "uri": trigger_uri(trigger)}
