"""The browser side of the tokens API: ICE servers for a web page holding a browser key, and
/v1/ice.js, the module such a page measures the regions with.

    POST /v1/ice-servers   201: a short credential and the ICE servers of the nearest regions
    GET  /v1/ice.js        the JavaScript module (ice.js beside this file, package data)

and, for the account's backend with its API key, as `turnrelay browser-key` does:

    POST, GET /v1/accounts/{account}/browser-keys        201: a new key (shown once); 200: the keys
    DELETE    /v1/accounts/{account}/browser-keys/{id}   204: that key revoked

A web page that asks for its ICE servers itself, rather than through its application's
backend, lets the GeoIP lookup see the visitor's own address.  It cannot hold the account's
API key, which anyone could read in the page, so it holds a browser key
(`relay.storage.browser_keys`) and this endpoint grants that key the one thing it may do:
mint a credential for its account, no longer than the key's max_ttl, labelled with the key's
name, for a page of one of the key's origins.

The key travels in a form body (`key=trbk_...`), never in the URL, which access logs record.
A form POST is a CORS "simple request": the browser sends it without a preflight and shows
the answer to the page only if it carries Access-Control-Allow-Origin naming the page's
origin, which only the key's own origins get.  Answers, in the order they are decided:

- 403 without an Origin header (not a browser) or, once the key is known, from an origin the
  key does not list, naming the origin; the answer carries no CORS header, so the page
  learns nothing from it.
- 429 with Retry-After once the source address made --api-browser-requests-per-minute
  requests (every request counts, good key or not), or once the key made its own
  requests_per_minute (all its pages together); both are token buckets as wide as a minute.
- 400 for a key in the URL; 401 for a missing, malformed, unknown or revoked key: such
  failures count in the tokens API's failed-key bucket of the source, as wrong API keys do.
- 400 naming `ttl` (at most the key's max_ttl and --api-max-ttl; the default is the cap),
  `region`, `regions`, or a `client_ip` or `label` (a browser key gets neither: the address
  located is the request's own, the label is the key's name); 503 when no region serves; 403
  for a suspended account.  From here on, answers carry the CORS headers.
"""
from __future__ import annotations

import math
from dataclasses import replace
from importlib import resources
from typing import Any, Callable, Dict, Mapping
from urllib.parse import quote

from twisted.logger import Logger
from twisted.web.server import Request

from relay.auth.tokens import valid_label
from relay.core.ratelimit import RateLimiter
from relay.storage.accounts import AccountStore
from relay.storage.browser_keys import DEFAULT_MAX_TTL, DEFAULT_REQUESTS_PER_MINUTE, BrowserKey
from relay.util.timefmt import rfc3339
from relay.web.api import TokensAPI, parse_regions, parse_ttl, whole_number
from relay.web.http import ApiError, Reply, request_fields, url_encoded

log = Logger(namespace="turnrelay.api")

FIELDS = ("key", "ttl", "region", "regions", "client_ip", "label")
KEY_FIELDS = ("origins", "name", "max_ttl", "requests_per_minute")
MAX_REQUESTS_PER_MINUTE = 100_000
SCRIPT_MAX_AGE = 3600  # seconds a browser may cache ice.js


def _retry_after(per_minute: int) -> Dict[bytes, bytes]:
    return {b"retry-after": b"%d" % math.ceil(60 / per_minute)}


class BrowserAnswers:
    """The endpoints above, served by `tokens` (whose regions, minting, authentication and
    failed-key bucket they share) once this is made."""

    def __init__(self, store: AccountStore, tokens: TokensAPI, clock: Callable[[], float],
                 requests_per_minute: int):
        self.store = store
        self.tokens = tokens
        self.clock = clock
        self.source_rate = requests_per_minute
        self.per_source = RateLimiter(requests_per_minute / 60, requests_per_minute)
        # One bucket per key, in a limiter per rate: keys of one rate share a limiter, so
        # there are as many limiters as distinct rates, each bounded in keys.
        self.per_key: Dict[int, RateLimiter] = {}
        self.script = resources.files("relay.web").joinpath("ice.js").read_bytes()
        tokens.public.update({"ice-servers": {b"POST": self.ice_servers},
                              "ice.js": {b"GET": self.script_page}})
        tokens.paths.update({("browser-keys", False): {b"GET": self.list_keys,
                                                       b"POST": self.add_key},
                             ("browser-keys", True): {b"DELETE": self.revoke_key}})

    async def script_page(self, request: Request) -> Reply:
        """ice.js: public code, so any origin may load it (a module script is fetched with
        CORS), and cacheable, unlike every other answer of the API."""
        return Reply(200, raw=self.script, headers={
            b"content-type": b"text/javascript; charset=utf-8",
            b"access-control-allow-origin": b"*",
            b"cache-control": b"public, max-age=%d" % SCRIPT_MAX_AGE,
            b"x-content-type-options": b"nosniff"})

    async def ice_servers(self, request: Request) -> Reply:
        origin_header = request.getHeader(b"origin")
        if origin_header is None:
            raise ApiError(403, "a browser key is for web pages: the request has no Origin "
                                "header")
        origin = origin_header.decode("ascii", "replace")[:300]  # echoed in the refusal
        source = request.getClientAddress().host
        now = self.clock()
        if not self.per_source.allow(source, now):
            raise ApiError(429, "too many requests from this address; retry later",
                           _retry_after(self.source_rate))
        if any(name == "key" for name, _ in url_encoded(request.uri.partition(b"?")[2],
                                                         "query")):
            raise ApiError(400, "key: send it in the body, not in the URL (which logs record)")
        fields = request_fields(request, FIELDS)
        key = await self._key(fields.get("key"), source, now)
        if origin not in key.origins:
            log.info("tokens API: browser key {key} used from origin {origin!r}, not one of "
                     "its own, by {source}", key=key.key_id, origin=origin, source=source)
            raise ApiError(403, f"origin {origin} may not use this browser key "
                                "(its origins are set by turnrelay browser-key add --origin)")
        cors = {b"access-control-allow-origin": origin_header, b"vary": b"Origin"}
        try:
            return replace(await self._mint(request, fields, key, now), headers=cors)
        except ApiError as err:
            err.reply = replace(err.reply, headers={**err.reply.headers, **cors})
            raise

    async def _key(self, text: object, source: str, now: float) -> BrowserKey:
        """The browser key `text` names; 401 or 429 otherwise."""
        if not isinstance(text, str) or not text:
            raise ApiError(401, "a browser key is required: key=trbk_... in the body")
        tokens = self.tokens
        if not tokens.failed_keys.allow(source, now):
            raise ApiError(429, "too many failed key checks from this address; retry later",
                           {b"retry-after": tokens.retry_after})
        key = await self.store.find_browser_key(text)
        if key is None:
            log.info("tokens API: unknown or revoked browser key from {source}", source=source)
            raise ApiError(401, "unknown or revoked browser key")
        tokens.failed_keys.refund(source)
        return key

    async def _mint(self, request: Request, fields: Mapping[str, Any], key: BrowserKey,
                    now: float) -> Reply:
        limiter = self.per_key.get(key.requests_per_minute)
        if limiter is None:
            rate = key.requests_per_minute
            limiter = self.per_key[rate] = RateLimiter(rate / 60, rate)
        if not limiter.allow(key.key_id, now):
            raise ApiError(429, f"this browser key made its {key.requests_per_minute} requests "
                                "of the minute; retry later",
                           _retry_after(key.requests_per_minute))
        for name, why in (("client_ip", "the address located is the request's own"),
                          ("label", "the label is the key's name")):
            if name in fields:
                raise ApiError(400, f"{name}: not with a browser key: {why}")
        tokens = self.tokens
        ttl = parse_ttl(fields.get("ttl"), min(key.max_ttl, tokens.max_ttl))
        count = parse_regions(fields.get("regions"))
        choice = tokens.choose_regions(fields, request)
        return Reply(201, await tokens.credential(key.account_id, ttl, key.name, choice, count))

    # -- the account's own management of its keys (authenticated by the tokens API) ---------

    async def add_key(self, request: Request, account_id: str) -> Reply:
        """A new key: `origins` (a JSON list, or one string of origins separated by spaces or
        commas), `name`, `max_ttl`, `requests_per_minute`; 400 naming a bad one."""
        fields = request_fields(request, KEY_FIELDS)
        origins = fields.get("origins")
        if isinstance(origins, str):
            origins = origins.replace(",", " ").split()
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise ApiError(400, "origins: expected origins such as https://app.example.org, "
                                "separated by spaces, or a JSON list of them")
        try:
            name = valid_label(fields.get("name", "browser"))
        except ValueError as err:
            raise ApiError(400, f"name: {err}") from None
        max_ttl = whole_number(fields.get("max_ttl"), "max_ttl", 1, self.tokens.max_ttl,
                               min(DEFAULT_MAX_TTL, self.tokens.max_ttl))
        per_minute = whole_number(fields.get("requests_per_minute"), "requests_per_minute", 1,
                                  MAX_REQUESTS_PER_MINUTE, DEFAULT_REQUESTS_PER_MINUTE)
        try:
            key, record = await self.store.add_browser_key(account_id, origins, name, max_ttl,
                                                           per_minute)
        except ValueError as err:
            raise ApiError(400, f"origins: {err}") from None
        log.info("tokens API: browser key {key} of {account} added", key=record.key_id,
                 account=account_id)
        location = f"/v1/accounts/{quote(account_id, safe='')}/browser-keys/{record.key_id}"
        return Reply(201, {"key": key, **_described(record)},
                     {b"location": location.encode("ascii")})

    async def list_keys(self, request: Request, account_id: str) -> Reply:
        keys = await self.store.browser_keys(account_id)
        return Reply(200, {"browser_keys": [_described(key) for key in keys]})

    async def revoke_key(self, request: Request, account_id: str, key_id: str) -> Reply:
        if not await self.store.revoke_browser_key(key_id, account_id):
            raise ApiError(404, f"no browser key {key_id!r} of account {account_id!r}")
        log.info("tokens API: browser key {key} of {account} revoked", key=key_id,
                 account=account_id)
        return Reply(204)


def _described(key: BrowserKey) -> Dict[str, Any]:
    """A key as the API shows it: everything but its secret."""
    return {"key_id": key.key_id, "account": key.account_id, "name": key.name,
            "origins": list(key.origins), "max_ttl": key.max_ttl,
            "requests_per_minute": key.requests_per_minute,
            "date_created": rfc3339(key.created_at)}
