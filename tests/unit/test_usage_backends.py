"""The usage backends themselves: SQL on SQLite and on a real PostgreSQL, JSON lines, plugins."""
import json

import pytest

from relay.ledger.jsonl import jsonl_backend
from relay.ledger.plugins import installed, make_backend
from relay.ledger.records import SessionEnded, SessionStarted, UsageDelta
from support.accounting import backend_for
from support.db import raw_rows

START = SessionStarted("5e55", "acme", "alice", "us-east", "tls", "[2001:db8::7]:40000",
                       ("203.0.113.7:50000", "[2001:db8::10]:50002"), "2026-11-23T12:00:00Z")
DELTAS = [UsageDelta("5e55", 1, 1000, 10, 2000, 20, "2026-11-23T12:00:10Z"),
          UsageDelta("5e55", 2, 5, 1, 0, 0, "2026-11-23T12:00:20Z")]
END = SessionEnded("5e55", "2026-11-23T12:00:21Z", "expired")


def test_a_batch_written_twice_is_stored_once(store_dsn, in_reactor):
    backend = backend_for(store_dsn)
    in_reactor(backend.write, [START, DELTAS[0]])
    # The retry of a batch whose answer was lost, with what was queued since.
    in_reactor(backend.write, [START, DELTAS[0], DELTAS[1], END])
    in_reactor(backend.write, [DELTAS[1], END])
    in_reactor(backend.close)
    assert raw_rows(store_dsn, "SELECT session_id, seq, bytes_from_client, packets_from_client,"
                    " bytes_to_client, packets_to_client, at FROM usage_deltas ORDER BY seq") \
        == [tuple(vars(d).values()) for d in DELTAS]
    assert raw_rows(store_dsn, "SELECT * FROM sessions") == [
        ("5e55", "acme", "alice", "us-east", "tls", "[2001:db8::7]:40000",
         "203.0.113.7:50000,[2001:db8::10]:50002", "2026-11-23T12:00:00Z",
         "2026-11-23T12:00:21Z", "expired")]


def test_the_schema_is_migrated_once(store_dsn, in_reactor):
    first = backend_for(store_dsn)
    in_reactor(first.write, [START])
    in_reactor(first.close)
    second = backend_for(store_dsn)  # the next start of the relay, or another relay
    in_reactor(second.write, [END])
    in_reactor(second.close)
    assert [version for version, _ in raw_rows(store_dsn, "SELECT * FROM schema_version")] == [1, 2]
    assert raw_rows(store_dsn, "SELECT end_reason FROM sessions") == [("expired",)]


def test_usage_per_account_and_day_is_one_query_on_either_database(store_dsn, in_reactor):
    """What a report will ask: the schema answers it with the same SQL on both."""
    backend = backend_for(store_dsn)
    other = SessionStarted("0the", "zeta", "bob", "eu-west", "udp", "198.51.100.1:1", (),
                           "2026-11-24T23:59:59Z")
    in_reactor(backend.write, [START, *DELTAS, END, other,
                               UsageDelta("0the", 1, 7, 1, 8, 1, "2026-11-25T00:00:01Z")])
    in_reactor(backend.close)
    assert raw_rows(store_dsn, "SELECT s.account_id, s.region, SUBSTR(d.at, 1, 10) AS day,"
                    " SUM(d.bytes_from_client + d.bytes_to_client) FROM usage_deltas d"
                    " JOIN sessions s ON s.session_id = d.session_id"
                    " GROUP BY s.account_id, s.region, day ORDER BY s.account_id") == [
        ("acme", "us-east", "2026-11-23", 3005), ("zeta", "eu-west", "2026-11-25", 15)]


def test_json_lines_one_record_a_line(tmp_path, in_reactor):
    path = tmp_path / "usage.jsonl"
    backend = jsonl_backend(f"path={path}")
    in_reactor(backend.write, [START, DELTAS[0]])
    in_reactor(backend.write, [END])
    in_reactor(backend.close)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["type"] for line in lines] == ["session", "usage", "end"]
    assert lines[0]["relay_addresses"] == list(START.relay_addresses)
    assert lines[1] == {"type": "usage", "session_id": "5e55", "seq": 1, "bytes_from_client": 1000,
                        "packets_from_client": 10, "bytes_to_client": 2000,
                        "packets_to_client": 20, "at": "2026-11-23T12:00:10Z"}


def test_the_built_in_backends_are_plugins():
    assert {"sqlite", "postgresql", "jsonl"} <= set(installed())


@pytest.mark.parametrize("description, problem", [
    ("nosuch:x=1", "'nosuch' is not an installed backend (see --help-accounting)"),
    ("sqlite", "sqlite: path=... is required"),
    ("sqlite:file=/tmp/u.db", "sqlite: unknown argument 'file'; expected path"),
    ("sqlite:path=/no/such/secret-dir/usage.db", "sqlite: path: its directory does not exist"),
    ("jsonl:path=/no/such/secret-dir/usage.jsonl",
     "jsonl: path: cannot open it: No such file or directory"),
    ("postgresql:dsn=mysql://admin:hunter2@db/usage",
     "postgresql: dsn: expected postgresql://USER@HOST:PORT/DBNAME"),
    ("postgresql:dsn=postgresql://admin:hunter2@[::1/db",
     "postgresql: dsn: not a valid PostgreSQL DSN"),
    ("postgresql:dsn=postgresql://admin:hunter2@db/usage?nonsense=1",
     "postgresql: dsn: not a valid PostgreSQL DSN"),
])
def test_a_bad_description_names_the_problem_never_the_value(description, problem):
    with pytest.raises(ValueError) as refused:
        make_backend(description)
    assert str(refused.value) == problem
