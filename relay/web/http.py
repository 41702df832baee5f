"""The HTTP toolkit the API endpoints share: replies and errors that carry their answer, Basic
credentials, path routing and request fields, all JSON, none of it twisted.web's HTML."""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Container, Dict, List, Mapping, Optional, Tuple
from urllib.parse import parse_qsl

from twisted.web.server import Request

MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Reply:
    """An answer: a JSON `body`, or `raw` bytes whose content-type is in `headers`."""
    code: int
    body: Optional[Dict[str, Any]] = None
    headers: Mapping[bytes, bytes] = field(default_factory=dict)
    raw: Optional[bytes] = None


class ApiError(Exception):
    """Any answer but success, raised from deep in a request: it carries its own reply."""

    def __init__(self, code: int, message: str, headers: Optional[Dict[bytes, bytes]] = None):
        super().__init__(message)
        self.reply = Reply(code, {"code": code, "message": message}, headers or {})


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


def public_route(postpath: List[bytes], names: Container[str]) -> Optional[str]:
    """NAME for a path /v1/NAME of one of `names` (outside any account), None otherwise."""
    if len(postpath) != 2 or postpath[0] != b"v1":
        return None
    name = postpath[1].decode("utf-8", "replace")
    return name if name in names else None


def url_encoded(encoded: bytes, where: str) -> List[Tuple[str, Any]]:
    """The name-value pairs of a query string or form body; 400 naming `where` unless they
    are URL-encoded UTF-8."""
    try:
        return parse_qsl(encoded.decode("ascii"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, f"{where}: not URL-encoded UTF-8") from None


def request_fields(request: Request, fields: Tuple[str, ...]) -> Dict[str, Any]:
    """`fields` (such as a token's ttl, label and region) from the query string and a form or JSON
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
