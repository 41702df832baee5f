"""Long-term credentials through twisted.cred: checkers find a key, the message proves it.

A STUN client never sends its password; it sends a message whose MESSAGE-INTEGRITY was keyed
with it.  So the credentials here carry the message, and a checker, having found the user's
password or precomputed key, asks the credentials to verify the message with it.  The key that
verified is kept on the credentials: the response must be signed with the same key.

A checker's avatar id is an `Account` (or, from a simple third-party checker, a bare account
id string); `AccountRealm` makes it the avatar that the allocation carries, so usage is charged
to whoever created the allocation and the account's limits apply to it.

Checkers may declare what they can serve (`supportsSha256`, `supportsUserhash`, both False
when absent) so the server advertises only what every configured backend handles, and may
provide `IAllocationPolicy` when their verdict can change after login.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Iterable, Optional

from twisted.cred.credentials import ICredentials
from twisted.cred.portal import IRealm
from zope.interface import Attribute, Interface, implementer

from relay import stun


class IStunCredentials(ICredentials):
    """A request signed with a long-term credential (RFC 8489 section 9.2)."""

    username = Attribute("The USERNAME, or None when the client sent USERHASH")
    userhash = Attribute("The USERHASH bytes, or None")
    realm = Attribute("The REALM the client used")
    algorithm = Attribute("The password algorithm: stun.ALGORITHM_MD5 or ALGORITHM_SHA256")

    def checkPassword(username: str, password: str) -> bool:
        """Derive the key for this algorithm from a password and verify the message."""

    def checkKey(username: str, key: bytes) -> bool:
        """Verify the message with a key derived beforehand for this algorithm."""


class IAccount(Interface):
    """The avatar of a successful login: who pays for what the allocation relays."""

    account_id = Attribute("Stable account identifier, charged for usage")


@implementer(IAccount)
@dataclass(frozen=True)
class Account:
    account_id: str
    status: str = "active"
    max_allocations: int = 0        # concurrent allocations, 0 = unlimited
    bandwidth_bps: int = 0          # bytes per second per allocation, both ways, 0 = unlimited
    credential_expires: Optional[float] = None  # unix time a time-limited credential ends
    # Billable bytes per calendar month (UTC), 0 = unlimited, None = the relay's
    # --monthly-quota-mb (relay.quota)
    monthly_quota_bytes: Optional[int] = None


class IAllocationPolicy(Interface):
    """For checkers whose verdict can change after login: expiry, revocation, suspension."""

    def allows(username: str, account: Account, now: float) -> bool:
        """False when an allocation made with this login must end now."""


@implementer(IStunCredentials)
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


@implementer(IRealm)
class AccountRealm:
    def requestAvatar(self, avatarId: object, mind: object, *interfaces: Iterable) -> tuple:
        if IAccount not in interfaces:
            raise NotImplementedError("turnrelay avatars are accounts")
        account = avatarId if isinstance(avatarId, Account) else Account(str(avatarId))
        return IAccount, account, lambda: None
