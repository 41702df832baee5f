"""The account store, through its Deferreds, on SQLite and on a real PostgreSQL."""
import hashlib
import re
import sqlite3
import time

import psycopg
import pytest

from relay.storage import accounts as accounts_db
from relay.storage.accounts import (
    ACTIVE,
    PBKDF2_ITERATIONS,
    SUSPENDED,
    AccountExists,
    AccountRecord,
    AccountStore,
    UnknownAccount,
)
from relay.storage.browser_keys import check_origin
from relay.storage.sqldb import error_line
from support.db import raw_rows


@pytest.fixture
def open_store(store_dsn, in_reactor):
    """open_store() -> a store on the test's database, schema created, closed after the test."""
    stores = []

    def open_one() -> AccountStore:
        store = in_reactor(AccountStore.from_dsn, store_dsn)
        stores.append(store)
        in_reactor(store.create_schema)
        return store
    yield open_one
    for store in stores:
        in_reactor(store.close)


@pytest.fixture
def store(open_store):
    return open_store()


def test_accounts_are_added_read_and_listed(store, in_reactor):
    in_reactor(store.create_schema)  # idempotent: a second start changes nothing
    key = in_reactor(store.add_account, "zeta", 5, 125_000)
    assert isinstance(key, str) and len(key) >= 43
    in_reactor(store.add_account, "acme")
    assert in_reactor(store.get_account, "zeta") == AccountRecord("zeta", ACTIVE, 5, 125_000)
    assert in_reactor(store.get_account, "nobody") is None
    assert in_reactor(store.list_accounts) == [AccountRecord("acme", ACTIVE, 0, 0),
                                               AccountRecord("zeta", ACTIVE, 5, 125_000)]


def test_a_taken_id_a_bad_id_and_a_negative_limit_are_refused(store, in_reactor):
    in_reactor(store.add_account, "acme")
    with pytest.raises(AccountExists):
        in_reactor(store.add_account, "acme", 3)
    for bad in ("", "a:b"):
        with pytest.raises(ValueError, match="':'"):
            in_reactor(store.add_account, bad)
    with pytest.raises(ValueError, match="bandwidth_bps"):
        in_reactor(store.add_account, "other", 0, -1)
    assert in_reactor(store.list_accounts) == [AccountRecord("acme", ACTIVE, 0, 0)]


def test_api_keys_verify_only_for_their_own_account(store, in_reactor):
    acme_key = in_reactor(store.add_account, "acme")
    other_key = in_reactor(store.add_account, "other")
    assert acme_key != other_key
    assert in_reactor(store.verify_api_key, "acme", acme_key) is True
    assert in_reactor(store.verify_api_key, "acme", acme_key + "x") is False
    assert in_reactor(store.verify_api_key, "acme", other_key) is False
    assert in_reactor(store.verify_api_key, "nobody", acme_key) is False


def test_an_unknown_account_costs_the_same_hashing_as_a_known_one(store, in_reactor, monkeypatch):
    key = in_reactor(store.add_account, "acme")
    rounds = []
    derive = accounts_db._derive
    monkeypatch.setattr(accounts_db, "_derive",
                        lambda *args: rounds.append(args[2]) or derive(*args))
    in_reactor(store.verify_api_key, "acme", key)
    in_reactor(store.verify_api_key, "nobody", key)
    assert rounds == [PBKDF2_ITERATIONS, PBKDF2_ITERATIONS]


def test_the_key_is_stored_only_as_a_salted_hash(store, store_dsn, in_reactor):
    keys = [in_reactor(store.add_account, "acme"), in_reactor(store.rotate_api_key, "acme"),
            in_reactor(store.add_account, "other")]
    rows = raw_rows(store_dsn, "SELECT * FROM accounts")
    stored = repr(rows)
    assert not any(key in stored for key in keys)
    hashes = [row[0] for row in raw_rows(store_dsn, "SELECT api_key_hash FROM accounts")]
    salts = set()
    for encoded in hashes:
        scheme, iterations, salt, _ = encoded.split("$")
        assert (scheme, int(iterations)) == ("pbkdf2_sha256", PBKDF2_ITERATIONS)
        salts.add(salt)
    assert len(salts) == 2


def test_rotating_a_key_retires_the_old_one(store, in_reactor):
    old = in_reactor(store.add_account, "acme")
    new = in_reactor(store.rotate_api_key, "acme")
    assert new != old
    assert in_reactor(store.verify_api_key, "acme", new) is True
    assert in_reactor(store.verify_api_key, "acme", old) is False
    with pytest.raises(UnknownAccount):
        in_reactor(store.rotate_api_key, "nobody")


def test_suspension_shows_in_the_snapshot(store, in_reactor):
    in_reactor(store.add_account, "acme")
    in_reactor(store.set_status, "acme", SUSPENDED)
    assert in_reactor(store.snapshot, time.time()).accounts["acme"].status == SUSPENDED
    in_reactor(store.set_status, "acme", ACTIVE)
    assert in_reactor(store.snapshot, time.time()).accounts["acme"].status == ACTIVE
    with pytest.raises(UnknownAccount):
        in_reactor(store.set_status, "nobody", SUSPENDED)
    with pytest.raises(ValueError, match="status"):
        in_reactor(store.set_status, "acme", "deleted")


def test_limits_change_one_at_a_time(store, in_reactor):
    in_reactor(store.add_account, "acme", 5, 1000)
    in_reactor(store.set_limits, "acme", max_allocations=7)
    assert in_reactor(store.get_account, "acme") == AccountRecord("acme", ACTIVE, 7, 1000)
    in_reactor(store.set_limits, "acme", bandwidth_bps=0)
    assert in_reactor(store.get_account, "acme") == AccountRecord("acme", ACTIVE, 7, 0)
    with pytest.raises(UnknownAccount):
        in_reactor(store.set_limits, "nobody", max_allocations=1)
    with pytest.raises(ValueError, match="max_allocations"):
        in_reactor(store.set_limits, "acme", max_allocations=-1)


def test_revocations_show_until_their_expiry_then_are_purged(store, store_dsn, in_reactor):
    now = 1_700_000_000
    in_reactor(store.revoke, f"{now + 100}:acme:phone", "acme", now + 100)
    in_reactor(store.revoke, f"{now + 100}:acme:phone", "acme", now + 100)  # twice: no error
    in_reactor(store.revoke, f"{now + 900}:acme", "acme", now + 900)
    snapshot = in_reactor(store.snapshot, now)
    assert snapshot.revoked == {f"{now + 100}:acme:phone", f"{now + 900}:acme"}
    assert in_reactor(store.snapshot, now + 100).revoked == snapshot.revoked  # valid through it
    assert in_reactor(store.snapshot, now + 101).revoked == {f"{now + 900}:acme"}
    assert raw_rows(store_dsn, "SELECT username FROM revocations") == [(f"{now + 900}:acme",)]


def test_two_stores_on_one_database_see_each_others_writes(open_store, in_reactor):
    """What two relay processes sharing a database rely on."""
    first, second = open_store(), open_store()
    key = in_reactor(first.add_account, "acme", 2)
    assert in_reactor(second.verify_api_key, "acme", key) is True
    in_reactor(second.set_status, "acme", SUSPENDED)
    in_reactor(first.revoke, "4000000000:acme", "acme", 4_000_000_000)
    for store in (first, second):
        snapshot = in_reactor(store.snapshot, time.time())
        assert snapshot.accounts == {"acme": AccountRecord("acme", SUSPENDED, 2, 0)}
        assert snapshot.revoked == {"4000000000:acme"}


def test_sqlite_runs_in_wal_mode(sqlite_dsn, in_reactor):
    store = in_reactor(AccountStore.from_dsn, sqlite_dsn)
    in_reactor(store.create_schema)
    in_reactor(store.close)
    assert raw_rows(sqlite_dsn, "PRAGMA journal_mode") == [("wal",)]


@pytest.mark.parametrize("dsn, problem", [
    ("mysql://admin:hunter2@db/accounts", "unsupported database 'mysql'"),
    ("/var/lib/accounts.db", "not a database URL"),
    ("sqlite://accounts.db", "absolute file path"),
    ("sqlite:///", "absolute file path"),
    ("postgresql://turnrelay@127.0.0.1/db?nonsense=1", "bad PostgreSQL DSN: invalid URI query"),
    ("postgresql://admin:hunter2@[::1/db", "bad PostgreSQL DSN: .*IPv6"),
    ("host=db password=hunter2", "not a database URL"),
])
def test_a_bad_dsn_is_refused_naming_the_problem(dsn, problem):
    with pytest.raises(ValueError, match=problem) as refused:
        AccountStore.from_dsn(dsn)
    assert "hunter2" not in str(refused.value)


def test_a_database_error_is_logged_as_its_first_line_with_no_password():
    message = ("\nconnection to postgresql://admin:hunter2@db/accounts failed\n"
               "DETAIL: is the server running? password=hunter2\n")
    assert error_line(message) == "connection to postgresql://admin:***@db/accounts failed"
    assert error_line(" \n") == ""


def test_a_database_of_before_versioning_is_migrated_in_place(store_dsn, in_reactor):
    """An account database made before migrations keeps its accounts and gains the quota
    column; migrating again changes nothing."""
    statements = [statement for statement in accounts_db.MIGRATIONS[0]] + [
        "INSERT INTO accounts VALUES ('old', 'active', 'x', 3, 0, 1, 1)"]
    if store_dsn.startswith("sqlite:"):
        with sqlite3.connect(store_dsn[len("sqlite://"):]) as connection:
            for statement in statements:
                connection.execute(statement)
    else:
        with psycopg.connect(store_dsn) as connection:
            for statement in statements:
                connection.execute(statement)
    store = in_reactor(AccountStore.from_dsn, store_dsn)
    for _ in range(2):
        in_reactor(store.create_schema)
    assert in_reactor(store.get_account, "old") == AccountRecord("old", ACTIVE, 3, 0, None)
    in_reactor(store.set_limits, "old", monthly_quota_bytes=1_000_000)
    assert in_reactor(store.get_account, "old").monthly_quota_bytes == 1_000_000
    in_reactor(store.close)
    assert raw_rows(store_dsn, "SELECT version FROM accounts_schema_version ORDER BY version") \
        == [(n,) for n in range(1, len(accounts_db.MIGRATIONS) + 1)]


# Browser keys: low-privilege keys a web page carries (relay.storage.browser_keys).

def test_a_browser_key_is_shown_once_stored_hashed_and_found_by_its_secret(
        store, store_dsn, in_reactor):
    in_reactor(store.add_account, "acme")
    key, record = in_reactor(store.add_browser_key, "acme",
                             ["https://App.Example.org:443/", "http://127.0.0.1:8080"], "web",
                             300, 120)
    assert re.fullmatch(r"trbk_[0-9a-f]{16}_[0-9a-f]{64}", key)
    assert record.origins == ("https://app.example.org", "http://127.0.0.1:8080")
    assert in_reactor(store.find_browser_key, key) == record
    key_id, secret = key[5:21], key[22:]
    [(stored,)] = raw_rows(store_dsn, "SELECT secret_hash FROM browser_keys")
    assert stored == hashlib.sha256(secret.encode()).hexdigest() and secret not in stored
    # A wrong secret for a real id, an unknown id, and anything malformed find nothing.
    for wrong in (f"trbk_{key_id}_{'0' * 64}", f"trbk_{'0' * 16}_{secret}", key + "0", "",
                  key.upper()):
        assert in_reactor(store.find_browser_key, wrong) is None, wrong
    assert [k.key_id for k in in_reactor(store.browser_keys, "acme")] == [key_id]
    assert in_reactor(store.browser_keys, "globex") == []


def test_a_revoked_browser_key_is_found_no_more(store, in_reactor):
    for account in ("acme", "globex"):
        in_reactor(store.add_account, account)
    key, record = in_reactor(store.add_browser_key, "acme", ["https://a.example"], "web", 60, 60)
    assert in_reactor(store.revoke_browser_key, record.key_id, "globex") is False  # not its key
    assert in_reactor(store.find_browser_key, key) == record
    assert in_reactor(store.revoke_browser_key, record.key_id, "acme") is True
    assert in_reactor(store.find_browser_key, key) is None
    assert in_reactor(store.revoke_browser_key, record.key_id) is False


@pytest.mark.parametrize("origins, message", [
    ([], "a browser key needs at least one origin"),
    (["app.example.org"], "expected http:// or https:// and a host"),
    (["ftp://app.example.org"], "expected http:// or https:// and a host"),
    (["https://app.example.org/path"], "an origin is a scheme, a host and a port only"),
    (["https://user@app.example.org"], "an origin is a scheme, a host and a port only"),
    (["https://app.example.org:99999"], "Port out of range"),
    (["https://app_example.org"], "'app_example.org' is not a host name or an IP address"),
    (["https://*.example.org"], "is not a host name"),
])
def test_a_bad_origin_is_refused_naming_it(store, in_reactor, origins, message):
    in_reactor(store.add_account, "acme")
    with pytest.raises(ValueError, match=re.escape(message)):
        in_reactor(store.add_browser_key, "acme", origins, "web", 60, 60)
    assert in_reactor(store.browser_keys) == []


def test_a_browser_key_needs_an_account(store, in_reactor):
    with pytest.raises(UnknownAccount):
        in_reactor(store.add_browser_key, "nobody", ["https://a.example"], "web", 60, 60)


def test_origins_are_serialized_as_browsers_send_them():
    assert check_origin("HTTPS://[::1]:8443") == "https://[::1]:8443"
    assert check_origin("http://localhost:80") == "http://localhost"
    assert check_origin("https://app.example.org:8443") == "https://app.example.org:8443"
