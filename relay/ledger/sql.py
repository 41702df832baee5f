"""The `sqlite` and `postgresql` usage backends: one ledger schema, the same SQL on both.

`sessions` holds one row per session, ended_at and end_reason filled when it ends; `usage_deltas`
one row per delta, keyed by (session_id, seq), so a batch written twice stores each delta once
(INSERT ... ON CONFLICT DO NOTHING, on SQLite 3.24+ and PostgreSQL 9.5+).  Totals, per account,
region, day or month, are sums over usage_deltas joined to sessions; every time is RFC 3339 UTC
text (see `relay.ledger.records`).  There is no foreign key from deltas to sessions: a ledger must
never refuse usage, even of a session whose start it lost.

A retention pass (`relay.ledger.retention`) blanks the client address of sessions ended long enough
ago and leaves every other column, and every delta, as it is.

The schema is versioned: `schema_version` lists the migrations applied, and the first write
or retention pass of each process applies those missing inside its own transaction, all or
nothing on SQLite as on PostgreSQL (`SqlStore._migrate`).  Migrations only add, so a relay
of an older version keeps writing to a newer schema during a rolling upgrade.  The parent of
worker processes migrates before they start (`SqlStore.migrate_now`), so its workers never
race; two relays migrating at once may fail one write, which the ledger retries and finds the
work done.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Sequence, TypeVar

from twisted.enterprise import adbapi
from twisted.internet import defer
from zope.interface import implementer

from relay.ledger.records import (
    IClientAddressRetention,
    IUsageBackend,
    Record,
    SessionEnded,
    SessionStarted,
    UsageDelta,
)
from relay.storage.sqldb import BadDsn, SqlStore, postgresql_pool, sqlite_pool
from relay.util.argstring import single_argument

T = TypeVar("T")

VERSION_TABLE = "schema_version"  # the migrations applied (accounts_db keeps its own table)

# Migration N is MIGRATIONS[N - 1].  Byte and packet counts are BIGINT: INTEGER ends at 2 GB on
# PostgreSQL.  client_address may be cleared by a retention job (personal data) while the usage
# stays: it is the one nullable column of a started session.
MIGRATIONS = (
    (
        """CREATE TABLE IF NOT EXISTS sessions (
            session_id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL,
            username TEXT NOT NULL,
            region TEXT NOT NULL,
            transport TEXT NOT NULL,
            client_address TEXT,
            relay_addresses TEXT NOT NULL,
            started_at TEXT NOT NULL,
            ended_at TEXT,
            end_reason TEXT)""",
        "CREATE INDEX IF NOT EXISTS sessions_by_account ON sessions (account_id, started_at)",
        """CREATE TABLE IF NOT EXISTS usage_deltas (
            session_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            bytes_from_client BIGINT NOT NULL,
            packets_from_client BIGINT NOT NULL,
            bytes_to_client BIGINT NOT NULL,
            packets_to_client BIGINT NOT NULL,
            at TEXT NOT NULL,
            PRIMARY KEY (session_id, seq))""",
        "CREATE INDEX IF NOT EXISTS usage_deltas_by_time ON usage_deltas (at)",
    ),
    # 2: the sessions whose client address a retention pass may still have to blank, by end:
    # a pass reads only those, however many sessions the ledger has kept since.
    (
        "CREATE INDEX IF NOT EXISTS sessions_with_client_address ON sessions (ended_at)"
        " WHERE client_address IS NOT NULL",
    ),
)

_START = ("INSERT INTO sessions (session_id, account_id, username, region, transport,"
          " client_address, relay_addresses, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
          " ON CONFLICT (session_id) DO NOTHING")
_DELTA = ("INSERT INTO usage_deltas (session_id, seq, bytes_from_client, packets_from_client,"
          " bytes_to_client, packets_to_client, at) VALUES (?, ?, ?, ?, ?, ?, ?)"
          " ON CONFLICT (session_id, seq) DO NOTHING")
_END = "UPDATE sessions SET ended_at = ?, end_reason = ? WHERE session_id = ?"
_FORGET = ("UPDATE sessions SET client_address = NULL WHERE client_address IS NOT NULL"
           " AND ended_at IS NOT NULL AND ended_at < ?")
# Billable bytes since a time, for some accounts: the sessions_by_account index finds their
# sessions, the usage_deltas key their deltas; a session that ended before `since` is skipped
# whole.  The cost grows with those accounts' sessions of the month, not with the ledger.
_BILLABLE_SINCE = ("SELECT s.account_id, SUM(d.bytes_from_client + d.bytes_to_client)"
                   " FROM sessions s JOIN usage_deltas d ON d.session_id = s.session_id"
                   " WHERE s.account_id IN ({accounts}) AND (s.ended_at IS NULL OR s.ended_at >= ?)"
                   " AND d.at >= ? GROUP BY s.account_id")


@implementer(IUsageBackend, IClientAddressRetention)
class SqlUsageBackend(SqlStore):
    """IUsageBackend on one pool of a single connection: the ledger writes one batch at a time,
    and one connection is one thing to find broken and reopen after a database restart."""

    schema = (VERSION_TABLE, MIGRATIONS)

    def __init__(self, pool: adbapi.ConnectionPool, dsn: str):
        super().__init__(pool)
        self.dsn = dsn  # for readers of the same ledger (the usage API); may hold a password
        self._migrated = False

    def write(self, records: Sequence[Record]) -> defer.Deferred[None]:
        return self._run_migrated(self._write, list(records))

    def forget_client_addresses(self, ended_before: str) -> defer.Deferred[int]:
        return self._run_migrated(self._forget, ended_before)

    def _run_migrated(self, interaction: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run `interaction` in one transaction with the migrations this process has not
        yet seen applied: the first write or retention pass brings the schema up to date."""
        def run(txn: adbapi.Transaction) -> T:
            if not self._migrated:
                self._migrate(txn, VERSION_TABLE, MIGRATIONS)
            return interaction(txn, *args)
        d = self._run(run)
        d.addCallback(self._schema_ready)
        return d

    def _schema_ready(self, result: T) -> T:
        self._migrated = True
        return result

    def _forget(self, txn: adbapi.Transaction, ended_before: str) -> int:
        self._execute(txn, _FORGET, (ended_before,))
        return max(txn.rowcount, 0)

    def _write(self, txn: adbapi.Transaction, records: List[Record]) -> None:
        rows: Dict[type, list] = {SessionStarted: [], UsageDelta: [], SessionEnded: []}
        for r in records:
            rows[type(r)].append(r)
        # One transaction: starts before ends, whatever the order within the batch.
        for sql, values in (
                (_START, [(r.session_id, r.account_id, r.username, r.region, r.transport,
                           r.client_address, ",".join(r.relay_addresses), r.started_at)
                          for r in rows[SessionStarted]]),
                (_DELTA, [(r.session_id, r.seq, r.bytes_from_client, r.packets_from_client,
                           r.bytes_to_client, r.packets_to_client, r.at)
                          for r in rows[UsageDelta]]),
                (_END, [(r.ended_at, r.end_reason, r.session_id) for r in rows[SessionEnded]])):
            if values:
                self._execute_many(txn, sql, values)

    def billable_since(self, since: str, accounts: Sequence[str]) -> defer.Deferred[Dict[str, int]]:
        """Bytes sent plus received per account in deltas recorded at `since` (RFC 3339) or
        later, for `accounts` only (absent: none).  It runs on the writes' one connection,
        after the writes queued before it: what it returns and what the ledger still holds
        then (`Ledger.unstored`) neither overlap nor leave a gap."""
        def read(txn: adbapi.Transaction) -> Dict[str, int]:
            totals: Dict[str, int] = {}
            for start in range(0, len(accounts), 500):  # bounded statement size
                chunk = list(accounts[start:start + 500])
                sql = _BILLABLE_SINCE.format(accounts=", ".join("?" * len(chunk)))
                self._execute(txn, sql, (*chunk, since, since))
                totals.update((account, int(total)) for account, total in txn.fetchall())
            return totals
        return self._run(read)


def sqlite_backend(argstring: str) -> SqlUsageBackend:
    """`--accounting sqlite:path=PATH`: a relative PATH is taken from the working directory."""
    path = os.path.abspath(single_argument(argstring, "path"))
    if not os.path.isdir(os.path.dirname(path)):
        raise ValueError("path: its directory does not exist")
    return SqlUsageBackend(sqlite_pool(path, cp_min=1, cp_max=1), "sqlite://" + path)


def postgresql_backend(argstring: str) -> SqlUsageBackend:
    """`--accounting postgresql:dsn=postgresql://...`; errors never quote the DSN."""
    dsn = single_argument(argstring, "dsn")
    if dsn.partition(":")[0] not in ("postgresql", "postgres"):
        raise ValueError("dsn: expected postgresql://USER@HOST:PORT/DBNAME")
    try:
        return SqlUsageBackend(postgresql_pool(dsn, cp_min=1, cp_max=1), dsn)
    except BadDsn:
        raise ValueError("dsn: not a valid PostgreSQL DSN") from None
