"""Time-limited shared-secret TURN credentials, the "TURN REST API" form coturn and eturnal use.

username = `<unix-expiry>:<account-id>[:<label>]`, password = base64(HMAC-SHA1(secret,
username)).  Whoever holds the secret can mint a credential offline, and every relay holding
it can verify one without a lookup; the account id inside the username says who pays.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, Tuple


@dataclass(frozen=True)
class RestUsername:
    expires: int
    account_id: str
    label: Optional[str] = None


def check_account_id(account_id: str) -> str:
    """`account_id` itself, or ValueError: it sits between ':'s in every username minted for it."""
    if ":" in account_id or not account_id:
        raise ValueError("an account id must be non-empty and hold no ':'")
    return account_id


def parse_username(username: str) -> RestUsername:
    """Split a REST username; ValueError when it is not one."""
    parts = username.split(":", 2)
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1]:
        raise ValueError("not a <unix-expiry>:<account-id>[:<label>] username")
    return RestUsername(int(parts[0]), parts[1], parts[2] if len(parts) == 3 else None)


def password_for(secret: bytes, username: str) -> str:
    return base64.b64encode(hmac.new(secret, username.encode("utf-8"), hashlib.sha1).digest()).decode()


def mint(secret: bytes, account_id: str, ttl: int, now: float,
         label: Optional[str] = None) -> Tuple[str, str]:
    """A (username, password) pair for `account_id`, valid `ttl` seconds from `now`."""
    username = f"{int(now) + ttl}:{check_account_id(account_id)}" + (f":{label}" if label else "")
    return username, password_for(secret, username)


@functools.lru_cache(maxsize=4)
def rfc3339(unix: int) -> str:
    """`2026-11-23T12:00:00Z`: the UTC timestamp form of Twilio's and most JSON APIs.  Kept
    for the last few seconds: the ledger stamps each session's start and end, hundreds a second
    under load, and datetime's strftime is slow on PyPy."""
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
