"""Time-limited shared-secret TURN credentials, the "TURN REST API" form coturn and eturnal use.

username = `<unix-expiry>:<account-id>[:<label>]`, password = base64(HMAC-SHA1(secret,
username)).  Whoever holds the secret can mint a credential offline, and every relay holding
it can verify one without a lookup; the account id inside the username says who pays.
"""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from relay.storage.accounts import check_account_id
from relay.util.keyed_hmac import hmac_digest

# A label ends up in the username, hence in STUN messages, logs and the DELETE URL.
_LABEL = re.compile(r"[A-Za-z0-9._~@-]{1,64}")


def valid_label(label: Any) -> str:
    """`label` itself when it can end a username, ValueError otherwise."""
    if not (isinstance(label, str) and _LABEL.fullmatch(label)):
        raise ValueError("expected 1 to 64 letters, digits or . _ ~ @ -")
    return label


@dataclass(frozen=True)
class RestUsername:
    expires: int
    account_id: str
    label: Optional[str] = None


def parse_username(username: str) -> RestUsername:
    """Split a REST username; ValueError when it is not one."""
    parts = username.split(":", 2)
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1]:
        raise ValueError("not a <unix-expiry>:<account-id>[:<label>] username")
    return RestUsername(int(parts[0]), parts[1], parts[2] if len(parts) == 3 else None)


def password_for(secret: bytes, username: str) -> str:
    """Under one of a relay's few secrets, for each new username that logs in."""
    return base64.b64encode(hmac_digest(secret, username.encode("utf-8"), hashlib.sha1)).decode()


def mint(secret: bytes, account_id: str, ttl: int, now: float,
         label: Optional[str] = None) -> Tuple[str, str]:
    """A (username, password) pair for `account_id`, valid `ttl` seconds from `now`."""
    username = f"{int(now) + ttl}:{check_account_id(account_id)}" + (f":{label}" if label else "")
    return username, password_for(secret, username)
