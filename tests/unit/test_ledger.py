"""The usage ledger on the real TURN core (the sans-IO harness) with a fake clock.

Real backends (SQLite, JSON lines) run their I/O in the reactor's threads, so
those tests drive the harness and the ledger inside the reactor thread through `in_reactor`.
The small backends below are test backends, not stand-ins for a real part: one that stores in
memory (idempotently, as the interface demands) and can fail on cue, one whose writes wait
until the test lets them finish, and one that loses the answer to a write it did store.
"""
from __future__ import annotations

import json
from typing import Dict, List, Tuple

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from relay.ledger.jsonl import jsonl_backend
from relay.ledger.records import IUsageBackend, SessionEnded, SessionStarted, UsageDelta
from relay.ledger.sql import sqlite_backend
from relay.ledger.writer import (
    BATCH,
    GATHER,
    RETRY_CAP,
    RETRY_FIRST,
    SESSIONS_PER_LINE,
    SHUTDOWN_WAIT,
    Ledger,
)
from support.core_harness import Harness, error_code, open_session, traffic
from support.db import raw_rows

INTERVAL = 10
REGION = "eu-west"


@implementer(IUsageBackend)
class MemoryBackend:
    """Keeps records by key, as every backend must; the next `fail` writes fail."""

    def __init__(self, fail: int = 0):
        self.fail = fail
        self.offered: List[list] = []  # every batch, stored or not
        self.sessions: Dict[str, SessionStarted] = {}
        self.deltas: Dict[Tuple[str, int], UsageDelta] = {}
        self.ends: Dict[str, SessionEnded] = {}
        self.closed = False

    def write(self, records):
        self.offered.append(list(records))
        if self.fail:
            self.fail -= 1
            return defer.fail(ConnectionError("backend down"))
        for r in records:
            if isinstance(r, SessionStarted):
                self.sessions.setdefault(r.session_id, r)
            elif isinstance(r, UsageDelta):
                self.deltas.setdefault((r.session_id, r.seq), r)
            else:
                self.ends.setdefault(r.session_id, r)
        return defer.succeed(None)

    def close(self):
        self.closed = True
        return defer.succeed(None)

    def totals(self, session_id: str) -> Tuple[int, int, int, int]:
        deltas = [d for (s, _), d in self.deltas.items() if s == session_id]
        return (sum(d.bytes_from_client for d in deltas), sum(d.packets_from_client for d in deltas),
                sum(d.bytes_to_client for d in deltas), sum(d.packets_to_client for d in deltas))


@implementer(IUsageBackend)
class HeldBackend(MemoryBackend):
    """Each write waits until `release()`: a backend too slow for the traffic."""

    def __init__(self):
        super().__init__()
        self.held: List[Tuple[defer.Deferred, list]] = []

    def write(self, records):
        d = defer.Deferred()
        self.held.append((d, list(records)))
        return d

    def release(self):
        while self.held:
            d, records = self.held.pop(0)
            MemoryBackend.write(self, records)
            d.callback(None)


@implementer(IUsageBackend)
class LostAnswers:
    """Stores each batch in `inner`, then reports the first `lose` writes as failed: a commit
    whose answer the network lost.  `outcomes` says how each attempt ended."""

    def __init__(self, inner: IUsageBackend, lose: int):
        self.inner = inner
        self.lose = lose
        self.outcomes: defer.DeferredQueue = defer.DeferredQueue()

    def write(self, records):
        def answer(_):
            if self.lose:
                self.lose -= 1
                self.outcomes.put("lost")
                raise ConnectionError("connection lost before the commit's answer")
            self.outcomes.put("stored")
        return self.inner.write(records).addCallback(answer)

    def close(self):
        return self.inner.close()


@pytest.fixture
def ledger_log():
    """The ledger's log events, as (level, text)."""
    events: List[Tuple[str, str]] = []

    def observe(event):
        if event.get("log_namespace") == "turnrelay.ledger":
            events.append((event["log_level"].name, formatEvent(event)))
    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def counters(allocation) -> Tuple[int, int, int, int]:
    return (allocation.bytes_from_client, allocation.packets_from_client,
            allocation.bytes_to_client, allocation.packets_to_client)


def sql_totals(path, session_id):
    """A session's totals, number of deltas and last seq, read from the SQLite file."""
    (row,) = raw_rows(f"sqlite:///{path}", (
        "SELECT SUM(bytes_from_client), SUM(packets_from_client), SUM(bytes_to_client),"
        f" SUM(packets_to_client), COUNT(*), MAX(seq) FROM usage_deltas WHERE session_id = '{session_id}'"))
    return row


def test_deltas_in_sqlite_and_json_lines_sum_to_the_counters(tmp_path, in_reactor):
    db, lines = tmp_path / "usage.db", tmp_path / "usage.jsonl"
    harness, clock = Harness(), Clock()
    ledger = Ledger(harness.server, {"sqlite": sqlite_backend(f"path={db}"),
                                     "jsonl": jsonl_backend(f"path={lines}")},
                    REGION, clock, interval=INTERVAL, gather=0)
    in_reactor(ledger.startService)
    alice, bob = in_reactor(lambda: (open_session(harness), open_session(harness, "bob", 40001)))
    sessions = {"alice": alice.allocation, "bob": bob.allocation}
    in_reactor(traffic, alice, [b"a" * 100, b"b" * 7], [b"c" * 33])
    in_reactor(clock.advance, INTERVAL)
    in_reactor(clock.advance, INTERVAL)  # nothing relayed since: no delta
    in_reactor(traffic, alice, [b"d" * 5], [b"e" * 1200, b"f"])
    in_reactor(traffic, bob, [b"g" * 64], [])
    in_reactor(clock.advance, INTERVAL)
    in_reactor(traffic, alice, [b"h" * 9], [b"i" * 10])
    in_reactor(alice.refresh, 0)  # deleted: its final delta and its end are queued at once
    in_reactor(ledger.drained)
    alice_id = sessions["alice"].session_id
    assert sql_totals(db, alice_id) == (*counters(sessions["alice"]), 3, 3)
    in_reactor(traffic, bob, [], [b"j" * 3])
    in_reactor(ledger.stopService)  # bob's session ends with the relay, its last delta written

    assert counters(sessions["bob"]) == (64, 1, 3, 1)
    assert sql_totals(db, sessions["bob"].session_id) == (64, 1, 3, 1, 2, 2)
    rows = raw_rows(f"sqlite:///{db}", "SELECT session_id, account_id, username, region,"
                    " transport, client_address, relay_addresses, started_at, ended_at, end_reason"
                    " FROM sessions ORDER BY username")
    assert [row[:6] + row[9:] for row in rows] == [
        (alice_id, "acct-alice", "alice", REGION, "udp", "198.51.100.20:40000", "deleted"),
        (sessions["bob"].session_id, "acct-bob", "bob", REGION, "udp", "198.51.100.20:40001",
         "shutdown")]
    assert all(row[6].startswith("192.0.2.10:") for row in rows)
    assert rows[0][7] == "1970-01-12T13:46:40Z" and rows[0][8] == "1970-01-01T00:00:30Z"
    assert raw_rows(f"sqlite:///{db}", "PRAGMA journal_mode") == [("wal",)]
    assert [version for version, _ in raw_rows(f"sqlite:///{db}",
                                               "SELECT * FROM schema_version")] == [1, 2]

    records = [json.loads(line) for line in lines.read_text().splitlines()]
    for allocation in sessions.values():
        mine = [r for r in records if r["session_id"] == allocation.session_id]
        assert mine[0]["type"] == "session" and mine[-1]["type"] == "end"
        assert mine[0]["region"] == REGION and mine[0]["account_id"] == allocation.account.account_id
        usage = [r for r in mine if r["type"] == "usage"]
        assert [r["seq"] for r in usage] == list(range(1, len(usage) + 1))
        assert tuple(sum(r[k] for r in usage) for k in (
            "bytes_from_client", "packets_from_client", "bytes_to_client",
            "packets_to_client")) == counters(allocation)


def test_a_failing_backend_is_retried_with_backoff_and_counts_nothing_twice(tmp_path, in_reactor):
    db = tmp_path / "usage.db"
    flaky = LostAnswers(sqlite_backend(f"path={db}"), lose=3)
    memory = MemoryBackend(fail=2)
    harness, clock = Harness(), Clock()
    ledger = Ledger(harness.server, {"sqlite": flaky, "memory": memory}, REGION, clock,
                    interval=INTERVAL, gather=0)
    in_reactor(ledger.startService)
    assert in_reactor(flaky.outcomes.get) == "lost"  # the first write, of nothing, at start-up
    alice = in_reactor(open_session, harness)  # its start waits for each backend's retry
    allocation = alice.allocation
    in_reactor(traffic, alice, [b"x" * 10], [b"y" * 20])
    in_reactor(ledger.read_counters)  # a first delta joins the start in the queue
    # Each retry waits twice as long as the one before.  The first retry already stores the
    # start and the delta; the next two write them again, and store nothing more.
    for delay, expected in ((RETRY_FIRST, "lost"), (2 * RETRY_FIRST, "lost"),
                            (4 * RETRY_FIRST, "stored")):
        in_reactor(clock.advance, delay - 0.01)
        assert in_reactor(lambda: flaky.outcomes.pending) == []
        in_reactor(clock.advance, 0.01)
        assert in_reactor(flaky.outcomes.get) == expected
    assert [len(batch) for batch in memory.offered] == [0, 2, 2]  # failed, failed, stored
    in_reactor(clock.advance, INTERVAL)
    in_reactor(traffic, alice, [b"z" * 30], [])
    in_reactor(alice.refresh, 0)
    in_reactor(ledger.drained)
    in_reactor(ledger.stopService)
    assert counters(allocation) == (40, 2, 20, 1)
    assert sql_totals(db, allocation.session_id) == (40, 2, 20, 1, 2, 2)
    assert raw_rows(f"sqlite:///{db}", "SELECT COUNT(*) FROM sessions") == [(1,)]
    assert memory.totals(allocation.session_id) == (40, 2, 20, 1)
    assert memory.ends[allocation.session_id].end_reason == "deleted" and memory.closed


def test_the_backoff_is_capped():
    memory = MemoryBackend(fail=100)
    harness, clock = Harness(), Clock()
    ledger = Ledger(harness.server, {"memory": memory}, REGION, clock, gather=0)
    open_session(harness)
    delays = []
    while memory.fail:
        delays.append(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays[:3] == [RETRY_FIRST, 2 * RETRY_FIRST, 4 * RETRY_FIRST]
    assert max(delays) == RETRY_CAP and delays[-1] == RETRY_CAP
    clock.advance(RETRY_CAP)
    assert len(memory.sessions) == 1 and ledger.backlog() == 0


def test_a_full_queue_refuses_new_allocations_until_it_drains(ledger_log):
    held = HeldBackend()
    harness, clock = Harness(), Clock()
    ledger = Ledger(harness.server, {"slow": held}, REGION, clock, interval=INTERVAL, limit=3,
                    gather=0)
    ledger.startService()
    clients = [open_session(harness, port=40000 + i) for i in range(3)]  # 3 starts queued
    allocation = clients[0].allocation
    assert ledger.backlog() == 3
    late = harness.client("bob", address=("198.51.100.30", 40000))
    assert error_code(late.allocate()) == 508
    assert ledger_log == [("error", "usage ledger queue full: 3 records wait for backend slow "
                                    "(--accounting-queue 3); refusing new allocations (508)")]
    assert error_code(late.allocate()) == 508
    assert len(ledger_log) == 1  # loud, but not once per Allocate
    # While full, readings wait: the counters keep what the next reading will carry.
    traffic(clients[0], [b"q" * 50], [b"r" * 60])
    clock.advance(INTERVAL)
    assert ledger.backlog() == 3
    held.release()
    assert ledger.backlog() == 0
    assert ledger_log[-1] == ("info", "usage ledger queue has room again (0 of 3 records): "
                                      "recording new sessions")
    late.allocate_ok()
    clock.advance(INTERVAL)
    clients[0].refresh(0)
    held.release()
    assert held.totals(allocation.session_id) == (50, 1, 60, 1)
    assert len(held.sessions) == 4 and list(held.ends) == [allocation.session_id]


def test_a_full_queue_in_drop_mode_relays_new_sessions_unrecorded():
    held = HeldBackend()
    harness, clock = Harness(), Clock()
    ledger = Ledger(harness.server, {"slow": held}, REGION, clock, limit=2, when_full="drop",
                    gather=0)
    clients = [open_session(harness, port=40000 + i) for i in range(3)]  # the third: unrecorded
    recorded = [client.allocation.session_id for client in clients[:2]]
    assert ledger.unrecorded == 1
    held.release()
    for client in clients:
        client.refresh(0)
    held.release()
    assert list(held.sessions) == recorded and list(held.ends) == recorded


def test_shutdown_ends_live_sessions_and_waits_for_the_backends():
    held = HeldBackend()
    harness, clock = Harness(), Clock()
    ledger = Ledger(harness.server, {"slow": held}, REGION, clock, gather=0)
    ledger.startService()
    alice = open_session(harness)
    allocation = alice.allocation
    traffic(alice, [b"s" * 7], [])
    stopped = ledger.stopService()
    assert not stopped.called and not held.closed
    held.release()  # the start, then the final delta and the end
    held.release()
    assert stopped.called and held.closed
    assert held.ends[allocation.session_id].end_reason == "shutdown"
    assert held.totals(allocation.session_id) == (7, 1, 0, 0)


def test_shutdown_gives_up_on_a_stuck_backend_after_its_bound(ledger_log):
    held = HeldBackend()
    harness, clock = Harness(), Clock()
    ledger = Ledger(harness.server, {"stuck": held}, REGION, clock, gather=0)
    ledger.startService()
    open_session(harness)
    stopped = ledger.stopService()
    clock.advance(SHUTDOWN_WAIT - 0.1)
    assert not stopped.called
    clock.advance(0.1)
    assert stopped.called and held.closed
    assert ledger.backlog() == 2  # its start and its end
    assert ("error", "usage backend stuck: 2 records not written before shutdown, lost") \
        in ledger_log


def test_a_batch_is_at_most_BATCH_records():
    memory = MemoryBackend(fail=1)
    harness, clock = Harness(), Clock()
    ledger = Ledger(harness.server, {"memory": memory}, REGION, clock, gather=0)
    clients = [open_session(harness, port=40000 + i) for i in range(3)]
    ledger.queues[0].pending.extend([ledger.queues[0].pending[0]] * BATCH)  # a backlog
    clock.advance(RETRY_FIRST)
    assert [len(batch) for batch in memory.offered] == [1, BATCH, 2 + 1]
    assert len(memory.sessions) == len(clients)


def test_records_gather_for_a_moment_into_one_write_and_one_log_line(ledger_log):
    """Short sessions cost one write per GATHER seconds, not one or two each; a full batch
    goes at once.  The log names every ended session, SESSIONS_PER_LINE to a line."""
    memory = MemoryBackend()
    harness, clock = Harness(), Clock()
    ledger = Ledger(harness.server, {"memory": memory}, REGION, clock)
    ledger.startService()  # the first write, of nothing, goes at once
    count = SESSIONS_PER_LINE + 1
    clients = [open_session(harness, port=40000 + i) for i in range(count)]
    ended = [client.allocation.session_id for client in clients]
    clock.advance(GATHER - 0.01)
    assert memory.offered == [[]]
    clock.advance(0.01)
    assert [len(batch) for batch in memory.offered] == [0, count]
    for client in clients:
        client.refresh(0)
    clock.advance(GATHER)
    assert [len(batch) for batch in memory.offered] == [0, count, count]
    assert list(memory.ends) == ended
    assert [text for _, text in ledger_log if "usage recorded" in text] == [
        "usage recorded in memory for ended sessions " + " ".join(ended[:SESSIONS_PER_LINE]),
        f"usage recorded in memory for ended sessions {ended[-1]}"]
    queue = ledger.queues[0]
    queue.push([memory.offered[1][0]] * BATCH)  # a full batch does not wait
    assert [len(batch) for batch in memory.offered] == [0, count, count, BATCH]
    assert ledger.backlog() == 0
