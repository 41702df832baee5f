"""The tokens API: Twilio-shaped HTTP endpoints that hand out short-lived TURN credentials.

    POST   /v1/accounts/{account}/tokens             201: a credential and its ICE servers
    DELETE /v1/accounts/{account}/tokens/{username}  204: that credential revoked
    GET    /v1/accounts/{account}/usage              200: usage and charges (`relay.usage_api`)
    GET    /v1/accounts/{account}/sessions           200: sessions, a page at a time
    POST, GET /v1/accounts/{account}/triggers        usage triggers (`relay.triggers_api`)
    GET, DELETE /v1/accounts/{account}/triggers/{sid}

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
- POST: 400 naming the field for a bad `ttl`, `label` or `region` (413 for a body over
  64 KiB, 415 for one neither form nor JSON), then 403 for a suspended account.
- DELETE: 404 for a username that is not a REST username of the account.  It works for a
  suspended account, so that a leaked credential can be revoked before reactivation.

Fields come from the query string, a form body (application/x-www-form-urlencoded, as with
Twilio) or a JSON object body.  Nothing secret travels in the URL, which the access log
records; this module logs failed key checks by source address and revocations, never a key,
a password or the secret.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Any, Awaitable, Callable, Container, Dict, List, Mapping,
                    Optional, Tuple)
from urllib.parse import parse_qsl, quote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relay.accounts_db import ACTIVE, AccountStore
from relay.ratelimit import RateLimiter
from relay.regions import Region
from relay.tokens import mint, parse_username, rfc3339

if TYPE_CHECKING:
    from relay.triggers_api import TriggerAnswers
    from relay.usage_api import UsageAnswers

log = Logger(namespace="turnrelay.api")

DEFAULT_TTL = 86400
FAILED_KEY_BURST = 10
MAX_BODY = 64 * 1024
FIELDS = ("ttl", "label", "region")
# A label ends up in the username, hence in STUN messages, logs and the DELETE URL.
_LABEL = re.compile(r"[A-Za-z0-9._~@-]{1,64}")
_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,20}")


@dataclass(frozen=True)
class Reply:
    code: int
    body: Optional[Dict[str, Any]] = None
    headers: Mapping[bytes, bytes] = field(default_factory=dict)


class ApiError(Exception):
    """Any answer but success, raised from deep in a request: it carries its own reply."""

    def __init__(self, code: int, message: str, headers: Optional[Dict[bytes, bytes]] = None):
        super().__init__(message)
        self.reply = Reply(code, {"code": code, "message": message}, headers or {})


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, {b"www-authenticate": b'Basic realm="turnrelay"'})


def _not_yours(account_id: str) -> ApiError:
    """One answer for an account that is not the caller's and one that does not exist."""
    return ApiError(404, f"no account {account_id!r} for these credentials")


def basic_credentials(header: Optional[bytes]) -> Optional[Tuple[str, str]]:
    """(user, password) of an Authorization header, None unless it is well-formed Basic.

    Parsed here rather than by `Request.getUser`, which raises on some malformed headers.
    """
    scheme, _, encoded = (header or b"").strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep and user and password else None


# A path of the API: (resource, whether it names an item), such as ("tokens", True).
PathKind = Tuple[str, bool]
# An endpoint: called with the request, the account id and, on an item's path, the item.
Handler = Callable[..., Awaitable[Reply]]


def route(postpath: List[bytes], kinds: Container[PathKind]
          ) -> Optional[Tuple[str, str, Optional[str]]]:
    """(account, resource, item or None) for a path of one of `kinds`, None for any other."""
    try:
        segments = [segment.decode("utf-8") for segment in postpath]
    except UnicodeDecodeError:
        return None
    if len(segments) not in (4, 5) or segments[:2] != ["v1", "accounts"] or not all(segments):
        return None
    item = segments[4] if len(segments) == 5 else None
    if (segments[3], item is not None) not in kinds:
        return None
    return segments[2], segments[3], item


def url_encoded(encoded: bytes, where: str) -> List[Tuple[str, Any]]:
    """The name-value pairs of a query string or form body; 400 naming `where` unless they
    are URL-encoded UTF-8."""
    try:
        return parse_qsl(encoded.decode("ascii"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, f"{where}: not URL-encoded UTF-8") from None


def request_fields(request: Request, fields: Tuple[str, ...] = FIELDS) -> Dict[str, Any]:
    """`fields` (a token's ttl, label and region) from the query string and a form or JSON
    body.

    Parsed here rather than read from `request.args`, where a form field silently replaces
    the query's: a field given twice is a 400 naming it, as is a body of another type.
    """
    body = request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise ApiError(413, f"body: larger than {MAX_BODY // 1024} KiB")
    given = url_encoded(request.uri.partition(b"?")[2], "query")
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type == b"application/x-www-form-urlencoded":
        given += url_encoded(body, "body")
    elif content_type == b"application/json":
        try:
            document = json.loads(body) if body.strip() else {}
        except ValueError:
            raise ApiError(400, "body: not JSON") from None
        if not isinstance(document, dict):
            raise ApiError(400, 'body: expected a JSON object such as {"ttl": 3600}')
        given += list(document.items())
    elif body.strip():
        raise ApiError(415, "body: expected application/x-www-form-urlencoded or "
                            "application/json")
    found: Dict[str, Any] = {}
    for name, value in given:
        if name in fields:
            if name in found:
                raise ApiError(400, f"{name}: given more than once")
            found[name] = value
    return found


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


def check_label(value: Any) -> Optional[str]:
    if value is not None and not (isinstance(value, str) and _LABEL.fullmatch(value)):
        raise ApiError(400, "label: expected 1 to 64 letters, digits or . _ ~ @ -")
    return value


class TokensAPI(Resource):
    """The whole API as one leaf resource: `route` matches the path, so that every miss is a
    JSON 404 rather than twisted.web's HTML page, and `self.paths` is the one table of what
    each path serves: the 404, the 405's Allow and the dispatch all read it."""

    isLeaf = True

    def __init__(self, store: AccountStore, secret: bytes, regions: Mapping[str, Region],
                 home_region: str, max_ttl: int, *, usage: "UsageAnswers",
                 triggers: "TriggerAnswers", clock: Callable[[], float] = time.time,
                 key_failures_per_minute: int = 60):
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
        self.store = store
        self.secret = secret
        self.regions = dict(regions)
        self.home_region = home_region
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
        if reply.body is not None:
            data = json.dumps(reply.body).encode("utf-8")
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(data))
            request.write(data)
        request.finish()

    async def _dispatch(self, request: Request) -> Reply:
        path = route(request.postpath, self.paths)
        if path is None:
            raise ApiError(404, "no such resource")
        account_id, resource, item = path
        handlers = self.paths[resource, item is not None]
        handler = handlers.get(request.method)
        if handler is None:
            allowed = b", ".join(handlers)
            raise ApiError(405, f"method not allowed; this path serves {allowed.decode()}",
                           {b"allow": allowed})
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

    def _region(self, name: Any) -> Tuple[str, Region]:
        name = self.home_region if name is None else name
        if not isinstance(name, str) or name not in self.regions:
            raise ApiError(400, f"region: expected one of {', '.join(sorted(self.regions))}")
        return name, self.regions[name]

    async def _mint(self, request: Request, account_id: str) -> Reply:
        fields = request_fields(request)
        ttl = parse_ttl(fields.get("ttl"), self.max_ttl)
        label = check_label(fields.get("label"))
        region_name, region = self._region(fields.get("region"))
        record = await self.store.get_account(account_id)
        if record is None:  # deleted since its key was checked
            raise _not_yours(account_id)
        if record.status != ACTIVE:
            raise ApiError(403, f"account {account_id!r} is {record.status}")
        now = self.clock()
        username, password = mint(self.secret, account_id, ttl, now, label)
        body = {"account": account_id, "username": username, "password": password, "ttl": ttl,
                "date_created": rfc3339(int(now)),
                "date_expires": rfc3339(parse_username(username).expires),
                "region": region_name, "ice_servers": region.ice_servers(username, password)}
        location = f"/v1/accounts/{quote(account_id, safe='')}/tokens/{quote(username, safe=':')}"
        return Reply(201, body, {b"location": location.encode("ascii")})

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
