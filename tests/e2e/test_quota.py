"""Monthly byte quotas on real relays with the `db` auth backend and a SQL usage ledger: an
account that relays past its quota loses its live allocations and gets 486, on SQLite (one
relay, its own ledger) and on a PostgreSQL ledger shared by two relays (on both).

Each wait is for a log line or a reply, bounded by a deadline; BOUND is the design's one
flush (--accounting-interval 1), one quota reading (2 s) and one tick (1 s), plus slack.
"""
import json
import subprocess
import time

import pytest
from twisted.internet.task import Clock

from relay.core.credentials import Account
from relay.ledger.monthly_quota import MonthlyUsage, QuotaTracker, month_start
from relay.ledger.records import SessionStarted, UsageDelta
from relay.ledger.sql import MIGRATIONS, sqlite_backend
from relay.ledger.writer import Ledger
from relay.proto import stun
from relay.util.units import parse_megabytes
from support.cli import cli
from support.core_harness import Harness, open_session, traffic
from support.db import raw_rows
from support.postgres import fresh_schema
from support.relay_clients import UDP, relay_through
from support.servers import REALM, TWISTD, running_echo_peer
from support.wire_client import WireClient, error_code

BOUND = 6.0
QUOTA = 20_000  # bytes: --monthly-quota-mb 0.02


def allocate(relay, credential):
    client = WireClient((relay.host, relay.port), credential["username"],
                        credential["password"], REALM)
    return client, client.request(stun.ALLOCATE, UDP)


@pytest.fixture(params=["sqlite", "postgresql"])
def quota_fleet(request, server_factory, tmp_path):
    """Account `acme` with a 20 kB quota and `other` without, and the relays: one with its own
    SQLite ledger, or two sharing a PostgreSQL account database and ledger."""
    secret = tmp_path / "rest.secret"
    secret.write_text("shared-rest-secret-1\n")
    if request.param == "sqlite":
        dsn = request.getfixturevalue("sqlite_dsn")
        ledgers = [["--accounting", f"sqlite:path={tmp_path / 'usage.db'}"]]
    else:
        dsn = fresh_schema(request.getfixturevalue("postgres_dsn"))
        ledgers = [["--accounting", f"postgresql:dsn={dsn}"]] * 2
    cli("account", "add", "acme", "--monthly-quota-mb", "0.02", "--db", dsn)
    cli("account", "add", "other", "--db", dsn)
    relays = [server_factory("--auth", f"db:dsn={dsn},secret-file={secret}", *ledger,
                             "--accounting-interval", "1", users=(), tls=False)
              for ledger in ledgers]
    for relay in relays:
        relay.read_until("account database loaded")

    def token(account):
        return json.loads(cli("token", "--account", account, "--secret-file", str(secret)))
    return relays, token


def test_an_account_past_its_quota_is_closed_and_refused_on_every_relay(quota_fleet):
    relays, token = quota_fleet
    acme, other = token("acme"), token("other")
    held = [allocate(relay, acme) for relay in relays]
    assert all(reply.cls == stun.SUCCESS for _, reply in held)
    bystander, reply = allocate(relays[0], other)
    assert reply.cls == stun.SUCCESS
    with running_echo_peer() as peer:
        # Under the quota: 9 round trips are 18 000 bytes, and the allocations live on.
        relay_through(held[0][0], peer, 9)
        relay_through(bystander, peer, 15)  # another account's usage counts for it alone
        assert held[-1][0].request(stun.REFRESH).cls == stun.SUCCESS
        relay_through(held[0][0], peer, 2)  # 22 000 bytes: past the quota
        crossed = time.monotonic()
        for relay in relays:
            relay.search(r"account acme reached its monthly quota: 2\d{4} of 20000 bytes",
                         timeout=BOUND)
            relay.read_until("reason=quota", timeout=BOUND)
            assert time.monotonic() - crossed <= BOUND
        for relay in relays:
            client, reply = allocate(relay, acme)
            client.close()
            assert error_code(reply) == 486
        # Its allocations are gone; the other account's lives on.
        assert error_code(held[0][0].request(stun.REFRESH)) == 437
        assert bystander.request(stun.REFRESH).cls == stun.SUCCESS
    for client in [bystander] + [client for client, _ in held]:
        client.close()


def test_static_users_get_their_accounts_quota_or_the_relay_wide_one(server_factory, tmp_path):
    """A users file's [accounts.NAME] monthly-quota-mb wins over --monthly-quota-mb (0 in the
    file: unlimited); each relay here keeps its own SQLite ledger (in its --state-dir)."""
    users = tmp_path / "users.toml"
    users.write_text('[users.alice]\npassword = "wonderland"\naccount = "acme"\n'
                     '[users.carol]\npassword = "wonderland"\naccount = "free"\n'
                     '[accounts.acme]\nmonthly-quota-mb = 0.009\n'
                     '[accounts.free]\nmonthly-quota-mb = 0\n')
    flags = ("--monthly-quota-mb", "0.005", "--accounting-interval", "1")
    by_file = server_factory("--users-file", str(users), *flags, users=(), tls=False,
                             state_dir=str(tmp_path / "one"))
    by_flag = server_factory(*flags, users=[("bob", "wonderland")], tls=False,
                             state_dir=str(tmp_path / "two"))
    with running_echo_peer() as peer:
        free, reply = allocate(by_file, {"username": "carol", "password": "wonderland"})
        assert reply.cls == stun.SUCCESS
        relay_through(free, peer, 3)  # 6000 bytes: past the flag's 5000, but unlimited
        for relay, user, trips in ((by_file, "alice", 5), (by_flag, "bob", 3)):
            client, reply = allocate(relay, {"username": user, "password": "wonderland"})
            assert reply.cls == stun.SUCCESS
            relay_through(client, peer, trips - 1)  # under the quota (alice: 8000 of 9000 bytes)
            relay_through(client, peer, 1)  # at or past it
            line = relay.read_until(f"allocation closed user={user} ", timeout=BOUND)
            assert "reason=quota" in line and f"from_client={trips}/" in line, line
            again, reply = allocate(relay, {"username": user, "password": "wonderland"})
            assert error_code(reply) == 486
            for c in (client, again):
                c.close()
        # The readings that closed alice's allocation saw carol's usage too.
        assert free.request(stun.REFRESH).cls == stun.SUCCESS
        free.close()


def test_the_ledger_sums_this_months_billable_bytes_only(tmp_path, in_reactor):
    """Month rollover: deltas of the previous month do not count, whatever their session."""
    backend = sqlite_backend(f"path={tmp_path / 'usage.db'}")
    start = SessionStarted("s1", "acme", "u", "r", "udp", "192.0.2.1:1", ("192.0.2.2:2",),
                           "2026-10-31T23:59:00Z")
    in_reactor(backend.write, [
        start, SessionStarted("s2", "beta", "u", "r", "udp", "192.0.2.1:1", (), start.started_at),
        UsageDelta("s1", 1, 100, 1, 200, 1, "2026-10-31T23:59:59Z"),
        UsageDelta("s1", 2, 10, 1, 20, 1, "2026-11-01T00:00:00Z"),
        UsageDelta("s2", 1, 5, 1, 5, 1, "2026-11-02T00:00:00Z")])
    since = month_start(1_795_000_000)  # 2026-11-18
    assert since == "2026-11-01T00:00:00Z"
    assert in_reactor(backend.billable_since, since, ["acme"]) == {"acme": 30}
    assert in_reactor(backend.billable_since, since, ["acme", "beta", "nobody"]) == {
        "acme": 30, "beta": 10}
    assert in_reactor(backend.billable_since, "2026-10-01T00:00:00Z", ["acme"]) == {"acme": 330}
    in_reactor(backend.close)
    assert raw_rows(f"sqlite:///{tmp_path / 'usage.db'}",
                    "SELECT MAX(version) FROM schema_version") == [(len(MIGRATIONS),)]


def test_stored_plus_unstored_usage_is_every_byte_at_any_moment(tmp_path, in_reactor):
    """What a quota reading adds up, on the real core and a real SQLite ledger: live
    counters, queued deltas, a write under way and stored deltas, never a byte twice."""
    harness, clock = Harness(), Clock()
    backend = sqlite_backend(f"path={tmp_path / 'usage.db'}")
    ledger = Ledger(harness.server, {"sqlite": backend}, "r", clock, interval=10, gather=0)
    usage = MonthlyUsage(ledger, "sqlite", backend)
    since = month_start(clock.seconds())  # the fake clock's month: 1970-01
    accounts = ["acct-alice", "acct-bob", "acct-nobody"]
    in_reactor(ledger.startService)
    alice, bob = in_reactor(lambda: (open_session(harness), open_session(harness, "bob", 40001)))

    def read_after(step=lambda: None):
        """The reading issued right after `step`, in the same turn of the reactor."""
        def both():
            step()
            return usage.read(since, accounts)
        return in_reactor(both)

    assert read_after() == {"acct-alice": 0, "acct-bob": 0, "acct-nobody": 0}
    in_reactor(traffic, alice, [b"a" * 100], [b"b" * 30])
    assert read_after() == {"acct-alice": 130, "acct-bob": 0, "acct-nobody": 0}  # live only
    # A reading queued, its write issued, then the read: it runs after the write.
    assert read_after(lambda: clock.advance(10))["acct-alice"] == 130
    in_reactor(traffic, alice, [b"c" * 7], [])
    in_reactor(traffic, bob, [b"d" * 64], [b"e" * 3])
    assert read_after() == {"acct-alice": 137, "acct-bob": 67, "acct-nobody": 0}
    # Alice's session ends: its last delta queued as the session goes.
    assert read_after(lambda: alice.refresh(0)) == {"acct-alice": 137, "acct-bob": 67,
                                                     "acct-nobody": 0}
    # Bob's periodic delta being written, and his last one queued behind it, unwritten.
    assert read_after(lambda: (clock.advance(10), traffic(bob, [b"f" * 10], []),
                               bob.refresh(0))) == {"acct-alice": 137, "acct-bob": 77,
                                                    "acct-nobody": 0}
    in_reactor(ledger.drained)
    assert read_after() == {"acct-alice": 137, "acct-bob": 77, "acct-nobody": 0}
    assert ledger._ended == {}  # forgotten once every queue is empty
    in_reactor(ledger.stopService)


def test_a_quota_lifted_to_unlimited_applies_at_the_next_reading(tmp_path, in_reactor):
    """Quotas come with each login: one saying unlimited (0) takes the account out of the
    readings at once, and the next one finds it no longer over (it used to be read against
    the old quota for an hour).  Real core, real SQLite ledger and usage reading."""
    harness = Harness()
    backend = sqlite_backend(f"path={tmp_path / 'usage.db'}")
    ledger = Ledger(harness.server, {"sqlite": backend}, "r", Clock(), interval=10)
    in_reactor(backend.write, [
        SessionStarted("s1", "acme", "u", "r", "udp", "192.0.2.1:1", (), "2026-11-02T00:00:00Z"),
        UsageDelta("s1", 1, 100, 1, 50, 1, "2026-11-02T00:00:10Z")])
    tracker = QuotaTracker(harness.server, MonthlyUsage(ledger, "sqlite", backend),
                           default_quota=0, clock=lambda: 1_795_000_000.0)  # 2026-11-18
    limited = Account("acme", monthly_quota_bytes=100)
    lifted = Account("acme", monthly_quota_bytes=0)
    assert not in_reactor(tracker.over_quota, limited)  # first seen: let through
    in_reactor(tracker.poll)
    assert in_reactor(tracker.over_quota, limited)  # 150 of 100 bytes
    # The operator lifts the quota: this Allocate still meets the last reading, the next not.
    assert in_reactor(tracker.over_quota, lifted)
    in_reactor(tracker.poll)
    assert not in_reactor(tracker.over_quota, lifted)
    assert "acme" in tracker.active  # the usage triggers still watch it
    in_reactor(backend.close)


@pytest.mark.parametrize("text, expected", [("0", 0), ("5", 5_000_000), ("0.02", 20_000),
                                            ("1.000001", 1_000_001)])
def test_megabytes_are_decimal(text, expected):
    assert parse_megabytes(text) == expected


@pytest.mark.parametrize("text, problem", [("-1", "0 \\(unlimited\\) or more"),
                                           ("0.0000001", "at most 6 decimals"),
                                           ("lots", "not a number"), ("inf", "0 \\(unlimited\\)")])
def test_bad_megabytes_are_refused(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_megabytes(text)


def test_a_quota_flag_without_a_sql_ledger_is_a_one_line_error(tmp_path):
    result = subprocess.run([TWISTD, "-n", "turnrelay", "--monthly-quota-mb", "5", "--workers", "1",
                             "--accounting", f"jsonl:path={tmp_path / 'u.jsonl'}",
                             "--state-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--monthly-quota-mb: needs a sqlite or postgresql --accounting backend" in (
        result.stdout + result.stderr)
    bad = subprocess.run([TWISTD, "-n", "turnrelay", "--monthly-quota-mb", "-3"],
                         capture_output=True, text=True, timeout=60)
    assert bad.stderr.strip().splitlines()[-1] == (
        "turnrelay: --monthly-quota-mb: '-3': must be 0 (unlimited) or more megabytes")
