"""Long-term credentials through twisted.cred: checkers find a key, the message proves it.

A STUN client never sends its password; it sends a message whose MESSAGE-INTEGRITY was keyed
with it.  So the credentials here carry the message, and a checker, having found the user's
password or precomputed key, asks the credentials to verify the message with it.  The key that
verified is kept on the credentials: the response must be signed with the same key.

A checker's avatar id is an account id; `AccountRealm` turns it into the `Account` avatar that
the allocation carries, so usage is charged to whoever created the allocation.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.portal import IRealm
from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from relay import stun
from relay.saslprep import saslprep


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


@dataclass(frozen=True)
class StaticUser:
    account_id: str
    password: Optional[str] = None
    md5_key: Optional[bytes] = None  # coturn's `turnadmin -k` form: MD5(user:realm:password)


def parse_user(spec: str) -> Tuple[str, StaticUser]:
    """`NAME:PASSWORD`, or coturn's `NAME:0xHEXKEY` for a precomputed MD5 key."""
    name, sep, secret = spec.partition(":")
    if not sep or not name or not secret:
        raise ValueError(f"{spec.split(':')[0]!r}: expected NAME:PASSWORD or NAME:0xKEY")
    if secret.startswith("0x") and len(secret) == 34:
        return name, StaticUser(account_id=name, md5_key=bytes.fromhex(secret[2:]))
    return name, StaticUser(account_id=name, password=saslprep(secret))


@implementer(ICredentialsChecker)
class StaticUsersChecker:
    """Users from the command line or a users file, each mapped to an account.

    A user given by password serves both password algorithms and USERHASH; a precomputed MD5
    key serves MD5 only, since SHA-256 would need the password.
    """

    credentialInterfaces = (IStunCredentials,)

    def __init__(self, users: Dict[str, StaticUser]):
        self.users = dict(users)

    def _find(self, credentials: IStunCredentials) -> Tuple[Optional[str], Optional[StaticUser]]:
        if credentials.username is not None:
            return credentials.username, self.users.get(credentials.username)
        for name, user in self.users.items():
            if hmac.compare_digest(stun.userhash(name, credentials.realm), credentials.userhash or b""):
                return name, user
        return None, None

    def requestAvatarId(self, credentials: IStunCredentials) -> defer.Deferred:
        name, user = self._find(credentials)
        if name is None or user is None:
            return defer.fail(error.UnauthorizedLogin())
        if user.password is not None:
            ok = credentials.checkPassword(name, user.password)
        else:
            ok = credentials.algorithm == stun.ALGORITHM_MD5 and credentials.checkKey(name, user.md5_key)
        return defer.succeed(user.account_id) if ok else defer.fail(error.UnauthorizedLogin())


@implementer(IRealm)
class AccountRealm:
    def requestAvatar(self, avatarId: str, mind: object, *interfaces: Iterable) -> tuple:
        if IAccount not in interfaces:
            raise NotImplementedError("turnrelay avatars are accounts")
        return IAccount, Account(avatarId), lambda: None
