"""Long-term credentials through twisted.cred: the interfaces checkers and the realm speak.

A checker's avatar id is an `Account` (or, from a simple third-party checker, a bare account
id string); `AccountRealm` makes it the avatar that the allocation carries, so usage is charged
to whoever created the allocation and the account's limits apply to it.

Checkers may declare what they can serve (`supportsSha256`, `supportsUserhash`, both False
when absent) so the server advertises only what every configured backend handles, and may
provide `IAllocationPolicy` when their verdict can change after login.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer
from zope.interface import Attribute, Interface, classImplements, implementer

from relay.core.credentials import Account, StunCredentials


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


class IAllocationPolicy(Interface):
    """For checkers whose verdict can change after login: expiry, revocation, suspension."""

    def allows(username: str, account: Account, now: float) -> bool:
        """False when an allocation made with this login must end now."""


class ISynchronousChecker(Interface):
    """A checker that decides at once, from what it holds in memory (static users, shared
    secrets, the account database's snapshot).  The UDP/TCP dispatcher then calls `verify`
    rather than going through the Portal's Deferreds: every Allocate cycle logs in, and the
    Deferreds cost more than a static user's whole check."""

    def verify(credentials: IStunCredentials) -> Optional[Account]:
        """The account these credentials log in as, None when refused; raises when the
        backend cannot decide (answered 500, as a failed Deferred is)."""


def deferred_verdict(verify: Callable[[IStunCredentials], Optional[Account]],
                     credentials: IStunCredentials) -> defer.Deferred:
    """`verify`'s verdict as `ICredentialsChecker.requestAvatarId` gives it, for the Portal."""
    try:
        account = verify(credentials)
    except Exception:
        return defer.fail()
    return defer.succeed(account) if account is not None else defer.fail(UnauthorizedLogin())


classImplements(StunCredentials, IStunCredentials)
classImplements(Account, IAccount)


@implementer(IRealm)
class AccountRealm:
    def requestAvatar(self, avatarId: object, mind: object, *interfaces: Iterable) -> tuple:
        if IAccount not in interfaces:
            raise NotImplementedError("turnrelay avatars are accounts")
        account = avatarId if isinstance(avatarId, Account) else Account(str(avatarId))
        return IAccount, account, lambda: None
