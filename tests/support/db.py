"""Fixtures for the account database, registered for the whole suite by tests/conftest.py.

`store_dsn` runs a test once on SQLite and once on a real PostgreSQL, started once per session.

The store returns Deferreds, as it does in the relay.  Rather than a test dependency more
(pytest-twisted), the reactor runs in a daemon thread for the session and `in_reactor(f, *args)`
calls `f` there and waits for its Deferred: tests use the store exactly as the relay does, and a
blocking test thread cannot starve it.
"""
from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
from typing import Any, Callable, Dict, Iterator, List, Sequence

import psycopg
import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from support.postgres import fresh_schema, throwaway_postgres

TIMEOUT = 30.0


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    with throwaway_postgres() as dsn:
        yield dsn


@pytest.fixture
def sqlite_dsn(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'accounts.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_dsn(request) -> str:
    """A DSN of an empty database, on each backend in turn."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_dsn")
    return fresh_schema(request.getfixturevalue("postgres_dsn"))


@contextlib.contextmanager
def _reactor_thread() -> Iterator[Callable[..., Any]]:
    from twisted.internet import reactor

    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                              daemon=True)
    thread.start()

    def call(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        results: queue.Queue = queue.Queue()
        reactor.callFromThread(
            lambda: defer.maybeDeferred(f, *args, **kwargs).addBoth(results.put))
        result = results.get(timeout=TIMEOUT)
        if isinstance(result, Failure):
            result.raiseException()
        return result

    yield call
    reactor.callFromThread(reactor.stop)
    thread.join(TIMEOUT)


@pytest.fixture(scope="session")
def in_reactor() -> Iterator[Callable[..., Any]]:
    """in_reactor(f, *args, **kwargs): f's result, f running in the reactor's thread and the
    Deferred it returns waited for here (its failure raised here)."""
    with _reactor_thread() as call:
        yield call


async def create_accounts(dsn: str, names: Sequence[str],
                          suspended: Sequence[str] = ()) -> Dict[str, str]:
    """An account database at `dsn` holding `names`, those in `suspended` suspended: each
    one's API key.  Run it with `in_reactor`, as the relay runs the store."""
    from relay.storage.accounts import SUSPENDED, AccountStore
    store = AccountStore.from_dsn(dsn)
    try:
        await store.create_schema()
        keys = {name: await store.add_account(name) for name in names}
        for name in suspended:
            await store.set_status(name, SUSPENDED)
        return keys
    finally:
        await store.close()


def raw_rows(dsn: str, query: str) -> List[tuple]:
    """`query`'s rows read with the driver itself, around the store: what is really stored."""
    if dsn.startswith("sqlite:"):
        connection = sqlite3.connect(dsn[len("sqlite://"):])
        try:
            return connection.execute(query).fetchall()
        finally:
            connection.close()
    with psycopg.connect(dsn) as connection:
        return connection.execute(query).fetchall()
