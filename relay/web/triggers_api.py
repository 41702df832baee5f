"""The usage-trigger endpoints of the tokens API (`relay.ledger.triggers` fires them):

    POST   /v1/accounts/{account}/triggers        201: a trigger
    GET    /v1/accounts/{account}/triggers        200: {"triggers": [...]}
    GET    /v1/accounts/{account}/triggers/{sid}  200: one trigger
    DELETE /v1/accounts/{account}/triggers/{sid}  204

`relay.web.api` authenticates the caller and checks that the path names its own account
first.  POST fields, as a form, a JSON object or in the query string, as Twilio's usage
triggers: `callback_url` (required; http or https), `trigger_value` (megabytes, 10^6 bytes,
a decimal above 0), `friendly_name` (optional, at most 64 characters), `recurring` (only
`monthly`, the default).  A callback URL whose host is, or resolves to, an address the relay
would not relay to (`relay.core.peers`: loopback, private, link-local with the metadata service...)
is refused with 400, and checked again at each delivery.  An account has at most
MAX_TRIGGERS triggers.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.web.server import Request

from relay.core.peers import PeerPolicy
from relay.ledger.monthly_quota import month_start
from relay.ledger.triggers import trigger_fields, trigger_uri
from relay.ledger.webhooks import ForbiddenCallback, permitted_address
from relay.storage.accounts import MAX_TRIGGERS, AccountStore, TooManyTriggers
from relay.util.units import parse_megabytes
from relay.web.http import ApiError, Reply, request_fields

FIELDS = ("callback_url", "trigger_value", "friendly_name", "recurring")


def _friendly_name(value: Any) -> Optional[str]:
    if value is not None and not (isinstance(value, str) and 1 <= len(value) <= 64
                                  and value.isprintable()):
        raise ApiError(400, "friendly_name: expected 1 to 64 printable characters")
    return value


def _threshold(value: Any) -> int:
    if value is None:
        raise ApiError(400, "trigger_value: required, in megabytes (10^6 bytes)")
    try:
        threshold = parse_megabytes(str(value)) if not isinstance(value, bool) else 0
    except ValueError as err:
        raise ApiError(400, f"trigger_value: {err}") from None
    if threshold <= 0:
        raise ApiError(400, "trigger_value: must be more than 0 megabytes")
    return threshold


class TriggerAnswers:
    """Registers, lists and deletes an account's usage triggers."""

    def __init__(self, store: AccountStore, policy: PeerPolicy, clock: Callable[[], float]):
        self.store = store
        self.policy = policy
        self.clock = clock

    def _period(self) -> str:
        """This calendar month (UTC), "2026-11": whether a trigger has fired is per month."""
        return month_start(self.clock())[:7]

    async def list_all(self, request: Request, account_id: str) -> Reply:
        period = self._period()
        triggers = await self.store.triggers(period, account_id)
        return Reply(200, {"triggers": [trigger_fields(t, period) for t in triggers]})

    async def show(self, request: Request, account_id: str, sid: str) -> Reply:
        period = self._period()
        for trigger in await self.store.triggers(period, account_id):
            if trigger.trigger_id == sid:
                return Reply(200, trigger_fields(trigger, period))
        raise ApiError(404, f"no trigger {sid!r} of account {account_id!r}")

    async def delete(self, request: Request, account_id: str, sid: str) -> Reply:
        if not await self.store.delete_trigger(account_id, sid):
            raise ApiError(404, f"no trigger {sid!r} of account {account_id!r}")
        return Reply(204)

    async def create(self, request: Request, account_id: str) -> Reply:
        fields = request_fields(request, FIELDS)
        threshold = _threshold(fields.get("trigger_value"))
        name = _friendly_name(fields.get("friendly_name"))
        if fields.get("recurring", "monthly") != "monthly":
            raise ApiError(400, "recurring: only monthly is supported")
        url = fields.get("callback_url")
        if url is None:
            raise ApiError(400, "callback_url: required, an http:// or https:// URL")
        try:
            await permitted_address(url, self.policy)
        except (ValueError, ForbiddenCallback) as err:
            raise ApiError(400, f"callback_url: {err}") from None
        try:
            trigger = await self.store.add_trigger(account_id, threshold, url, name)
        except TooManyTriggers:
            raise ApiError(400, f"an account has at most {MAX_TRIGGERS} triggers; delete one "
                                "first") from None
        return Reply(201, trigger_fields(trigger, self._period()),
                     {b"location": trigger_uri(trigger).encode("ascii")})
