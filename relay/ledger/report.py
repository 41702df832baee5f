"""Reading the SQL usage ledger: usage per session, account, region, day or month, and sessions.

One reader serves the `turnrelay usage` tool and the API's usage endpoints, on the schema of
`relay.ledger.sql`, so a report and an API answer are the same sums.  Usage is cut by when it
was used: a delta whose time `at` is in [since, until) counts, whatever its session's start, so
a session running across midnight or a month's end is billed to each day or month for what it
used in it.  A row's `sessions` counts the sessions with usage in the row.

Charges follow `relay.ledger.pricing`: SQL sums bytes per row, region and rate period (the spans between
two instants at which any rate changes), each such sum is charged at its one rate, and the row's
charge is rounded once.  Every query of a call runs in one transaction: a report is one
snapshot, its total the sum of its rows.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, DefaultDict, Dict, List, Optional, Sequence, Tuple

from twisted.enterprise import adbapi
from twisted.internet import defer

from relay.ledger.pricing import RateTable, charge, megabytes
from relay.ledger.sql import VERSION_TABLE
from relay.storage.sqldb import SqlStore, pool_from_dsn

# The row each grouping makes; None groups everything into one row.
GROUPS = {"session": "s.session_id", "account": "s.account_id", "region": "s.region",
          "day": "SUBSTR(d.at, 1, 10)", "month": "SUBSTR(d.at, 1, 7)", "all": None}
_FROM = (" FROM usage_deltas d JOIN sessions s ON s.session_id = d.session_id"
         " WHERE d.at >= ? AND d.at < ?")


class NoLedger(Exception):
    """There is no ledger to read where the DSN points: its message says what is missing."""


@dataclass(frozen=True)
class UsageRow:
    """One row of a report: `bytes_sent` is what the client sent (to be relayed to peers),
    `bytes_received` what it received from them; both are billable."""

    group: str
    sessions: int
    bytes_sent: int
    bytes_received: int
    charge: Optional[Decimal]   # None: usage where no rate was in effect

    @property
    def total_bytes(self) -> int:
        return self.bytes_sent + self.bytes_received

    @property
    def mb(self) -> Decimal:
        return megabytes(self.total_bytes)

    def as_json(self, group_name: str) -> Dict[str, Any]:
        """JSON fields; MB and money as decimal strings, which a float would not keep exact."""
        return {group_name: self.group, "sessions": self.sessions,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "total_bytes": self.total_bytes, "mb": str(self.mb),
                "charge": None if self.charge is None else str(self.charge)}


@dataclass(frozen=True)
class Report:
    rows: List[UsageRow]
    total: UsageRow
    unrated: List[str]          # regions with usage at a time no rate was in effect


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    region: str
    transport: str
    client_address: Optional[str]  # None once --client-address-retention has passed
    started_at: str
    ended_at: Optional[str]
    end_reason: Optional[str]
    usage: UsageRow                # all its usage, whenever used

    def as_json(self) -> Dict[str, Any]:
        usage = self.usage.as_json("session_id")
        return {"session_id": self.session_id, "region": self.region,
                "transport": self.transport, "client_address": self.client_address,
                "started_at": self.started_at, "ended_at": self.ended_at,
                "end_reason": self.end_reason,
                **{k: v for k, v in usage.items() if k not in ("session_id", "sessions")}}


def _period_sql(rates: RateTable) -> str:
    """The SQL that numbers a delta's rate period as `RateTable.period_start` does.  The
    instants are inlined, not bound: PostgreSQL must see the same expression in SELECT and
    GROUP BY, and a RateTable is only made of times it checked to be RFC 3339 UTC text
    (`relay.ledger.pricing._check_times`), so nothing else can get in."""
    bounds = rates.boundaries()
    if not bounds:
        return "0"
    cases = " ".join(f"WHEN d.at < '{b}' THEN {i}" for i, b in enumerate(bounds))
    return f"CASE {cases} ELSE {len(bounds)} END"


class UsageReader(SqlStore):
    """Reads a ledger that relays write: never creates or migrates anything."""

    @classmethod
    def from_dsn(cls, dsn: str) -> "UsageReader":
        """A reader of `sqlite:///path` or `postgresql://...`; ValueError for a bad DSN,
        NoLedger for a SQLite file that is not there (connecting would create it)."""
        if dsn.startswith("sqlite:") and not os.path.isfile(dsn[len("sqlite://"):]):
            raise NoLedger(f"no ledger at {dsn[len('sqlite://'):]}: no such file")
        return cls(pool_from_dsn(dsn, cp_min=1, cp_max=2))

    def report(self, since: str, until: str, by: str, rates: RateTable,
               account: Optional[str] = None) -> defer.Deferred[Report]:
        """Usage in [since, until) grouped `by` one of GROUPS, of `account` or of all."""
        return self._run(self._report, since, until, by, rates, account)

    def sessions(self, account: str, start: str, end: str, rates: RateTable, limit: int,
                 after: Optional[Tuple[str, str]] = None) -> defer.Deferred[List[SessionRow]]:
        """At most `limit` sessions of `account` started in [start, end), in the order they
        started (ties by id), from just after the (started_at, session_id) `after`."""
        return self._run(self._sessions, account, start, end, rates, limit, after)

    # -- in the pool's thread -------------------------------------------------------------------

    def _check_schema(self, txn: adbapi.Transaction) -> None:
        try:
            self._execute(txn, f"SELECT MAX(version) FROM {VERSION_TABLE}")
            txn.fetchall()
        except Exception:
            raise NoLedger("no usage ledger in this database yet: no relay has written to it "
                           f"(its {VERSION_TABLE} table is missing)") from None

    def _report(self, txn: adbapi.Transaction, since: str, until: str, by: str,
                rates: RateTable, account: Optional[str]) -> Report:
        self._check_schema(txn)
        key = GROUPS[by]
        where, params = _FROM, [since, until]
        if account is not None:
            where += " AND s.account_id = ?"
            params.append(account)
        group = key if key is not None else "'all'"
        self._execute(txn, f"SELECT {group}, s.region, {_period_sql(rates)},"
                           " SUM(d.bytes_from_client), SUM(d.bytes_to_client)" + where +
                      " GROUP BY " + ", ".join(
                          ([key] if key is not None else []) + ["s.region", "3"]), params)
        sums = txn.fetchall()
        counts = self._session_counts(txn, key, where, params)
        total_count = self._session_counts(txn, None, where, params).get("all", 0)

        rows: DefaultDict[str, List[Tuple[str, int, int, int]]] = defaultdict(list)
        for group_value, region, period, sent, received in sums:
            rows[str(group_value)].append((region, int(period), int(sent), int(received)))
        unrated = sorted({region for parts in rows.values() for region, period, sent, received
                          in parts if sent + received and
                          rates.rate_at(region, rates.period_start(period)) is None})
        everything = [part for parts in rows.values() for part in parts]
        return Report([_row(g, counts.get(g, 0), rows[g], rates) for g in sorted(rows)],
                      _row("all", total_count, everything, rates), unrated)

    def _session_counts(self, txn: adbapi.Transaction, key: Optional[str], where: str,
                        params: List[str]) -> Dict[str, int]:
        if key is None:
            self._execute(txn, "SELECT 'all', COUNT(DISTINCT d.session_id)" + where, params)
        else:
            self._execute(txn, f"SELECT {key}, COUNT(DISTINCT d.session_id)" + where +
                          " GROUP BY 1", params)
        return {str(group): int(count) for group, count in txn.fetchall()}

    def _sessions(self, txn: adbapi.Transaction, account: str, start: str, end: str,
                  rates: RateTable, limit: int,
                  after: Optional[Tuple[str, str]]) -> List[SessionRow]:
        self._check_schema(txn)
        sql = ("SELECT session_id, region, transport, client_address, started_at, ended_at,"
               " end_reason FROM sessions WHERE account_id = ? AND started_at >= ?"
               " AND started_at < ?")
        params: List[Any] = [account, start, end]
        if after is not None:
            sql += " AND (started_at > ? OR (started_at = ? AND session_id > ?))"
            params += [after[0], after[0], after[1]]
        self._execute(txn, sql + " ORDER BY started_at, session_id LIMIT ?", params + [limit])
        sessions = txn.fetchall()
        usage: DefaultDict[str, List[Tuple[str, int, int, int]]] = defaultdict(list)
        if sessions:
            regions = {row[0]: row[1] for row in sessions}
            marks = ", ".join("?" * len(sessions))
            self._execute(txn, f"SELECT d.session_id, {_period_sql(rates)},"
                               " SUM(d.bytes_from_client), SUM(d.bytes_to_client)"
                               f" FROM usage_deltas d WHERE d.session_id IN ({marks})"
                               " GROUP BY d.session_id, 2", [row[0] for row in sessions])
            for session_id, period, sent, received in txn.fetchall():
                usage[session_id].append((regions[session_id], int(period), int(sent),
                                          int(received)))
        return [SessionRow(session_id, region, transport, client, started, ended, reason,
                           _row(session_id, 1, usage[session_id], rates))
                for session_id, region, transport, client, started, ended, reason in sessions]


def _row(group: str, sessions: int, parts: Sequence[Tuple[str, int, int, int]],
         rates: RateTable) -> UsageRow:
    """A row from its (region, rate period, bytes sent, bytes received) sums."""
    return UsageRow(
        group, sessions, sum(p[2] for p in parts), sum(p[3] for p in parts),
        charge((sent + received, rates.rate_at(region, rates.period_start(period)))
               for region, period, sent, received in parts))
