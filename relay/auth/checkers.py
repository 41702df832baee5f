"""The built-in credential checkers: static users, and shared-secret (TURN REST) credentials.

What each can serve: a static user given by password serves SHA-256 and USERHASH; one given
by a precomputed MD5 key (coturn's `turnadmin -k`) serves neither, since both would need the
password.  A REST credential's password is derived from its username, so SHA-256 works, but
USERHASH cannot: the username cannot be recovered from its hash.
"""
from __future__ import annotations

import dataclasses
import hmac
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.auth import tokens
from relay.auth.cred import IAllocationPolicy, IStunCredentials, ISynchronousChecker, deferred_verdict
from relay.core.credentials import Account
from relay.proto import stun
from relay.proto.saslprep import saslprep
from relay.util.argstring import parse_arguments
from relay.util.secretfile import read_secrets
from relay.util.tomlfile import read_toml
from relay.util.units import parse_megabytes


@dataclass(frozen=True)
class StaticUser:
    account_id: str
    password: Optional[str] = None
    md5_key: Optional[bytes] = None  # coturn's `turnadmin -k` form: MD5(user:realm:password)
    monthly_quota_bytes: Optional[int] = None  # its account's, from the users file

    @cached_property
    def account(self) -> Account:
        """What a login as this user yields: one (it is frozen) for all of the user's
        allocations, which each keep it, rather than one each."""
        return Account(self.account_id, monthly_quota_bytes=self.monthly_quota_bytes)


def parse_user(spec: str) -> Tuple[str, StaticUser]:
    """`NAME:PASSWORD`, or coturn's `NAME:0xHEXKEY` for a precomputed MD5 key."""
    name, sep, secret = spec.partition(":")
    if not sep or not name or not secret:
        raise ValueError(f"{name!r}: expected NAME:PASSWORD or NAME:0xKEY")
    if secret.startswith("0x") and len(secret) == 34:
        return name, StaticUser(account_id=name, md5_key=bytes.fromhex(secret[2:]))
    return name, StaticUser(account_id=name, password=saslprep(secret))


def _account_quotas(path: str, accounts: Dict[str, Any]) -> Dict[str, int]:
    """`[accounts.NAME]` tables' `monthly-quota-mb`, in bytes (relay.ledger.monthly_quota)."""
    quotas = {}
    for name, entry in accounts.items():
        if "monthly-quota-mb" in entry:
            try:
                quotas[name] = parse_megabytes(str(entry["monthly-quota-mb"]))
            except ValueError as err:
                raise ValueError(f"{path}: account {name!r}: monthly-quota-mb: {err}") from None
    return quotas


def load_users_file(path: str) -> Dict[str, StaticUser]:
    """A TOML users file: `[users.NAME]` with `password` or `key`, and optional `account`;
    `[accounts.NAME]` with an optional `monthly-quota-mb`.

    Raises ValueError naming the file and the user at fault (never the secret).
    """
    document = read_toml(path)
    quotas = _account_quotas(path, document.get("accounts", {}))
    users = {}
    for name, entry in document.get("users", {}).items():
        secret = entry.get("password") or ("0x" + entry["key"] if "key" in entry else "")
        try:
            user = parse_user(f"{name}:{secret}")[1]
        except ValueError as err:
            raise ValueError(f"{path}: user {name!r}: {err}") from None
        account_id = str(entry.get("account", name))
        users[name] = dataclasses.replace(user, account_id=account_id,
                                          monthly_quota_bytes=quotas.get(account_id))
    return users


@implementer(ICredentialsChecker, ISynchronousChecker)
class StaticUsersChecker:
    """Users from the command line and/or a users file, each mapped to an account.

    `reload` (on SIGHUP) re-reads the file; a broken file keeps the users already loaded.
    Each user's long-term key is derived once per realm and algorithm and kept, as coturn
    keeps it, for as long as the user stays as loaded: a reload that removes or changes the
    user makes its kept key unusable (it is kept with the `StaticUser` it came from).
    """

    credentialInterfaces = (IStunCredentials,)

    def __init__(self, users: Dict[str, StaticUser], path: Optional[str] = None):
        self.fixed = dict(users)
        self.path = path
        self.users: Dict[str, StaticUser] = {}
        # (name, realm, algorithm) -> (the user as loaded, its key): at most two a user, since
        # the core refuses any realm but its own before a login.
        self._keys: Dict[Tuple[str, str, int], Tuple[StaticUser, bytes]] = {}
        self.reload()

    def reload(self) -> None:
        users = dict(self.fixed)
        if self.path:
            users.update(load_users_file(self.path))
        self.users = users
        self._keys = {}

    @property
    def supportsSha256(self) -> bool:
        return all(u.password is not None for u in self.users.values())

    supportsUserhash = supportsSha256

    def _find(self, credentials: IStunCredentials) -> Tuple[Optional[str], Optional[StaticUser]]:
        if credentials.username is not None:
            return credentials.username, self.users.get(credentials.username)
        for name, user in self.users.items():
            if hmac.compare_digest(stun.userhash(name, credentials.realm), credentials.userhash or b""):
                return name, user
        return None, None

    def _key(self, name: str, user: StaticUser, password: str, realm: str, algorithm: int) -> bytes:
        kept = self._keys.get((name, realm, algorithm))
        if kept is not None and kept[0] is user:
            return kept[1]
        key = stun.long_term_key(name, realm, password, algorithm)
        self._keys[name, realm, algorithm] = (user, key)
        return key

    def verify(self, credentials: IStunCredentials) -> Optional[Account]:
        name, user = self._find(credentials)
        if name is None or user is None:
            return None
        if user.password is not None:
            key = self._key(name, user, user.password, credentials.realm, credentials.algorithm)
        elif credentials.algorithm == stun.ALGORITHM_MD5 and user.md5_key is not None:
            key = user.md5_key
        else:
            return None
        return user.account if credentials.checkKey(name, key) else None

    def requestAvatarId(self, credentials: IStunCredentials) -> defer.Deferred:
        return deferred_verdict(self.verify, credentials)


@implementer(ICredentialsChecker, IAllocationPolicy, ISynchronousChecker)
class RestSecretChecker:
    """TURN REST credentials: `<unix-expiry>:<account-id>[:<label>]`, HMAC-SHA1 password.

    Every secret given verifies (rotation).  An expired credential cannot Allocate; with
    `strict_expiry` it can do nothing more, and allocations made with it are closed, while by
    default (as in eturnal) an allocation may outlive the credential that created it.

    The key a credential verified with is kept (at most `KEPT_KEYS`, then all forgotten), with
    the secret it came from: a client's later logins with it (ICE gathers several candidates,
    each an Allocate) cost one HMAC of the message instead of three digests more.  The expiry
    is checked before the kept key is used, and a key whose secret is no longer in `secrets`
    is not used.
    """

    KEPT_KEYS = 10_000

    credentialInterfaces = (IStunCredentials,)
    supportsSha256 = True
    supportsUserhash = False

    def __init__(self, secrets: Sequence[bytes], skew: float = 30, strict_expiry: bool = False,
                 clock: Callable[[], float] = time.time):
        self.secrets = list(secrets)
        self.skew = skew
        self.strict_expiry = strict_expiry
        self.clock = clock
        # (username, realm, algorithm) -> (secret, key)
        self._keys: Dict[Tuple[str, str, int], Tuple[bytes, bytes]] = {}

    def account(self, credentials: IStunCredentials) -> Optional[Tuple[tokens.RestUsername, Account]]:
        """Verify a REST credential: its parsed username and account, or None."""
        if credentials.username is None:
            return None
        try:
            parsed = tokens.parse_username(credentials.username)
        except ValueError:
            return None
        expired = parsed.expires + self.skew < self.clock()
        if expired and (self.strict_expiry or credentials.message.method == stun.ALLOCATE):
            return None
        username, realm, algorithm = credentials.username, credentials.realm, credentials.algorithm
        kept = self._keys.get((username, realm, algorithm))
        if kept is not None and kept[0] in self.secrets and credentials.checkKey(username, kept[1]):
            return parsed, Account(parsed.account_id, credential_expires=parsed.expires)
        for secret in self.secrets:
            key = stun.long_term_key(username, realm, tokens.password_for(secret, username),
                                     algorithm)
            if credentials.checkKey(username, key):
                if len(self._keys) >= self.KEPT_KEYS:
                    self._keys.clear()
                self._keys[username, realm, algorithm] = (secret, key)
                return parsed, Account(parsed.account_id, credential_expires=parsed.expires)
        return None

    def verify(self, credentials: IStunCredentials) -> Optional[Account]:
        verified = self.account(credentials)
        return verified[1] if verified else None

    def requestAvatarId(self, credentials: IStunCredentials) -> defer.Deferred:
        return deferred_verdict(self.verify, credentials)

    def allows(self, username: str, account: Account, now: float) -> bool:
        return not (self.strict_expiry and account.credential_expires is not None
                    and account.credential_expires + self.skew < now)


@implementer(ICredentialsChecker, IAllocationPolicy, ISynchronousChecker)
class ChainedChecker:
    """Several backends at once: the first that accepts a login wins.

    A twisted.cred Portal keeps one checker per credentials interface, so combining
    `--auth` backends needs this one in front.  A backend that fails with an error rather
    than a refusal does not stop the others; if none accepts, that error is what the caller
    sees (a 500 rather than a misleading 401).
    """

    credentialInterfaces = (IStunCredentials,)

    def __init__(self, checkers: Sequence[ICredentialsChecker]):
        self.checkers = list(checkers)
        # Found once: `allows` runs for every allocation at every tick of the core.
        self._policies = [c for c in self.checkers if IAllocationPolicy.providedBy(c)]

    @property
    def supportsSha256(self) -> bool:
        return all(getattr(c, "supportsSha256", False) for c in self.checkers)

    @property
    def supportsUserhash(self) -> bool:
        return all(getattr(c, "supportsUserhash", False) for c in self.checkers)

    @property
    def synchronous(self) -> bool:
        """Whether every backend decides at once, so `verify` may be called."""
        return all(ISynchronousChecker.providedBy(c) for c in self.checkers)

    def verify(self, credentials: IStunCredentials) -> Optional[Account]:
        """`requestAvatarId` without Deferreds, for backends that all decide at once: the
        first that accepts wins; if none does, the first error raised, else a refusal."""
        failure: Optional[Exception] = None
        for checker in self.checkers:
            try:
                account = checker.verify(credentials)
            except Exception as err:
                failure = failure or err
                continue
            if account is not None:
                return account
        if failure is not None:
            raise failure
        return None

    def reload(self) -> None:
        for checker in self.checkers:
            if hasattr(checker, "reload"):
                checker.reload()

    def allows(self, username: str, account: Account, now: float) -> bool:
        for policy in self._policies:  # a loop: all() over a generator costs twice as much
            if not policy.allows(username, account, now):
                return False
        return True

    def requestAvatarId(self, credentials: IStunCredentials) -> defer.Deferred:
        """Asks the backends in turn through plain callbacks: every Allocate cycle logs in
        twice, and `inlineCallbacks`' generator cost more than a static user's whole check."""
        return self._ask(credentials, 0, None)

    def _ask(self, credentials: IStunCredentials, index: int,
             failure: Optional[Failure]) -> defer.Deferred:
        if index == len(self.checkers):
            return defer.fail(failure if failure is not None else error.UnauthorizedLogin())
        d = defer.maybeDeferred(self.checkers[index].requestAvatarId, credentials)
        d.addErrback(self._refused, credentials, index, failure)
        return d

    def _refused(self, refusal: Failure, credentials: IStunCredentials, index: int,
                 failure: Optional[Failure]) -> defer.Deferred:
        if not refusal.check(error.UnauthorizedLogin):
            failure = failure or refusal  # the first error, not a refusal, is what is reported
        return self._ask(credentials, index + 1, failure)


def static_checker(argstring: str) -> StaticUsersChecker:
    """`--auth static:file=PATH`."""
    arguments = parse_arguments(argstring, {"file"})
    if "file" not in arguments:
        raise ValueError("file=PATH is required")
    return StaticUsersChecker({}, arguments["file"])


def read_secret_file(arguments: Dict[str, str]) -> list:
    if "secret-file" not in arguments:
        raise ValueError("secret-file=PATH is required")
    try:
        return read_secrets(arguments["secret-file"])
    except (OSError, ValueError) as err:
        raise ValueError(f"secret-file: {getattr(err, 'strerror', None) or err}") from None


def parse_skew(arguments: Dict[str, str]) -> float:
    try:
        skew = float(arguments.get("skew", 30))
    except ValueError:
        raise ValueError("skew: expected a number of seconds") from None
    if skew < 0:
        raise ValueError("skew: must not be negative")
    return skew


def rest_secret_checker(argstring: str) -> RestSecretChecker:
    """`--auth rest-secret:secret-file=PATH[,skew=SECONDS]`."""
    arguments = parse_arguments(argstring, {"secret-file", "skew"})
    return RestSecretChecker(read_secret_file(arguments), parse_skew(arguments))
