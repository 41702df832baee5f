"""Reading usage: `turnrelay usage` and the usage API over a ledger that real relays wrote.

A module fixture builds one ledger per database (SQLite, PostgreSQL): a relay in region us-east
relays sessions for two accounts, a rate change takes effect between its first session and the
next ones, then a relay in region eu-west (which keeps running, serving the API) relays one
more.  Every expectation is computed here from the session records themselves, read with the
database driver: what a report says must equal those sums, exactly.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from support.accounting import next_second
from support.aioice_client import relay_round_trips
from support.api import Api
from support.cli import run_cli
from support.db import create_accounts, raw_rows
from support.postgres import fresh_schema
from support.servers import PASSWORD, Server, start_server

US_RATE_BEFORE, US_RATE_AFTER, EU_RATE = Decimal("0.1234567"), Decimal("0.98765"), Decimal("2.5")
USERS = {"alice": "acme", "bob": "acme", "carol": "globex"}
USERS_FILE = "".join(f'[users.{user}]\npassword = "{PASSWORD}"\naccount = "{account}"\n\n'
                     for user, account in USERS.items())
DELTAS = ("SELECT s.session_id, s.account_id, s.region, d.at, d.bytes_from_client,"
          " d.bytes_to_client FROM sessions s JOIN usage_deltas d ON d.session_id = s.session_id")


@dataclass
class Ledger:
    dsn: str
    rate_flags: List[str]
    effective: str                 # when us-east's second rate takes effect
    api: Server                    # the eu-west relay, still running, serving the API
    api_port: int
    keys: Dict[str, str]

    def deltas(self) -> List[Tuple[str, str, str, str, int, int]]:
        """Every delta with its session's account and region: the session records."""
        return [(sid, account, region, at, int(sent), int(received))
                for sid, account, region, at, sent, received in raw_rows(self.dsn, DELTAS)]

    def rate(self, region: str, at: str) -> Decimal:
        if region == "eu-west":
            return EU_RATE
        return US_RATE_AFTER if at >= self.effective else US_RATE_BEFORE

    def expected(self, key, account: Optional[str] = None) -> Dict[str, dict]:
        """Rows keyed by `key(delta)`, summed here from the records, charged per docs/accounting.md's
        rule: each delta at its region's rate at its time, exact, rounded half up once."""
        rows: Dict[str, dict] = defaultdict(lambda: {"sessions": set(), "sent": 0,
                                                     "received": 0, "exact": Decimal(0)})
        for delta in self.deltas():
            sid, owner, region, at, sent, received = delta
            if account is not None and owner != account:
                continue
            row = rows[key(delta)]
            row["sessions"].add(sid)
            row["sent"] += sent
            row["received"] += received
            row["exact"] += (sent + received) * self.rate(region, at)
        return {group: {"sessions": len(row["sessions"]), "bytes_sent": row["sent"],
                        "bytes_received": row["received"],
                        "total_bytes": row["sent"] + row["received"],
                        "mb": _mb(row["sent"] + row["received"]),
                        "charge": str((row["exact"] / 10 ** 6).quantize(
                            Decimal("0.000001"), rounding=ROUND_HALF_UP))}
                for group, row in rows.items()}


def _mb(total: int) -> str:
    return f"{total // 10 ** 6}.{total % 10 ** 6:06d}"


def _relay(server: Server, user: str, payloads: List[bytes]) -> str:
    """One more session of `user` relaying `payloads` to an echo peer and back, stored: its
    id."""
    relay_round_trips(server, user, PASSWORD, payloads)
    earlier = "".join(f"(?!{sid})" for sid in _SESSIONS)
    session = server.search(rf"allocation closed user={user} .*from_client=[1-9].* "
                            rf"session={earlier}(\w+)").group(1)
    server.usage_recorded(session)
    _SESSIONS.append(session)
    return session


_SESSIONS: List[str] = []


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ledger(request, tmp_path_factory, in_reactor) -> Iterator[Ledger]:  # noqa: F811
    from support.servers import free_port
    tmp = tmp_path_factory.mktemp(f"ledger-{request.param}")
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp / 'usage.db'}"
        accounting = f"sqlite:path={tmp / 'usage.db'}"
    else:
        dsn = fresh_schema(request.getfixturevalue("postgres_dsn"))
        accounting = f"postgresql:dsn={dsn}"
    (tmp / "users.toml").write_text(USERS_FILE)
    common = ["--users-file", str(tmp / "users.toml"), "--accounting", accounting,
              "--accounting-interval", "1"]
    us_east = start_server(*common, "--region", "us-east", users=(), tcp=False, tls=False,
                           state_dir=str(tmp / "us-east"))
    try:
        first = _relay(us_east, "alice", [b"a" * 1000] * 7)
        next_second()
        second = _relay(us_east, "alice", [b"b" * 1499] * 5)
        _relay(us_east, "carol", [b"c" * 333] * 3)
    finally:
        us_east.stop()
    # The rate changes between alice's two sessions: at the first delta of her second.
    times = [(sid, at) for sid, at in raw_rows(dsn, "SELECT session_id, at FROM usage_deltas")]
    effective = min(at for sid, at in times if sid == second)
    assert max(at for sid, at in times if sid == first) < effective
    (tmp / "rates.toml").write_text(
        f'[[rates.us-east]]\nrate_per_mb = "{US_RATE_BEFORE}"\neffective = 2026-01-01\n\n'
        f'[[rates.us-east]]\nrate_per_mb = {US_RATE_AFTER}\neffective = {effective}\n')
    rate_flags = ["--rate-table", str(tmp / "rates.toml"), "--region", "eu-west",
                  "--rate-per-mb", str(EU_RATE)]

    accounts = f"sqlite:///{tmp / 'accounts.db'}"
    keys = in_reactor(create_accounts, accounts, ("acme", "globex"))
    (tmp / "mint.secret").write_text("usage-report-secret\n")
    api_port = free_port()
    eu_west = start_server(*common, *rate_flags, "--api-port", str(api_port), "--api-db",
                           accounts, "--api-secret-file", str(tmp / "mint.secret"),
                           users=(), tcp=False, tls=False, state_dir=str(tmp / "eu-west"))
    try:
        _relay(eu_west, "bob", [b"d" * 777] * 4)
        yield Ledger(dsn, rate_flags, effective, eu_west, api_port, keys)
    finally:
        eu_west.stop()


def report(ledger: Ledger, *flags: str) -> dict:
    """`turnrelay usage --json` of the whole test's usage, as parsed JSON."""
    done = run_cli("usage", "--ledger", ledger.dsn, "--since", "2026-01-01", "--json",
                     *ledger.rate_flags, *flags)
    return json.loads(done.stdout)


def as_rows(answer: dict, by: str) -> Dict[str, dict]:
    return {row.pop(by): row for row in answer["rows"]}


@pytest.mark.parametrize("by, key", [
    ("account", lambda d: d[1]), ("region", lambda d: d[2]), ("session", lambda d: d[0]),
    ("day", lambda d: d[3][:10]), ("month", lambda d: d[3][:7]),
])
def test_report_rows_are_the_sums_of_the_session_records(ledger, by, key):
    answer = report(ledger, "--by", by)
    expected = ledger.expected(key)
    assert as_rows(answer, by) == expected
    total = answer["total"]
    assert total.pop(by) == "all"
    assert total == ledger.expected(lambda d: "all")["all"]
    assert total["bytes_sent"] == sum(d[4] for d in ledger.deltas())


def test_charges_use_each_region_rate_in_effect_at_the_time(ledger):
    by_session = as_rows(report(ledger, "--by", "session"), "session")
    deltas = ledger.deltas()
    for sid, row in by_session.items():
        region = {d[0]: d[2] for d in deltas}[sid]
        at = min(d[3] for d in deltas if d[0] == sid)
        rate = EU_RATE if region == "eu-west" else (
            US_RATE_AFTER if at >= ledger.effective else US_RATE_BEFORE)
        exact = Decimal(row["total_bytes"]) * rate / 10 ** 6
        assert Decimal(row["charge"]) == exact.quantize(Decimal("0.000001"), ROUND_HALF_UP)
    # Without the table, us-east's usage has no rate: its charge is blank, never zero.
    done = run_cli("usage", "--ledger", ledger.dsn, "--since", "2026-01-01", "--by", "region",
                     "--json", "--region", "eu-west", "--rate-per-mb", str(EU_RATE))
    regions = as_rows(json.loads(done.stdout), "region")
    assert regions["us-east"]["charge"] is None and regions["eu-west"]["charge"] is not None
    assert done.stderr.strip() == ("turnrelay: no rate for some of region 'us-east''s usage "
                                   "(--rate-per-mb, --rate-table): its charge is left blank")


def test_one_account_and_a_window(ledger):
    acme = report(ledger, "--account", "acme", "--by", "session")
    expected = ledger.expected(lambda d: d[0], account="acme")
    assert {sid: row["total_bytes"] for sid, row in as_rows(acme, "session").items()} == {
        sid: row["total_bytes"] for sid, row in expected.items()}
    assert acme["total"]["sessions"] == 3
    # The window is half-open: usage at `until` is not in it, usage at `since` is.
    first = min(d[3] for d in ledger.deltas())
    before = run_cli("usage", "--ledger", ledger.dsn, "--since", "2026-01-01", "--until",
                       first, "--json")
    assert json.loads(before.stdout)["rows"] == []
    assert json.loads(before.stdout)["total"]["total_bytes"] == 0


def test_the_table_has_a_row_per_group_and_the_total(ledger):
    table = run_cli("usage", "--ledger", ledger.dsn, "--since", "2026-01-01",
                      *ledger.rate_flags).stdout.splitlines()
    assert table[0].split() == ["ACCOUNT", "SESSIONS", "BYTES", "SENT", "BYTES", "RECEIVED",
                                "TOTAL", "BYTES", "MB", "CHARGE"]
    expected = ledger.expected(lambda d: d[1])
    everything = ledger.expected(lambda d: "TOTAL")["TOTAL"]
    assert [line.split() for line in table[1:]] == [
        [group, str(row["sessions"]), str(row["bytes_sent"]), str(row["bytes_received"]),
         str(row["total_bytes"]), _mb(row["total_bytes"]), row["charge"]]
        for group, row in [*sorted(expected.items()), ("TOTAL", everything)]]


@pytest.mark.parametrize("argv, status, error", [
    (["--since", "2026-11-23T12:00:00"], 2, "turnrelay usage: argument --since: "
     "'2026-11-23T12:00:00' has no UTC offset: end it with Z"),
    (["--since", "2026-11-23", "--until", "2026-11-22"], 2,
     "turnrelay usage: --until 2026-11-22T00:00:00Z is not after --since 2026-11-23T00:00:00Z"),
    (["--since", "2026-11-23", "--by", "week"], 2, None),
    (["--since", "2026-11-23", "--rate-per-mb", "1,5"], 2,
     "turnrelay usage: --rate-per-mb: '1,5' is not a decimal number such as 0.0004"),
])
def test_bad_arguments_are_one_line(argv, status, error, tmp_path):
    done = run_cli("usage", "--ledger", f"sqlite://{tmp_path}/none.db", *argv, status=status)
    if error is not None:
        assert done.stderr.strip() == error


def test_a_missing_ledger_is_one_line(tmp_path, postgres_dsn):  # noqa: F811
    missing = run_cli("usage", "--ledger", f"sqlite://{tmp_path}/none.db", "--since",
                        "2026-11-01", status=1)
    assert missing.stderr.strip() == f"turnrelay: no ledger at {tmp_path}/none.db: no such file"
    assert not (tmp_path / "none.db").exists()
    empty = run_cli("usage", "--ledger", fresh_schema(postgres_dsn), "--since", "2026-11-01",
                      status=1)
    assert empty.stderr.strip() == ("turnrelay: no usage ledger in this database yet: no relay "
                                    "has written to it (its schema_version table is missing)")
    no_ledger = run_cli("usage", "--since", "2026-11-01", status=2)
    assert no_ledger.stderr.strip() == ("turnrelay usage: --ledger DSN (or TURNRELAY_LEDGER) is "
                                        "required")


# -- the usage API, on the eu-west relay's --api-port ----------------------------------------

def api_get(ledger: Ledger, path: str, account: Optional[str] = "acme",
            key_of: Optional[str] = None):
    """GET `path` with `account`'s id and the API key of `key_of` (default: its own)."""
    api = Api(ledger.api, ledger.api_port, None, ledger.keys)
    auth = None if account is None else (account, ledger.keys[key_of or account])
    return api.request("GET", path, auth)


@pytest.mark.parametrize("granularity, key", [
    ("day", lambda d: d[3][:10]), ("month", lambda d: d[3][:7]), ("all", lambda d: "all"),
])
def test_the_usage_api_gives_the_sums_of_the_account_s_records(ledger, granularity, key):
    for account in ("acme", "globex"):
        answer = api_get(ledger, f"/v1/accounts/{account}/usage?start=2026-01-01"
                                 f"&granularity={granularity}", account)
        assert answer.status == 200, answer.body
        assert answer.headers["Cache-Control"] == "no-store"
        body = answer.body
        assert (body["account"], body["start"], body["granularity"]) == (
            account, "2026-01-01T00:00:00Z", granularity)
        assert {row.pop("period"): row for row in body["usage"]} == ledger.expected(
            key, account=account)
        assert body["total"].pop("period") == "all"
        assert body["total"] == ledger.expected(lambda d: "all", account=account)["all"]


def test_sessions_come_in_pages_and_sum_to_the_usage(ledger):
    path = "/v1/accounts/acme/sessions?start=2026-01-01&limit=2"
    sessions = []
    while path is not None:
        answer = api_get(ledger, path)
        assert answer.status == 200, answer.body
        assert len(answer.body["sessions"]) <= 2
        sessions += answer.body["sessions"]
        path = answer.body["next_page_uri"]
    expected = ledger.expected(lambda d: d[0], account="acme")
    assert len(sessions) == len(expected) == 3
    assert [s["started_at"] for s in sessions] == sorted(s["started_at"] for s in sessions)
    counted = ("bytes_sent", "bytes_received", "total_bytes", "mb", "charge")
    for session in sessions:
        row = expected[session["session_id"]]
        assert {k: session[k] for k in counted} == {k: row[k] for k in counted}
        assert session["transport"] == "udp" and session["end_reason"] == "deleted"
        assert session["client_address"].startswith("127.0.0.1:")
        assert session["started_at"] <= session["ended_at"]
    assert {s["region"] for s in sessions} == {"us-east", "eu-west"}
    usage = api_get(ledger, "/v1/accounts/acme/usage?start=2026-01-01&granularity=all").body
    assert sum(s["total_bytes"] for s in sessions) == usage["total"]["total_bytes"]


@pytest.mark.parametrize("path, account, key_of, status, message", [
    ("/v1/accounts/globex/usage?start=2026-01-01", "acme", None, 404,
     "no account 'globex' for these credentials"),
    ("/v1/accounts/acme/sessions?start=2026-01-01", "globex", None, 404,
     "no account 'acme' for these credentials"),
    ("/v1/accounts/acme/usage?start=2026-01-01", "acme", "globex", 401,
     "wrong account id or API key"),
    ("/v1/accounts/acme/usage?start=2026-01-01", None, None, 401,
     "HTTP Basic credentials required: the account id and its API key"),
    ("/v1/accounts/acme/usage", "acme", None, 400,
     "start: required, e.g. 2026-11-01T00:00:00Z or 2026-11-01"),
    ("/v1/accounts/acme/usage?start=2026-11-01T00:00:00", "acme", None, 400,
     "start: '2026-11-01T00:00:00' has no UTC offset: end it with Z"),
    ("/v1/accounts/acme/usage?start=2026-11-02&end=2026-11-01", "acme", None, 400,
     "end: 2026-11-01T00:00:00Z is not after start 2026-11-02T00:00:00Z"),
    ("/v1/accounts/acme/usage?start=2026-11-01&granularity=week", "acme", None, 400,
     "granularity: expected one of day, month, all"),
    ("/v1/accounts/acme/usage?start=2026-11-01&account=globex", "acme", None, 400,
     "account: unknown parameter; expected start, end, granularity"),
    ("/v1/accounts/acme/sessions?start=2026-11-01&limit=0", "acme", None, 400,
     "limit: expected a whole number from 1 to 1000"),
    ("/v1/accounts/acme/sessions?start=2026-11-01&after=bm90IGEgY3Vyc29y", "acme", None, 400,
     "after: not a cursor from a next_page_uri"),
])
def test_the_usage_api_refuses_clearly(ledger, path, account, key_of, status, message):
    answer = api_get(ledger, path, account, key_of)
    assert (answer.status, answer.body) == (status, {"code": status, "message": message})


def test_the_usage_paths_serve_get_only(ledger):
    api = Api(ledger.api, ledger.api_port, None, ledger.keys)
    answer = api.request("POST", "/v1/accounts/acme/usage", api.auth("acme"))
    assert answer.status == 405 and answer.headers["Allow"] == "GET"


def test_without_a_sql_ledger_the_usage_api_says_so(tmp_path, in_reactor):  # noqa: F811
    from support.servers import free_port
    accounts = f"sqlite://{tmp_path / 'accounts.db'}"
    keys = in_reactor(create_accounts, accounts, ("acme", "globex"))
    (tmp_path / "mint.secret").write_text("usage-report-secret\n")
    port = free_port()
    # A JSON lines file takes one process's records: the relay refuses it with workers.
    server = start_server("--accounting", f"jsonl:path={tmp_path / 'usage.jsonl'}",
                          "--workers", "1", "--api-port", str(port), "--api-db", accounts, "--api-secret-file",
                          str(tmp_path / "mint.secret"), users=(), tcp=False, tls=False,
                          state_dir=str(tmp_path / "state"))
    try:
        server.read_until(f"tokens API listening on http [127.0.0.1]:{port}")
        api = Api(server, port, None, keys)
        answer = api.request("GET", "/v1/accounts/acme/usage?start=2026-11-01", api.auth("acme"))
        assert (answer.status, answer.body["message"]) == (
            501, "this relay keeps no SQL usage ledger to read usage from (--accounting "
                 "sqlite:... or postgresql:...)")
        # Credentials are checked first, as on every path: an anonymous caller only sees 401.
        assert api.request("GET", "/v1/accounts/acme/usage?start=2026-11-01").status == 401
    finally:
        server.stop()


def test_a_session_across_a_rate_change_pays_each_rate_for_its_part(server_factory, tmp_path):
    from support.accounting import REGION, HeldSession, eventually, sql_usage
    from support.servers import USER
    dsn = f"sqlite://{tmp_path / 'usage.db'}"
    server = server_factory("--accounting", f"sqlite:path={tmp_path / 'usage.db'}",
                            "--accounting-interval", "1", "--region", REGION, tcp=False,
                            tls=False)
    server.read_until("usage backend sqlite ready")
    session = HeldSession(server)
    before = session.relay(4, 500)
    eventually(lambda: sql_usage(dsn).get(USER), before)  # the old rate's part, recorded
    next_second()
    session.relay(3, 900)
    session.delete()
    session.close()
    server.read_until("usage recorded in sqlite")
    server.stop()
    deltas = raw_rows(dsn, "SELECT at, bytes_from_client + bytes_to_client FROM usage_deltas"
                           " ORDER BY seq")
    # The deltas in order: a first few carry the 4000 bytes relayed before the second changed,
    # the rest the 5400 after it, and the rate changes at the first of those.
    sums = [sum(n for _, n in deltas[:i]) for i in range(len(deltas) + 1)]
    split = sums.index(2 * 4 * 500)
    effective = deltas[split][0]
    assert deltas[split - 1][0] < effective and sums[-1] - sums[split] == 2 * 3 * 900
    (tmp_path / "rates.toml").write_text(
        f'[[rates.{REGION}]]\nrate_per_mb = "0.3"\neffective = 2026-01-01\n\n'
        f'[[rates.{REGION}]]\nrate_per_mb = "0.7"\neffective = {effective}\n')
    answer = json.loads(run_cli("usage", "--ledger", dsn, "--since", "2026-01-01", "--by",
                                  "session", "--json", "--rate-table",
                                  str(tmp_path / "rates.toml")).stdout)
    [row] = answer["rows"]
    # 4000 bytes at 0.3 per MB and 5400 at 0.7: (1200 + 3780) / 10^6.
    assert (row["total_bytes"], row["charge"]) == (9400, "0.004980")
