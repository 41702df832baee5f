"""The tokens API: Twilio-shaped HTTP endpoints that hand out short-lived TURN credentials.

    POST   /v1/accounts/{account}/tokens             201: a credential and its ICE servers
    DELETE /v1/accounts/{account}/tokens/{username}  204: that credential revoked
    GET    /v1/accounts/{account}/usage              200: usage and charges (`relay.web.usage_api`)
    GET    /v1/accounts/{account}/sessions           200: sessions, a page at a time
    POST, GET /v1/accounts/{account}/triggers        usage triggers (`relay.web.triggers_api`)
    GET, DELETE /v1/accounts/{account}/triggers/{sid}
    POST, GET /v1/accounts/{account}/browser-keys    browser keys (`relay.web.browser_api`)
    DELETE /v1/accounts/{account}/browser-keys/{id}
    POST   /v1/ice-servers, GET /v1/ice.js            for web pages, with a browser key

A caller authenticates with HTTP Basic, the account id and the account's API key, as with
Twilio's Account SID and auth token.  Credentials are TURN REST credentials minted with the
first secret of the `db` backend's secret file, so every relay sharing that file and the
account database accepts them, and a revocation reaches them all through the database.

Answers, in the order they are decided; every error is JSON `{"code": N, "message": "..."}`:

- 404 for a path outside the API; 405 (with Allow) for a method the path does not serve.
- 401 (with WWW-Authenticate) for missing or wrong credentials.  A key check takes a token
  from the source address's bucket (burst 10, refilled --api-key-failures-per-minute, 60)
  before the key is hashed, and
  gives it back when the key was right: only failures are charged, a busy legitimate caller
  is never throttled, and concurrent guesses cannot all pass before the first failure counts.
  An empty bucket is 429 with Retry-After, answered without any PBKDF2 work.  The source is
  the TCP peer: behind a reverse proxy, the proxy (X-Forwarded-For can be forged).
- 404 when the path names an account other than the one authenticated, whether it exists or
  not.  Checking the key first and answering "not yours" and "not there" alike means no
  caller learns which accounts exist: an anonymous one only ever sees 401.
- POST: 400 naming the field for a bad `ttl`, `label`, `region`, `regions` (how many
  regions' ICE servers to return, 2 by default) or `client_ip` (413 for a
  body over 64 KiB, 415 for one neither form nor JSON), 503 when every region is draining or
  not ready, then 403 for a suspended account.  The ICE servers are those of the region
  `relay.web.regions.choose` picks, then those of the next nearest (docs/regions.md).
- DELETE: 404 for a username that is not a REST username of the account.  It works for a
  suspended account, so that a leaked credential can be revoked before reactivation.

Fields come from the query string, a form body (application/x-www-form-urlencoded, as with
Twilio) or a JSON object body.  Nothing secret travels in the URL, which the access log
records; this module logs failed key checks by source address and revocations, never a key,
a password or the secret.
"""
from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional
from urllib.parse import quote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relay.auth.tokens import mint, parse_username, valid_label
from relay.core.ratelimit import RateLimiter
from relay.storage.accounts import ACTIVE, AccountStore
from relay.util.timefmt import rfc3339
from relay.web.http import (
    ApiError,
    Handler,
    PathKind,
    Reply,
    basic_credentials,
    public_route,
    request_fields,
    route,
)
from relay.web.regions import AUTO, Choice, NoRegionServing, Region, choose

if TYPE_CHECKING:
    from relay.web.geoip import GeoIP

if TYPE_CHECKING:
    from relay.web.triggers_api import TriggerAnswers
    from relay.web.usage_api import UsageAnswers

log = Logger(namespace="turnrelay.api")

DEFAULT_TTL = 86400
FAILED_KEY_BURST = 10
FIELDS = ("ttl", "label", "region", "client_ip", "regions")
DEFAULT_REGIONS, MAX_REGIONS = 2, 10  # regions an answer carries: the first and a fallback
_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,20}")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, {b"www-authenticate": b'Basic realm="turnrelay"'})


def _not_yours(account_id: str) -> ApiError:
    """One answer for an account that is not the caller's and one that does not exist."""
    return ApiError(404, f"no account {account_id!r} for these credentials")


def parse_ttl(value: Any, max_ttl: int) -> int:
    """Seconds the credential lives: DEFAULT_TTL (capped at `max_ttl`) when not given."""
    if value is None:
        return min(DEFAULT_TTL, max_ttl)
    if isinstance(value, bool) or not (
            isinstance(value, int) or isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value)):
        raise ApiError(400, "ttl: expected a whole number of seconds")
    ttl = int(value)
    if not 1 <= ttl <= max_ttl:
        raise ApiError(400, f"ttl: must be from 1 to {max_ttl} seconds")
    return ttl


def whole_number(value: Any, name: str, low: int, high: int, default: int) -> int:
    """Field `name`, a whole number from `low` to `high` (a JSON number or digits), `default`
    when not given; 400 naming it otherwise."""
    if value is None:
        return default
    if isinstance(value, bool) or not (
            isinstance(value, int) or isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value)) \
            or not low <= int(value) <= high:
        raise ApiError(400, f"{name}: expected a whole number from {low} to {high}")
    return int(value)


def parse_regions(value: Any) -> int:
    """How many regions' ICE servers to return, DEFAULT_REGIONS when not given."""
    return whole_number(value, "regions", 1, MAX_REGIONS, DEFAULT_REGIONS)


def check_label(value: Any) -> Optional[str]:
    try:
        return None if value is None else valid_label(value)
    except ValueError as err:
        raise ApiError(400, f"label: {err}") from None


def _handler(handlers: Mapping[bytes, Handler], method: bytes) -> Handler:
    """The path's handler of `method`; 405 with Allow when it has none."""
    handler = handlers.get(method)
    if handler is None:
        allowed = b", ".join(handlers)
        raise ApiError(405, f"method not allowed; this path serves {allowed.decode()}",
                       {b"allow": allowed})
    return handler


class TokensAPI(Resource):
    """The whole API as one leaf resource: `route` matches the path, so that every miss is a
    JSON 404 rather than twisted.web's HTML page, and `self.paths` is the one table of what
    each path serves: the 404, the 405's Allow and the dispatch all read it."""

    isLeaf = True

    def __init__(self, store: AccountStore, secret: bytes, regions: Mapping[str, Region],
                 home_region: str, max_ttl: int, *, usage: "UsageAnswers",
                 triggers: "TriggerAnswers", clock: Callable[[], float] = time.time,
                 key_failures_per_minute: int = 60, geoip: Optional["GeoIP"] = None):
        super().__init__()
        # Each path's handler per method, in the order the Allow header lists them.
        self.paths: Dict[PathKind, Dict[bytes, Handler]] = {
            ("tokens", False): {b"POST": self._mint},
            ("tokens", True): {b"DELETE": self._revoke},
            ("usage", False): {b"GET": usage.usage},
            ("sessions", False): {b"GET": usage.sessions},
            ("triggers", False): {b"GET": triggers.list_all, b"POST": triggers.create},
            ("triggers", True): {b"GET": triggers.show, b"DELETE": triggers.delete},
        }
        # Paths outside any account (/v1/NAME), which answer without an API key:
        # relay.web.browser_api adds its own.
        self.public: Dict[str, Dict[bytes, Handler]] = {}
        self.store = store
        self.secret = secret
        self.regions = dict(regions)
        self.home_region = home_region
        self.geoip = geoip
        self.max_ttl = max_ttl
        self.clock = clock
        self.failed_keys = RateLimiter(key_failures_per_minute / 60, FAILED_KEY_BURST)
        self.retry_after = b"%d" % math.ceil(60 / key_failures_per_minute)

    def render(self, request: Request) -> Any:
        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)  # the caller hung up: no one is left to answer
        answer = defer.ensureDeferred(self._answer(request))
        answer.addErrback(self._failed)
        answer.addCallback(self._send, request, finished)
        return NOT_DONE_YET

    async def _answer(self, request: Request) -> Reply:
        try:
            return await self._dispatch(request)
        except ApiError as err:
            return err.reply

    @staticmethod
    def _failed(failure: Failure) -> Reply:
        log.failure("tokens API request failed", failure)
        return ApiError(500, "internal error; the relay's log has the details").reply

    @staticmethod
    def _send(reply: Reply, request: Request, finished: defer.Deferred) -> None:
        if finished.called:
            return
        request.setResponseCode(reply.code)
        request.setHeader(b"cache-control", b"no-store")  # answers carry credentials
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        data = reply.raw
        if reply.body is not None:
            data = json.dumps(reply.body).encode("utf-8")
            request.setHeader(b"content-type", b"application/json")
        if data is not None:
            request.setHeader(b"content-length", b"%d" % len(data))
            request.write(data)
        request.finish()

    async def _dispatch(self, request: Request) -> Reply:
        public = public_route(request.postpath, self.public)
        if public is not None:
            return await _handler(self.public[public], request.method)(request)
        path = route(request.postpath, self.paths)
        if path is None:
            raise ApiError(404, "no such resource")
        account_id, resource, item = path
        handler = _handler(self.paths[resource, item is not None], request.method)
        if await self._authenticate(request) != account_id:
            raise _not_yours(account_id)
        return await handler(request, account_id, *(() if item is None else (item,)))

    async def _authenticate(self, request: Request) -> str:
        """The account whose API key the request carries; 401 or 429 otherwise."""
        credentials = basic_credentials(request.getHeader(b"authorization"))
        if credentials is None:
            raise _unauthorized("HTTP Basic credentials required: the account id and its API key")
        account_id, api_key = credentials
        source = request.getClientAddress().host
        if not self.failed_keys.allow(source, self.clock()):
            raise ApiError(429, "too many failed API key checks from this address; retry later",
                           {b"retry-after": self.retry_after})
        if not await self.store.verify_api_key(account_id, api_key):
            log.info("tokens API: wrong account id or API key from {source}", source=source)
            raise _unauthorized("wrong account id or API key")
        self.failed_keys.refund(source)
        return account_id

    def set_regions(self, regions: Mapping[str, Region]) -> None:
        """Regions as --regions-file now has them (re-read when it changes)."""
        self.regions = dict(regions)

    def choose_regions(self, fields: Mapping[str, Any], request: Request) -> Choice:
        """The regions whose ICE servers the answer carries: 400 for a bad `region` or
        `client_ip`, 503 when no region serves."""
        name, client_ip = fields.get("region"), fields.get("client_ip")
        if name is not None and (not isinstance(name, str)
                                 or name != AUTO and name not in self.regions):
            raise ApiError(400, f"region: expected {AUTO} or one of "
                                f"{', '.join(sorted(self.regions))}")
        if client_ip is not None:
            try:
                client_ip = str(ipaddress.ip_address(client_ip))
            except ValueError:
                raise ApiError(400, "client_ip: expected an IPv4 or IPv6 address") from None
        else:
            client_ip = request.getClientAddress().host
        point, unlocated = None, ""
        if name == AUTO or name is None and len(self.regions) > 1:
            if self.geoip is None:
                unlocated = "no GeoIP database (--geoip-db): the default region"
            else:
                point = self.geoip.locate(client_ip)
                if point is None:
                    unlocated = f"{client_ip} is not in the GeoIP database: the default region"
        try:
            return choose(self.regions, self.home_region, name, point, unlocated)
        except NoRegionServing as err:
            raise ApiError(503, str(err)) from None

    async def _mint(self, request: Request, account_id: str) -> Reply:
        fields = request_fields(request, FIELDS)
        ttl = parse_ttl(fields.get("ttl"), self.max_ttl)
        label = check_label(fields.get("label"))
        count = parse_regions(fields.get("regions"))
        choice = self.choose_regions(fields, request)
        body = await self.credential(account_id, ttl, label, choice, count)
        location = f"/v1/accounts/{quote(account_id, safe='')}/tokens/" \
                   f"{quote(body['username'], safe=':')}"
        return Reply(201, body, {b"location": location.encode("ascii")})

    async def credential(self, account_id: str, ttl: int, label: Optional[str], choice: Choice,
                         count: int) -> Dict[str, Any]:
        """A fresh credential of the account with the ICE servers of the first `count` regions
        of `choice`, flat in `ice_servers` and per region in `regions`; 403 for a suspended
        account."""
        record = await self.store.get_account(account_id)
        if record is None:  # deleted since its key was checked
            raise _not_yours(account_id)
        if record.status != ACTIVE:
            raise ApiError(403, f"account {account_id!r} is {record.status}")
        now = self.clock()
        username, password = mint(self.secret, account_id, ttl, now, label)
        regions = [{"name": name, "ice_servers": self.regions[name].ice_servers(username, password)}
                   for name in choice.order[:count]]
        body = {"account": account_id, "username": username, "password": password, "ttl": ttl,
                "date_created": rfc3339(int(now)),
                "date_expires": rfc3339(parse_username(username).expires),
                "region": choice.first, "region_reason": choice.reason,
                "fallback_region": choice.second,
                "ice_servers": [server for region in regions for server in region["ice_servers"]],
                "regions": regions}
        if choice.note:
            body["region_note"] = choice.note
        return body

    async def _revoke(self, request: Request, account_id: str, username: str) -> Reply:
        """Revoke until the username's own expiry, after which it is refused anyway."""
        try:
            parsed = parse_username(username)
        except ValueError:
            parsed = None
        if parsed is None or parsed.account_id != account_id:
            raise ApiError(404, f"no token {username!r} of account {account_id!r}")
        if parsed.expires >= self.clock():
            await self.store.revoke(username, account_id, parsed.expires)
            log.info("tokens API: revoked {username!r} until {until}", username=username,
                     until=rfc3339(parsed.expires))
        return Reply(204)
