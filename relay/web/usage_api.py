"""The usage endpoints of the tokens API: an account's own usage, charges and sessions.

    GET /v1/accounts/{account}/usage?start=&end=&granularity=day|month|all
    GET /v1/accounts/{account}/sessions?start=&end=&limit=&after=

`relay.web.api` authenticates the caller and checks that the path names its own account
before either is answered, so an account never sees another's usage.  The answers are those of
`turnrelay usage` (`relay.ledger.report`, the same sums and the same `relay.ledger.pricing` rule): usage
is cut by when it was used, sessions by when they started.  `start` is required; `end`
defaults to now; both are RFC 3339 UTC (a date is its midnight).  MB and money are decimal
strings, which JSON numbers would not keep exact.

Sessions come in pages of `limit` (default 50, at most 1000), oldest first; `next_page_uri`
holds the next page's path, with the same window and an `after` cursor (the last session's
start and id), or null on the last page.  Keyset pagination: a session recorded meanwhile
neither shifts nor repeats the pages.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import quote, urlencode

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from relay.ledger.pricing import RateTable, parse_utc
from relay.ledger.report import NoLedger, UsageReader
from relay.storage.sqldb import error_line
from relay.util.timefmt import rfc3339
from relay.web.http import ApiError, Reply, url_encoded

log = Logger(namespace="turnrelay.api")

GRANULARITIES = ("day", "month", "all")
DEFAULT_LIMIT, MAX_LIMIT = 50, 1000
_USAGE_FIELDS = ("start", "end", "granularity")
_SESSIONS_FIELDS = ("start", "end", "limit", "after")


def _query(request: Request, allowed: Tuple[str, ...]) -> Dict[str, str]:
    """The query's fields; 400 naming one that is unknown or given twice."""
    found: Dict[str, str] = {}
    for name, value in url_encoded(request.uri.partition(b"?")[2], "query"):
        if name not in allowed:
            raise ApiError(400, f"{name}: unknown parameter; expected {', '.join(allowed)}")
        if name in found:
            raise ApiError(400, f"{name}: given more than once")
        found[name] = value
    return found


def _time(fields: Dict[str, str], name: str) -> str:
    try:
        return parse_utc(fields[name])
    except ValueError as err:
        raise ApiError(400, f"{name}: {err}") from None


def _cursor(started_at: str, session_id: str) -> str:
    return base64.urlsafe_b64encode(f"{started_at}/{session_id}".encode()).decode().rstrip("=")


def _after(text: str) -> Tuple[str, str]:
    try:
        started_at, _, session_id = base64.urlsafe_b64decode(
            text + "=" * (-len(text) % 4)).decode("ascii").partition("/")
        return parse_utc(started_at), session_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ApiError(400, "after: not a cursor from a next_page_uri") from None


class UsageAnswers:
    """Answers the usage endpoints from a SQL ledger, or says there is none (501)."""

    def __init__(self, reader: Optional[UsageReader], rates: RateTable,
                 clock: Callable[[], float]):
        self.reader = reader
        self.rates = rates
        self.clock = clock

    def _window(self, fields: Dict[str, str]) -> Tuple[str, str]:
        if "start" not in fields:
            raise ApiError(400, "start: required, e.g. 2026-11-01T00:00:00Z or 2026-11-01")
        start = _time(fields, "start")
        # The ledger's whole seconds: up to now is before the next one.
        end = _time(fields, "end") if "end" in fields else rfc3339(int(self.clock()) + 1)
        if end <= start:
            raise ApiError(400, f"end: {end} is not after start {start}")
        return start, end

    async def _read(self, ask: Callable[[UsageReader], Deferred]) -> Any:
        if self.reader is None:
            raise ApiError(501, "this relay keeps no SQL usage ledger to read usage from "
                                "(--accounting sqlite:... or postgresql:...)")
        try:
            return await ask(self.reader)
        except NoLedger:
            raise ApiError(503, "the usage ledger holds nothing yet; retry later") from None
        except Exception as err:
            log.error("usage API: the ledger cannot be read ({error}: {message})",
                      error=type(err).__name__,
                      message=error_line(str(err)))
            raise ApiError(503, "the usage ledger cannot be read now; retry later") from None

    async def usage(self, request: Request, account_id: str) -> Reply:
        fields = _query(request, _USAGE_FIELDS)
        start, end = self._window(fields)
        granularity = fields.get("granularity", "day")
        if granularity not in GRANULARITIES:
            raise ApiError(400, f"granularity: expected one of {', '.join(GRANULARITIES)}")
        report = await self._read(lambda reader: reader.report(start, end, granularity,
                                                               self.rates, account_id))
        return Reply(200, {"account": account_id, "start": start, "end": end,
                           "granularity": granularity,
                           "usage": [row.as_json("period") for row in report.rows],
                           "total": report.total.as_json("period")})

    async def sessions(self, request: Request, account_id: str) -> Reply:
        fields = _query(request, _SESSIONS_FIELDS)
        start, end = self._window(fields)
        limit_text = fields.get("limit", str(DEFAULT_LIMIT))
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
            raise ApiError(400, f"limit: expected a whole number from 1 to {MAX_LIMIT}")
        limit = int(limit_text)
        after = _after(fields["after"]) if "after" in fields else None
        # One more than a page: whether there is a next page is known without a second query.
        rows: List[Any] = await self._read(lambda reader: reader.sessions(
            account_id, start, end, self.rates, limit + 1, after))
        page, more = rows[:limit], len(rows) > limit
        next_page = None
        if more:
            last = page[-1]
            next_page = (f"/v1/accounts/{quote(account_id, safe='')}/sessions?" + urlencode({
                "start": start, "end": end, "limit": limit,
                "after": _cursor(last.started_at, last.session_id)}))
        return Reply(200, {"account": account_id, "start": start, "end": end,
                           "sessions": [row.as_json() for row in page],
                           "next_page_uri": next_page})
