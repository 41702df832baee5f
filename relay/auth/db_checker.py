"""The `db` auth backend: TURN REST credentials for accounts kept in the account database.

A credential proves itself by its HMAC, as with `rest-secret`; the database then says whether
its account exists and is active, what limits it has, and whether the username was revoked.
Logins never wait on the database: a snapshot of accounts and revocations is polled every
`POLL_INTERVAL` seconds and decisions are taken in memory.  The same snapshot, through
`allows`, ends existing allocations of revoked usernames and suspended accounts at the core's
next tick: within POLL_INTERVAL + 1 s of the change reaching the database, on every relay that
shares it.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

from twisted.application.internet import TimerService
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from relay.auth.checkers import RestSecretChecker, parse_skew, read_secret_file
from relay.auth.cred import IAllocationPolicy, IStunCredentials, ISynchronousChecker, deferred_verdict
from relay.core.credentials import Account
from relay.storage.accounts import ACTIVE, AccountStore, Snapshot
from relay.storage.sqldb import error_line
from relay.util.argstring import parse_arguments

log = Logger(namespace="turnrelay.accounts")
POLL_INTERVAL = 2.0
DB_ARGUMENTS = ("dsn", "secret-file", "skew")


class AccountDatabaseNotReady(Exception):
    """No snapshot yet: a login now is answered 500, not a misleading 401."""


@implementer(ICredentialsChecker, IAllocationPolicy, ISynchronousChecker)
class AccountsChecker:
    credentialInterfaces = (IStunCredentials,)
    supportsSha256 = True
    supportsUserhash = False  # a REST username cannot be recovered from its hash

    def __init__(self, store: AccountStore, secrets: Sequence[bytes], skew: float = 30,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.rest = RestSecretChecker(secrets, skew, clock=clock)
        self.clock = clock
        self.snapshot: Optional[Snapshot] = None
        self._schema_ready = False
        self._unreachable = False  # an outage is logged once, at its start, and at its end
        self.service = TimerService(POLL_INTERVAL, self.poll)

    @property
    def strict_expiry(self) -> bool:
        return self.rest.strict_expiry

    @strict_expiry.setter
    def strict_expiry(self, value: bool) -> None:
        self.rest.strict_expiry = value

    @defer.inlineCallbacks
    def poll(self):
        """Refresh the snapshot; on a database outage keep the last one and say so."""
        try:
            if not self._schema_ready:
                yield self.store.create_schema()
                self._schema_ready = True
            # A credential is accepted until its expiry plus the skew allowance, so its
            # revocation must be held as long.
            snapshot = yield self.store.snapshot(self.clock() - self.rest.skew)
        except Exception as err:
            if not self._unreachable:
                self._unreachable = True
                log.error("account database unreachable ({error}); deciding with the last "
                          "snapshot until it is back",
                          error=error_line(str(err)) or type(err).__name__)
            return
        if self._unreachable:
            self._unreachable = False
            log.info("account database reachable again")
        if self.snapshot is None:
            log.debug("account database loaded: {accounts} accounts, {revoked} revoked credentials",
                     accounts=len(snapshot.accounts), revoked=len(snapshot.revoked))
        self.snapshot = snapshot

    def verify(self, credentials: IStunCredentials) -> Optional[Account]:
        """Decided from the last snapshot, so at once (`ISynchronousChecker`)."""
        snapshot = self.snapshot
        if snapshot is None:
            raise AccountDatabaseNotReady()
        verified = self.rest.account(credentials)
        if verified is None:
            return None
        parsed, _ = verified
        record = snapshot.accounts.get(parsed.account_id)
        if record is None or record.status != ACTIVE or credentials.username in snapshot.revoked:
            return None
        return Account(record.account_id, record.status, record.max_allocations,
                       record.bandwidth_bps, credential_expires=parsed.expires,
                       monthly_quota_bytes=record.monthly_quota_bytes)

    def requestAvatarId(self, credentials: IStunCredentials) -> defer.Deferred:
        return deferred_verdict(self.verify, credentials)

    def allows(self, username: str, account: Account, now: float) -> bool:
        if not self.rest.allows(username, account, now):
            return False
        snapshot = self.snapshot
        if snapshot is None:
            return True
        record = snapshot.accounts.get(account.account_id)
        return username not in snapshot.revoked and (record is None or record.status == ACTIVE)


def db_checker(argstring: str) -> AccountsChecker:
    """`--auth db:dsn=sqlite:///PATH|postgresql://...,secret-file=PATH[,skew=SECONDS]`."""
    arguments = parse_arguments(argstring, DB_ARGUMENTS)
    if "dsn" not in arguments:
        raise ValueError("dsn=... is required")
    try:
        store = AccountStore.from_dsn(arguments["dsn"])
    except ValueError:
        raise ValueError("dsn: expected sqlite:///PATH or postgresql://...") from None
    return AccountsChecker(store, read_secret_file(arguments), parse_skew(arguments))
