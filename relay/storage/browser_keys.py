"""Browser keys: low-privilege keys a web page may carry, to fetch ICE servers itself.

An account's API key must stay on its application's backend; a browser key is meant to be
seen: it sits in the page's source, and what it allows is limited to match.  It mints short
credentials for its account (at most its `max_ttl`), from the web origins it lists only, at
most `requests_per_minute`, and nothing else: no usage, no sessions, no triggers, no tokens
of any length.  metered.ca's "domain restricted" keys work the same way.

A key reads `trbk_<id>_<secret>`: the id (16 hex digits) names it in listings and revocations,
the secret (64 hex digits, 256 random bits) proves it.  The database keeps the SHA-256 of the
secret only.  Unlike an API key's PBKDF2 hash this is one fast hash: the secret is random, so
there is no dictionary to slow down, and every page load of every visitor checks a key.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple
from urllib.parse import urlsplit

PREFIX = "trbk_"
DEFAULT_MAX_TTL = 600  # seconds: a page asks again on its next load
DEFAULT_REQUESTS_PER_MINUTE = 600
_KEY = re.compile(r"trbk_([0-9a-f]{16})_([0-9a-f]{64})")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_HOSTNAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class BrowserKey:
    """What the database holds of a browser key, but its secret's hash."""
    key_id: str
    account_id: str
    name: str  # the label of the usernames it mints, so usage shows which key made them
    origins: Tuple[str, ...]  # serialized origins, as browsers send them in Origin
    max_ttl: int
    requests_per_minute: int
    created_at: int


def check_origin(text: str) -> str:
    """A web origin (`https://app.example.org`, `http://127.0.0.1:8080`) in the serialization
    browsers send in the Origin header (lower case, no default port, no path); ValueError
    saying what is wrong otherwise."""
    try:
        parts = urlsplit(text.strip().lower())
        port = parts.port
    except ValueError as err:
        raise ValueError(str(err)) from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError("expected http:// or https:// and a host, such as "
                         "https://app.example.org")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username \
            or parts.password:
        raise ValueError("an origin is a scheme, a host and a port only, no path")
    host = parts.hostname
    try:
        address = ipaddress.ip_address(host)
        host = f"[{address}]" if address.version == 6 else str(address)
    except ValueError:
        if not _HOSTNAME.fullmatch(host) or len(host) > 253:
            raise ValueError(f"{host!r} is not a host name or an IP address") from None
    if port is not None and port != DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}:{port}"
    return f"{parts.scheme}://{host}"


def check_origins(texts: Iterable[str]) -> Tuple[str, ...]:
    """The origins, each checked (ValueError naming the bad one), without duplicates."""
    origins = []
    for text in texts:
        try:
            origins.append(check_origin(text))
        except ValueError as err:
            raise ValueError(f"origin {text!r}: {err}") from None
    origins = list(dict.fromkeys(origins))
    if not origins:
        raise ValueError("a browser key needs at least one origin")
    return tuple(origins)


def check_key_id(text: str) -> str:
    """A key id, or ValueError: also accepts a whole key and returns its id."""
    match = _KEY.fullmatch(text)
    if match:
        return match[1]
    if not _KEY_ID.fullmatch(text):
        raise ValueError(f"{text!r} is not a browser key id (16 hex digits)")
    return text


def new_key() -> Tuple[str, str, str]:
    """(key, its id, the hash of its secret) for a new key."""
    key_id, secret = secrets.token_hex(8), secrets.token_hex(32)
    return f"{PREFIX}{key_id}_{secret}", key_id, secret_hash(secret)


def split_key(key: str) -> Optional[Tuple[str, str]]:
    """(id, secret) of a well-formed key, None for anything else."""
    match = _KEY.fullmatch(key)
    return (match[1], match[2]) if match else None


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def secret_matches(stored_hash: str, secret: str) -> bool:
    return hmac.compare_digest(stored_hash, secret_hash(secret))
