"""The account database behind the `db` auth backend: accounts, their quotas, revoked usernames.

One store over SQLite (the embedded default: one file, no server) or PostgreSQL (a fleet of
relays sharing one database), chosen by DSN.  Every call runs its SQL in adbapi's thread pool
and returns a Deferred, so the reactor never waits on the database.  A relay only polls
`snapshot()` and decides in memory; the `turnrelay` tool and the tokens API do the writes, and
every relay polling the same database sees them within one poll interval.

An API key is 256 random bits shown once, when made; the database keeps only a salted PBKDF2
hash of it, so a leaked database gives no key.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from twisted.enterprise import adbapi
from twisted.internet import defer

from relay.storage.browser_keys import BrowserKey, check_origins, new_key, secret_matches, split_key
from relay.storage.sqldb import SqlStore, pool_from_dsn

ACTIVE, SUSPENDED = "active", "suspended"
# The keys are random, not passwords a person chose: there is no dictionary to try, so stretching
# is defence in depth only, and 100k rounds (about 40 ms) keep each tokens API check cheap.
PBKDF2_ITERATIONS = 100_000
HASH_SCHEME = "pbkdf2_sha256"

# Migration N is MIGRATIONS[N - 1], applied in order by `create_schema` and listed in
# accounts_schema_version (not schema_version: the usage ledger may share the database).
# Migration 1 is the schema of before versioning, re-runnable on a database that has it.
# Unix seconds and bytes per second are BIGINT: PostgreSQL's INTEGER ends in 2038 and at 2 GB/s.
MIGRATIONS = (
    (
        """CREATE TABLE IF NOT EXISTS accounts (
            account_id TEXT PRIMARY KEY,
            status TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
            api_key_hash TEXT NOT NULL,
            max_allocations INTEGER NOT NULL CHECK (max_allocations >= 0),
            bandwidth_bps BIGINT NOT NULL CHECK (bandwidth_bps >= 0),
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS revocations (
            username TEXT PRIMARY KEY,
            account_id TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            revoked_at BIGINT NOT NULL)""",
    ),
    # Billable bytes per calendar month (UTC); NULL: the relay's --monthly-quota-mb.
    ("ALTER TABLE accounts ADD COLUMN monthly_quota_bytes BIGINT"
     " CHECK (monthly_quota_bytes >= 0)",),
    # Usage triggers (relay.ledger.triggers), and one row per trigger and month it fired: that row's
    # key is what makes a notice go out once however many relays see the crossing.
    (
        """CREATE TABLE IF NOT EXISTS usage_triggers (
            trigger_id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL,
            threshold_bytes BIGINT NOT NULL CHECK (threshold_bytes > 0),
            callback_url TEXT NOT NULL,
            friendly_name TEXT,
            created_at BIGINT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS usage_triggers_by_account ON usage_triggers (account_id)",
        """CREATE TABLE IF NOT EXISTS trigger_firings (
            trigger_id TEXT NOT NULL,
            period TEXT NOT NULL,
            usage_bytes BIGINT NOT NULL,
            fired_at BIGINT NOT NULL,
            delivered_at BIGINT,
            PRIMARY KEY (trigger_id, period))""",
    ),
    # Browser keys (relay.storage.browser_keys): origins space-separated; revoking deletes.
    (
        """CREATE TABLE IF NOT EXISTS browser_keys (
            key_id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL,
            secret_hash TEXT NOT NULL,
            name TEXT NOT NULL,
            origins TEXT NOT NULL,
            max_ttl INTEGER NOT NULL CHECK (max_ttl > 0),
            requests_per_minute INTEGER NOT NULL CHECK (requests_per_minute > 0),
            created_at BIGINT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS browser_keys_by_account ON browser_keys (account_id)",
    ),
)
TRIGGER_COLUMNS = "trigger_id, account_id, threshold_bytes, callback_url, friendly_name, created_at"
MAX_TRIGGERS = 20  # per account
RECORD_COLUMNS = "account_id, status, max_allocations, bandwidth_bps, monthly_quota_bytes"
BROWSER_KEY_COLUMNS = "key_id, account_id, name, origins, max_ttl, requests_per_minute, created_at"


def check_account_id(account_id: str) -> str:
    """`account_id` itself, or ValueError: it sits between ':'s in every username minted for it."""
    if ":" in account_id or not account_id:
        raise ValueError("an account id must be non-empty and hold no ':'")
    return account_id


@dataclass(frozen=True)
class UsageTrigger:
    """A callback due once per calendar month (UTC), when the account's billable bytes reach
    the threshold."""
    trigger_id: str  # "UT" and 32 hex digits, as Twilio names its usage triggers
    account_id: str
    threshold_bytes: int
    callback_url: str
    friendly_name: Optional[str]
    created_at: int
    fired_at: Optional[int] = None  # in the period asked about, if it fired then


class TooManyTriggers(Exception):
    """The account already has MAX_TRIGGERS triggers."""


class AccountExists(Exception):
    """add_account was given an id that is already taken."""


class UnknownAccount(Exception):
    """The account named does not exist."""


@dataclass(frozen=True)
class AccountRecord:
    """What a relay needs to know of an account; the key hash never leaves the database."""
    account_id: str
    status: str  # ACTIVE or SUSPENDED
    max_allocations: int  # concurrent allocations, 0 = unlimited
    bandwidth_bps: int  # bytes per second per allocation, 0 = unlimited
    monthly_quota_bytes: Optional[int] = None  # 0 = unlimited, None = the relay's default


@dataclass(frozen=True)
class Snapshot:
    """Everything a relay polls: every account, and the usernames revoked and not yet expired."""
    accounts: Dict[str, AccountRecord]
    revoked: FrozenSet[str]


def _derive(api_key: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", api_key.encode("utf-8"), salt, iterations)


def _encode(salt: bytes, digest: bytes) -> str:
    """`pbkdf2_sha256$<iterations>$<salt>$<hash>` (base64): the form names its own cost, so
    PBKDF2_ITERATIONS can grow without invalidating stored keys."""
    return "$".join((HASH_SCHEME, str(PBKDF2_ITERATIONS), base64.b64encode(salt).decode(),
                     base64.b64encode(digest).decode()))


# Checked against a key for an account that does not exist, so that answer costs the same time.
NO_ACCOUNT_HASH = _encode(bytes(16), bytes(32))


def hash_api_key(api_key: str) -> str:
    salt = secrets.token_bytes(16)
    return _encode(salt, _derive(api_key, salt, PBKDF2_ITERATIONS))


def api_key_matches(encoded: str, api_key: str) -> bool:
    """Whether `api_key` hashes to `encoded`, compared in constant time."""
    scheme, iterations, salt, digest = encoded.split("$")
    if scheme != HASH_SCHEME:
        raise ValueError(f"unknown API key hash scheme {scheme!r}")
    derived = _derive(api_key, base64.b64decode(salt), int(iterations))
    return hmac.compare_digest(derived, base64.b64decode(digest))


def _browser_key(row: Sequence[Any]) -> BrowserKey:
    key_id, account_id, name, origins, max_ttl, requests_per_minute, created_at = row
    return BrowserKey(key_id, account_id, name, tuple(origins.split()), max_ttl,
                      requests_per_minute, created_at)


def _check_limit(name: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"{name} must be 0 (unlimited) or more, not {value}")
    return value


class AccountStore(SqlStore):
    """Accounts and revocations in one database; every method returns a Deferred."""

    schema = ("accounts_schema_version", MIGRATIONS)

    @classmethod
    def from_dsn(cls, dsn: str) -> AccountStore:
        """A store on `sqlite:///absolute/path.db` or `postgresql://user@host:port/dbname`;
        ValueError naming the problem otherwise.  Nothing connects until the first call."""
        return cls(pool_from_dsn(dsn))

    def _update(self, txn: adbapi.Transaction, account_id: str, **columns: Any) -> None:
        """Set `columns` (our own names, never input) and updated_at; UnknownAccount if none."""
        assignments = "".join(f", {name} = ?" for name in columns)
        self._execute(txn, f"UPDATE accounts SET updated_at = ?{assignments} WHERE account_id = ?",
                      (int(time.time()), *columns.values(), account_id))
        if txn.rowcount == 0:
            raise UnknownAccount(account_id)

    def create_schema(self) -> defer.Deferred[None]:
        """Apply the migrations the database lacks: safe on every start."""
        return self._run(self._migrate, *self.schema)

    def add_account(self, account_id: str, max_allocations: int = 0, bandwidth_bps: int = 0,
                    monthly_quota_bytes: Optional[int] = None) -> defer.Deferred[str]:
        """Create an active account; fires with its API key, which nothing can show again."""
        return self._run(self._add, account_id, max_allocations, bandwidth_bps,
                         monthly_quota_bytes)

    def _add(self, txn: adbapi.Transaction, account_id: str, max_allocations: int = 0,
             bandwidth_bps: int = 0, monthly_quota_bytes: Optional[int] = None) -> str:
        check_account_id(account_id)
        api_key = secrets.token_urlsafe(32)
        now = int(time.time())
        self._execute(
            txn, "INSERT INTO accounts (account_id, status, api_key_hash, max_allocations,"
            " bandwidth_bps, monthly_quota_bytes, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account_id) DO NOTHING",
            (account_id, ACTIVE, hash_api_key(api_key),
             _check_limit("max_allocations", max_allocations),
             _check_limit("bandwidth_bps", bandwidth_bps),
             None if monthly_quota_bytes is None
             else _check_limit("monthly_quota_bytes", monthly_quota_bytes), now, now))
        if txn.rowcount == 0:
            raise AccountExists(account_id)
        return api_key

    def rotate_api_key(self, account_id: str) -> defer.Deferred[str]:
        """Replace the account's API key; fires with the new one, and the old one stops working."""
        return self._run(self._rotate, account_id)

    def _rotate(self, txn: adbapi.Transaction, account_id: str) -> str:
        api_key = secrets.token_urlsafe(32)
        self._update(txn, account_id, api_key_hash=hash_api_key(api_key))
        return api_key

    def account_with_new_key_now(self, account_id: str) -> str:
        """The account made if need be, with a new API key (returned), at once, blocking,
        outside the reactor: the relay's first-run account (relay.service.first_run)."""
        def add_or_rotate(txn: adbapi.Transaction) -> str:
            try:
                return self._add(txn, account_id)
            except AccountExists:
                return self._rotate(txn, account_id)
        self.migrate_now()
        return self.run_now(add_or_rotate)

    def set_status(self, account_id: str, status: str) -> defer.Deferred[None]:
        """ACTIVE or SUSPENDED: relays refuse a suspended account's credentials."""
        def set_status(txn: adbapi.Transaction) -> None:
            if status not in (ACTIVE, SUSPENDED):
                raise ValueError(f"status must be {ACTIVE!r} or {SUSPENDED!r}, not {status!r}")
            self._update(txn, account_id, status=status)
        return self._run(set_status)

    def set_limits(self, account_id: str, max_allocations: Optional[int] = None,
                   bandwidth_bps: Optional[int] = None, monthly_quota_bytes: Optional[int] = None,
                   default_quota: bool = False) -> defer.Deferred[None]:
        """Change the limits given (None keeps one as it is); 0 means unlimited.
        `default_quota` puts the account back on the relay's --monthly-quota-mb."""
        def set_limits(txn: adbapi.Transaction) -> None:
            limits: Dict[str, Optional[int]] = {
                name: _check_limit(name, value) for name, value in
                (("max_allocations", max_allocations), ("bandwidth_bps", bandwidth_bps),
                 ("monthly_quota_bytes", monthly_quota_bytes)) if value is not None}
            if default_quota:
                limits["monthly_quota_bytes"] = None
            self._update(txn, account_id, **limits)
        return self._run(set_limits)

    def get_account(self, account_id: str) -> defer.Deferred[Optional[AccountRecord]]:
        def get(txn: adbapi.Transaction) -> Optional[AccountRecord]:
            self._execute(txn, f"SELECT {RECORD_COLUMNS} FROM accounts WHERE account_id = ?",
                          (account_id,))
            row = txn.fetchone()
            return None if row is None else AccountRecord(*row)
        return self._run(get)

    def list_accounts(self) -> defer.Deferred[List[AccountRecord]]:
        def list_all(txn: adbapi.Transaction) -> List[AccountRecord]:
            self._execute(txn, f"SELECT {RECORD_COLUMNS} FROM accounts ORDER BY account_id")
            return [AccountRecord(*row) for row in txn.fetchall()]
        return self._run(list_all)

    def verify_api_key(self, account_id: str, api_key: str) -> defer.Deferred[bool]:
        """Whether `api_key` is the account's key, whatever its status.  An unknown account
        costs the same hashing, so the answer's timing does not tell which accounts exist."""
        def verify(txn: adbapi.Transaction) -> bool:
            self._execute(txn, "SELECT api_key_hash FROM accounts WHERE account_id = ?",
                          (account_id,))
            row = txn.fetchone()
            matches = api_key_matches(NO_ACCOUNT_HASH if row is None else row[0], api_key)
            return matches and row is not None
        return self._run(verify)

    def revoke(self, username: str, account_id: str, expires_at: int) -> defer.Deferred[None]:
        """Refuse `username` until `expires_at`, its own expiry; revoking twice changes nothing."""
        def revoke(txn: adbapi.Transaction) -> None:
            self._execute(txn, "INSERT INTO revocations (username, account_id, expires_at,"
                          " revoked_at) VALUES (?, ?, ?, ?) ON CONFLICT (username) DO NOTHING",
                          (username, account_id, int(expires_at), int(time.time())))
        return self._run(revoke)

    def snapshot(self, now: float) -> defer.Deferred[Snapshot]:
        """Every account and every username revoked until `now` or later.  Relays poll this every
        few seconds, so it is two reads of small tables; the expired revocations it reads are
        deleted, a write only when there is something to delete."""
        def snapshot(txn: adbapi.Transaction) -> Snapshot:
            self._execute(txn, f"SELECT {RECORD_COLUMNS} FROM accounts")
            accounts = {row[0]: AccountRecord(*row) for row in txn.fetchall()}
            self._execute(txn, "SELECT username, expires_at FROM revocations")
            rows = txn.fetchall()
            revoked = frozenset(username for username, expires_at in rows if expires_at >= now)
            if len(revoked) < len(rows):
                self._execute(txn, "DELETE FROM revocations WHERE expires_at < ?", (now,))
            return Snapshot(accounts, revoked)
        return self._run(snapshot)

    # -- browser keys ---------------------------------------------------------------------------

    def add_browser_key(self, account_id: str, origins: Iterable[str], name: str, max_ttl: int,
                        requests_per_minute: int) -> defer.Deferred[Tuple[str, BrowserKey]]:
        """A new browser key of the account: fires with (the key, which nothing can show
        again, and its record); ValueError for a bad origin or limit, UnknownAccount."""
        def add(txn: adbapi.Transaction) -> Tuple[str, BrowserKey]:
            if max_ttl <= 0 or requests_per_minute <= 0:
                raise ValueError("a browser key's max-ttl and requests per minute must be "
                                 "more than 0")
            self._execute(txn, "SELECT 1 FROM accounts WHERE account_id = ?", (account_id,))
            if txn.fetchone() is None:
                raise UnknownAccount(account_id)
            key, key_id, hashed = new_key()
            record = BrowserKey(key_id, account_id, name, check_origins(origins), max_ttl,
                                requests_per_minute, int(time.time()))
            self._execute(txn, f"INSERT INTO browser_keys ({BROWSER_KEY_COLUMNS}, secret_hash)"
                               " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                          (key_id, account_id, name, " ".join(record.origins), max_ttl,
                           requests_per_minute, record.created_at, hashed))
            return key, record
        return self._run(add)

    def browser_keys(self, account_id: Optional[str] = None) -> defer.Deferred[List[BrowserKey]]:
        """The account's browser keys (every account's without one), oldest first."""
        def read(txn: adbapi.Transaction) -> List[BrowserKey]:
            where, params = ("WHERE account_id = ? ", (account_id,)) if account_id else ("", ())
            self._execute(txn, f"SELECT {BROWSER_KEY_COLUMNS} FROM browser_keys {where}"
                               "ORDER BY created_at, key_id", params)
            return [_browser_key(row) for row in txn.fetchall()]
        return self._run(read)

    def find_browser_key(self, key: str) -> defer.Deferred[Optional[BrowserKey]]:
        """The record of `key`, None when it is malformed, unknown, revoked or wrong."""
        def find(txn: adbapi.Transaction) -> Optional[BrowserKey]:
            parts = split_key(key)
            if parts is None:
                return None
            self._execute(txn, f"SELECT {BROWSER_KEY_COLUMNS}, secret_hash FROM browser_keys"
                               " WHERE key_id = ?", (parts[0],))
            row = txn.fetchone()
            if row is None or not secret_matches(row[-1], parts[1]):
                return None
            return _browser_key(row[:-1])
        return self._run(find)

    def revoke_browser_key(self, key_id: str,
                           account_id: Optional[str] = None) -> defer.Deferred[bool]:
        """Delete the key (only if it is `account_id`'s, when given); False if there is none.
        Credentials it minted stay valid until their (short) expiry."""
        def revoke(txn: adbapi.Transaction) -> bool:
            if account_id is None:
                self._execute(txn, "DELETE FROM browser_keys WHERE key_id = ?", (key_id,))
            else:
                self._execute(txn, "DELETE FROM browser_keys WHERE key_id = ? AND account_id = ?",
                              (key_id, account_id))
            return txn.rowcount > 0
        return self._run(revoke)

    # -- usage triggers -------------------------------------------------------------------------

    def add_trigger(self, account_id: str, threshold_bytes: int, callback_url: str,
                    friendly_name: Optional[str] = None) -> defer.Deferred[UsageTrigger]:
        """Register a trigger; the caller has checked the URL (relay.ledger.webhooks)."""
        def add(txn: adbapi.Transaction) -> UsageTrigger:
            if threshold_bytes <= 0:
                raise ValueError("threshold_bytes must be more than 0")
            self._execute(txn, "SELECT COUNT(*) FROM usage_triggers WHERE account_id = ?",
                          (account_id,))
            if txn.fetchone()[0] >= MAX_TRIGGERS:
                raise TooManyTriggers(account_id)
            trigger = UsageTrigger("UT" + secrets.token_hex(16), account_id, threshold_bytes,
                                   callback_url, friendly_name, int(time.time()))
            self._execute(txn, f"INSERT INTO usage_triggers ({TRIGGER_COLUMNS})"
                               " VALUES (?, ?, ?, ?, ?, ?)",
                          (trigger.trigger_id, account_id, threshold_bytes, callback_url,
                           friendly_name, trigger.created_at))
            return trigger
        return self._run(add)

    def triggers(self, period: str, account_id: Optional[str] = None,
                 due_before: Optional[int] = None) -> defer.Deferred[List[UsageTrigger]]:
        """The account's triggers (every account's without one), with when each fired in
        `period` ("2026-11"); with `due_before`, only those due: not fired in it, or fired
        before that unix time and never delivered (`claim_firing`)."""
        def read(txn: adbapi.Transaction) -> List[UsageTrigger]:
            columns = ", ".join(f"t.{name.strip()}" for name in TRIGGER_COLUMNS.split(","))
            sql = (f"SELECT {columns}, f.fired_at FROM usage_triggers t LEFT JOIN"
                   " trigger_firings f ON f.trigger_id = t.trigger_id AND f.period = ?")
            conditions, params = [], [period]
            if account_id is not None:
                conditions.append("t.account_id = ?")
                params.append(account_id)
            if due_before is not None:
                conditions.append("(f.trigger_id IS NULL OR (f.delivered_at IS NULL"
                                  " AND f.fired_at < ?))")
                params.append(due_before)
            if conditions:
                sql += " WHERE " + " AND ".join(conditions)
            self._execute(txn, sql + " ORDER BY t.created_at, t.trigger_id", tuple(params))
            return [UsageTrigger(*row) for row in txn.fetchall()]
        return self._run(read)

    def delete_trigger(self, account_id: str, trigger_id: str) -> defer.Deferred[bool]:
        """Remove one of the account's triggers; False if it has no such trigger."""
        def delete(txn: adbapi.Transaction) -> bool:
            self._execute(txn, "DELETE FROM usage_triggers WHERE trigger_id = ? AND account_id = ?",
                          (trigger_id, account_id))
            deleted = txn.rowcount > 0
            if deleted:
                self._execute(txn, "DELETE FROM trigger_firings WHERE trigger_id = ?",
                              (trigger_id,))
            return deleted
        return self._run(delete)

    def claim_firing(self, trigger_id: str, period: str, usage_bytes: int,
                     stale_before: int) -> defer.Deferred[bool]:
        """Whether this caller is the one to notify: the first to insert the (trigger, period)
        row, whichever relay it runs on, or the first to take over a row claimed before
        `stale_before` and never delivered (its relay stopped, or gave up)."""
        def claim(txn: adbapi.Transaction) -> bool:
            self._execute(txn, "INSERT INTO trigger_firings (trigger_id, period, usage_bytes,"
                               " fired_at) VALUES (?, ?, ?, ?)"
                               " ON CONFLICT (trigger_id, period) DO UPDATE"
                               " SET usage_bytes = excluded.usage_bytes,"
                               " fired_at = excluded.fired_at"
                               " WHERE trigger_firings.delivered_at IS NULL"
                               " AND trigger_firings.fired_at < ?",
                          (trigger_id, period, usage_bytes, int(time.time()), stale_before))
            return txn.rowcount == 1
        return self._run(claim)

    def firing_delivered(self, trigger_id: str, period: str) -> defer.Deferred[None]:
        def delivered(txn: adbapi.Transaction) -> None:
            self._execute(txn, "UPDATE trigger_firings SET delivered_at = ?"
                               " WHERE trigger_id = ? AND period = ?",
                          (int(time.time()), trigger_id, period))
        return self._run(delivered)
