"""The credentials a login verifies, free of any framework: checkers find a key, the message
proves it.

A STUN client never sends its password; it sends a message whose MESSAGE-INTEGRITY was keyed
with it.  So the credentials here carry the message, and a checker, having found the user's
password or precomputed key, asks the credentials to verify the message with it.  The key that
verified is kept on the credentials: the response must be signed with the same key.  An
`Account` is who a login charges.  `relay.auth.cred` declares the twisted.cred interfaces these
provide, so the Portal and third-party checkers see them as before.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Optional

from relay.proto import stun


@dataclass(frozen=True)
class Account:
    account_id: str
    status: str = "active"
    max_allocations: int = 0        # concurrent allocations, 0 = unlimited
    bandwidth_bps: int = 0          # bytes per second per allocation, both ways, 0 = unlimited
    credential_expires: Optional[float] = None  # unix time a time-limited credential ends
    # Billable bytes per calendar month (UTC), 0 = unlimited, None = the relay's
    # --monthly-quota-mb (relay.ledger.monthly_quota)
    monthly_quota_bytes: Optional[int] = None


class StunCredentials:
    def __init__(self, message: stun.Message, username: Optional[str], userhash: Optional[bytes],
                 realm: str, algorithm: int):
        self.message = message
        self.username = username
        self.userhash = userhash
        self.realm = realm
        self.algorithm = algorithm
        self.key: Optional[bytes] = None

    def checkPassword(self, username: str, password: str) -> bool:
        return self.checkKey(username, stun.long_term_key(username, self.realm, password, self.algorithm))

    def checkKey(self, username: str, key: bytes) -> bool:
        if self.username is not None and self.username != username:
            return False
        if self.userhash is not None and not hmac.compare_digest(
                self.userhash, stun.userhash(username, self.realm)):
            return False
        if not self.message.check_integrity(key):
            return False
        self.username, self.key = username, key
        return True
