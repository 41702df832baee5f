"""Client-address retention: old client addresses are blanked, usage is kept, on SQLite and on a
real PostgreSQL; migration 2 upgrades a ledger of version 1; a real relay applies it."""
import json
import subprocess

import pytest

from relay.ledger.records import SessionEnded, SessionStarted, UsageDelta
from relay.ledger.sql import MIGRATIONS
from support.accounting import backend_for, next_second
from support.aioice_client import relay_round_trips
from support.cli import run_cli
from support.db import raw_rows
from support.postgres import fresh_schema
from support.servers import PASSWORD, TWISTD, USER

SESSIONS = [SessionStarted(sid, "acme", "alice", "us-east", "udp", f"198.51.100.{n}:4000{n}",
                           ("203.0.113.7:50000",), "2026-01-01T00:00:00Z")
            for n, sid in enumerate(("old", "recent", "live"), 1)]
DELTAS = [UsageDelta(s.session_id, 1, 100 * n, n, 200 * n, n, "2026-01-01T00:00:10Z")
          for n, s in enumerate(SESSIONS, 1)]
ENDS = [SessionEnded("old", "2026-01-01T00:01:00Z", "deleted"),
        SessionEnded("recent", "2026-11-20T00:00:00Z", "expired")]
ADDRESSES = "SELECT session_id, client_address FROM sessions ORDER BY session_id"
USAGE = ("SELECT session_id, bytes_from_client, packets_from_client, bytes_to_client,"
         " packets_to_client FROM usage_deltas ORDER BY session_id")


def test_only_addresses_of_sessions_ended_before_the_cutoff_are_blanked(store_dsn, in_reactor):
    backend = backend_for(store_dsn)
    in_reactor(backend.write, [*SESSIONS, *DELTAS, *ENDS])
    usage = raw_rows(store_dsn, USAGE)
    assert in_reactor(backend.forget_client_addresses, "2026-11-01T00:00:00Z") == 1
    assert raw_rows(store_dsn, ADDRESSES) == [
        ("live", "198.51.100.3:40003"), ("old", None), ("recent", "198.51.100.2:40002")]
    assert in_reactor(backend.forget_client_addresses, "2026-11-01T00:00:00Z") == 0
    # The cutoff is exclusive, and a live session keeps its address whatever the cutoff.
    assert in_reactor(backend.forget_client_addresses, "2026-11-20T00:00:00Z") == 0
    assert in_reactor(backend.forget_client_addresses, "9999-12-31T23:59:59Z") == 1
    in_reactor(backend.close)
    assert raw_rows(store_dsn, ADDRESSES) == [
        ("live", "198.51.100.3:40003"), ("old", None), ("recent", None)]
    assert raw_rows(store_dsn, USAGE) == usage  # the usage, untouched
    assert raw_rows(store_dsn, "SELECT session_id, ended_at, end_reason, account_id, region"
                               " FROM sessions WHERE session_id = 'old'") == [
        ("old", "2026-01-01T00:01:00Z", "deleted", "acme", "us-east")]


def test_a_ledger_of_version_1_is_migrated_to_2(store_dsn, in_reactor):
    """As a relay of the previous version left it: migration 1 only, with a session in it."""
    statements = ["CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                  " applied_at TEXT NOT NULL)", *MIGRATIONS[0],
                  "INSERT INTO schema_version VALUES (1, '2026-11-01T00:00:00Z')"]
    first = backend_for(store_dsn)
    in_reactor(first._run, lambda txn: [first._execute(txn, sql) for sql in statements])
    in_reactor(first.close)
    backend = backend_for(store_dsn)
    in_reactor(backend.write, [SESSIONS[0], DELTAS[0], ENDS[0]])
    assert in_reactor(backend.forget_client_addresses, "2026-11-01T00:00:00Z") == 1
    in_reactor(backend.close)
    assert [v for v, _ in raw_rows(store_dsn, "SELECT * FROM schema_version ORDER BY version")] \
        == [1, 2]
    index = ("SELECT name FROM sqlite_master WHERE type = 'index'" if store_dsn.startswith(
        "sqlite:") else "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")
    assert ("sessions_with_client_address",) in raw_rows(store_dsn, index)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_relay_blanks_old_client_addresses_and_keeps_the_usage(kind, server_factory, tmp_path,
                                                                  request):
    if kind == "sqlite":
        dsn = f"sqlite://{tmp_path / 'usage.db'}"
        accounting = f"sqlite:path={tmp_path / 'usage.db'}"
    else:
        dsn = fresh_schema(request.getfixturevalue("postgres_dsn"))
        accounting = f"postgresql:dsn={dsn}"
    server = server_factory("--accounting", accounting, tcp=False, tls=False)
    relay_round_trips(server, USER, PASSWORD, [b"personal data?" * 10] * 3)
    server.stop()
    [(address,)] = raw_rows(dsn, "SELECT client_address FROM sessions")
    assert address.startswith("127.0.0.1:")

    def report():
        done = run_cli("usage", "--ledger", dsn, "--since", "2026-01-01", "--json")
        return json.loads(done.stdout)["total"]
    before, usage = report(), raw_rows(dsn, USAGE)
    assert before["total_bytes"] == 2 * 3 * 140

    next_second()  # the session ended before this second: 0 days ago is in the past
    lines = tmp_path / "usage.jsonl"
    # A JSON lines file takes one process's records: the relay refuses it with workers.
    server = server_factory("--accounting", accounting, "--accounting", f"jsonl:path={lines}",
                            "--client-address-retention", "0", "--workers", "1", tcp=False,
                            tls=False)
    server.read_until("usage backend jsonl keeps client addresses: "
                      "--client-address-retention does not apply to it")
    server.search(r"client-address retention: 1 client addresses of sessions ended before "
                  rf"\S+ blanked in {kind}")
    assert raw_rows(dsn, "SELECT client_address FROM sessions") == [(None,)]
    assert raw_rows(dsn, USAGE) == usage and report() == before
    server.stop()


def test_a_negative_retention_is_one_clear_line():
    result = subprocess.run([TWISTD, "-n", "turnrelay", "--client-address-retention", "-1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stderr.strip() == (
        "turnrelay: --client-address-retention: '-1': must not be negative")
