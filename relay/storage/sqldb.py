"""SQLite or PostgreSQL through adbapi, for the account database and the usage ledger alike.

A store is chosen by DSN: SQLite (the embedded default: one file, no server) or PostgreSQL (a
fleet of relays sharing one database).  Every call runs its SQL in adbapi's thread pool and
returns a Deferred, so the reactor never waits on the database.  The SQL is written once, with
`?` placeholders; `SqlStore._execute` is the one place that turns them into the `%s` psycopg
wants.
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterable, Sequence, Tuple

from twisted.enterprise import adbapi
from twisted.internet import defer

from relay.util.timefmt import rfc3339


def _use_wal(connection: Any) -> None:
    # Closed at once: on PyPy an open cursor keeps its statement active until garbage
    # collection, and SQLite then refuses every commit on the connection.
    connection.execute("PRAGMA journal_mode=WAL").close()


def sqlite_pool(path: str, **pool_options: Any) -> adbapi.ConnectionPool:
    """A pool on the SQLite file `path` (absolute), in WAL mode."""
    if not path.startswith("/") or path == "/":
        raise ValueError("a SQLite DSN names an absolute file path: sqlite:///path/to/accounts.db")
    # adbapi keeps a connection per pool thread but closes them all from the reactor thread,
    # which sqlite3 refuses unless check_same_thread is off.  WAL lets readers (the relays, a
    # report) read while a writer writes.
    return adbapi.ConnectionPool("sqlite3", path, check_same_thread=False, cp_openfun=_use_wal,
                                 **pool_options)


def without_password(text: str) -> str:
    """`text` with any DSN password in it masked: libpq quotes a DSN it cannot parse, and error
    messages end up in logs."""
    text = re.sub(r"(://[^/@\s]*?:)[^/@\s]*@", r"\1***@", text)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", text)


def error_line(text: str) -> str:
    """A database error's message as a log line quotes it: its first line (a driver's message
    is often a paragraph), any DSN password masked."""
    lines = text.strip().splitlines()
    return without_password(lines[0] if lines else "")


class BadDsn(ValueError):
    """psycopg could not parse a PostgreSQL DSN (its password masked in the message)."""


def postgresql_pool(dsn: str, **pool_options: Any) -> adbapi.ConnectionPool:
    try:
        import psycopg
    except ImportError:
        raise ValueError("a PostgreSQL DSN needs psycopg: pip install 'turnrelay[postgresql]'") \
            from None
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error as e:
        raise BadDsn(f"bad PostgreSQL DSN: {without_password(str(e))}") from None
    # cp_reconnect: a relay outlives a database restart; the next call opens a fresh connection.
    return adbapi.ConnectionPool("psycopg", dsn, cp_reconnect=True, **pool_options)


def pool_from_dsn(dsn: str, **pool_options: Any) -> adbapi.ConnectionPool:
    """A pool on `sqlite:///absolute/path.db` or `postgresql://user@host:port/dbname`;
    ValueError naming the problem otherwise.  Nothing connects until the first call."""
    scheme, colon, _ = dsn.partition(":")
    if scheme == "sqlite":
        return sqlite_pool(dsn[len("sqlite://"):], **pool_options)
    if scheme in ("postgresql", "postgres"):
        return postgresql_pool(dsn, **pool_options)
    # Name only the scheme, when there is one: the rest of a DSN may hold a password.
    named = colon and re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme)
    problem = f"unsupported database {scheme!r}" if named else "not a database URL"
    raise ValueError(f"{problem}: use sqlite:///path or postgresql://user@host:port/dbname")


class SqlStore:
    """A database reached through one adbapi pool; subclasses hold the SQL."""

    def __init__(self, pool: adbapi.ConnectionPool):
        self._pool = pool
        self._pyformat = pool.dbapi.paramstyle != "qmark"

    def close(self) -> defer.Deferred[None]:
        """Stop the pool's threads, once the calls already running have finished."""
        self._pool.close()
        return defer.succeed(None)

    def _run(self, interaction: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return self._pool.runInteraction(interaction, *args)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._pyformat else sql

    def _execute(self, txn: adbapi.Transaction, sql: str, params: tuple = ()) -> None:
        txn.execute(self._sql(sql), params)

    def _execute_many(self, txn: adbapi.Transaction, sql: str, rows: Iterable[tuple]) -> None:
        txn.executemany(self._sql(sql), rows)

    def run_now(self, interaction: Callable[..., Any], *args: Any) -> Any:
        """`interaction` in one transaction at once, blocking, outside the reactor: for what
        a relay does once before it starts (`migrate_now`, the first-run account)."""
        connection = self._pool.connect()
        try:
            txn = adbapi.Transaction(self._pool, connection)
            try:
                result = interaction(txn, *args)
                txn.close()
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
        finally:
            self._pool.disconnect(connection)
        return result

    def migrate_now(self) -> None:
        """Apply the migrations the database lacks, now: the parent of worker processes does
        it before they start, so they never race each other to create the schema (their own
        first use then finds nothing to do)."""
        self.run_now(self._migrate, *self.schema)

    # (the table listing the migrations applied, the migrations), set by each store
    schema: Tuple[str, Sequence[Sequence[str]]]

    def _migrate(self, txn: adbapi.Transaction, version_table: str,
                 migrations: Sequence[Sequence[str]]) -> None:
        """Apply the migrations (migration N is migrations[N - 1]) that `version_table` does
        not list, inside `txn`.

        Each migration's version row is inserted before its statements: on SQLite that first
        write opens the transaction (Python's sqlite3 opens none for DDL alone), so a
        migration that is not re-runnable, such as ALTER TABLE ... ADD COLUMN, commits with
        its version or not at all, as on PostgreSQL.  Two processes migrating at once fail
        one transaction on the version's key; its caller retries and finds the work done."""
        self._execute(txn, f"CREATE TABLE IF NOT EXISTS {version_table} ("
                           "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        self._execute(txn, f"SELECT MAX(version) FROM {version_table}")
        current = txn.fetchone()[0] or 0
        for version in range(current + 1, len(migrations) + 1):
            self._execute(txn, f"INSERT INTO {version_table} (version, applied_at) VALUES (?, ?)",
                          (version, rfc3339(int(time.time()))))
            for statement in migrations[version - 1]:
                self._execute(txn, statement)
