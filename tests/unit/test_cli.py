"""The `turnrelay` console script, run as installed, against SQLite and a real PostgreSQL."""
import json
import re
import time
from datetime import datetime, timezone

import pytest

from relay.auth.tokens import password_for
from relay.cli.main import main
from relay.storage.accounts import ACTIVE, SUSPENDED, AccountRecord, AccountStore
from support.cli import run_cli
from support.servers import free_port

SECRETS = b"first-secret\nsecond-secret\n"


@pytest.fixture
def store(store_dsn, in_reactor):
    """The database the script writes to, as the relay would read it."""
    store = in_reactor(AccountStore.from_dsn, store_dsn)
    yield store
    in_reactor(store.close)


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secrets"
    path.write_bytes(SECRETS)
    return str(path)


def mint(*argv: str, status: int = 0, env_db: str = "") -> dict:
    return json.loads(run_cli("token", *argv, status=status, env_db=env_db).stdout)


@pytest.mark.parametrize("command, options", [
    ([], ["account", "token", "revoke", "TURNRELAY_DB"]),
    (["account"], ["add", "suspend", "activate", "set-limits", "rotate-key", "list"]),
    (["account", "add"], ["ACCOUNT", "--max-allocations", "--bandwidth", "--db"]),
    (["account", "suspend"], ["ACCOUNT", "--db"]),
    (["account", "activate"], ["ACCOUNT", "--db"]),
    (["account", "set-limits"], ["ACCOUNT", "--max-allocations", "--bandwidth",
                                 "--monthly-quota-mb", "--db"]),
    (["account", "rotate-key"], ["ACCOUNT", "--db"]),
    (["account", "list"], ["--db"]),
    (["token"], ["--account", "--ttl", "--label", "--secret-file", "--db"]),
    (["revoke"], ["USERNAME", "--db"]),
    (["browser-key", "add"], ["ACCOUNT", "--origin", "--name", "--max-ttl",
                              "--requests-per-minute", "--db"]),
    (["browser-key", "list"], ["--account", "--db"]),
    (["browser-key", "revoke"], ["KEY_ID", "--db"]),
    (["probe"], ["URI", "--user", "--password", "--account", "--secret", "--secret-file",
                 "--transport", "--count", "--json", "--regions", "--api", "--api-key",
                 "TURNRELAY_API_KEY", "--region-count"]),
    (["usage"], ["--ledger", "--since", "--until", "--account", "--by", "--json", "--region",
                 "--rate-per-mb", "--rate-table", "TURNRELAY_LEDGER"]),
])
def test_help_documents_every_option(command, options, capsys):
    # In process: the same parser the script runs, without a second's worth of interpreters.
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    for option in options:
        assert option in usage, option


def test_account_lifecycle(store_dsn, store, in_reactor):
    added = run_cli("account", "add", "acme", "--max-allocations", "5", "--bandwidth", "125000",
                      "--db", store_dsn)
    key = added.stdout.strip()
    assert added.stdout == key + "\n" and key not in added.stderr
    assert "will not be shown again" in added.stderr
    assert in_reactor(store.verify_api_key, "acme", key) is True
    assert "already exists" in run_cli("account", "add", "acme", "--db", store_dsn,
                                         status=1).stderr

    run_cli("account", "suspend", "acme", "--db", store_dsn)
    assert in_reactor(store.get_account, "acme") == AccountRecord("acme", SUSPENDED, 5, 125000)
    run_cli("account", "activate", "acme", env_db=store_dsn)
    run_cli("account", "set-limits", "acme", "--max-allocations", "0", "--db", store_dsn)
    assert in_reactor(store.get_account, "acme") == AccountRecord("acme", ACTIVE, 0, 125000)
    run_cli("account", "add", "beta", "--monthly-quota-mb", "0.05", "--db", store_dsn)
    assert in_reactor(store.get_account, "beta").monthly_quota_bytes == 50_000
    run_cli("account", "add", "gamma", "--db", store_dsn)
    run_cli("account", "set-limits", "gamma", "--monthly-quota-mb", "0", "--db", store_dsn)
    listing = run_cli("account", "list", "--db", store_dsn).stdout.splitlines()
    assert [line.split() for line in listing[1:]] == [
        ["acme", "active", "unlimited", "125000", "default"],
        ["beta", "active", "unlimited", "unlimited", "0.05"],
        ["gamma", "active", "unlimited", "unlimited", "unlimited"]]
    run_cli("account", "set-limits", "gamma", "--monthly-quota-mb", "default", "--db", store_dsn)
    assert in_reactor(store.get_account, "gamma").monthly_quota_bytes is None
    assert "at most 6 decimals" in run_cli("account", "set-limits", "gamma",
                                             "--monthly-quota-mb", "0.0000001", "--db", store_dsn,
                                             status=2).stderr

    new_key = run_cli("account", "rotate-key", "acme", "--db", store_dsn).stdout.strip()
    assert in_reactor(store.verify_api_key, "acme", new_key) is True
    assert in_reactor(store.verify_api_key, "acme", key) is False
    assert "no account 'nobody'" in run_cli("account", "suspend", "nobody", "--db", store_dsn,
                                              status=1).stderr


def test_browser_key_lifecycle(store_dsn, store, in_reactor):
    run_cli("account", "add", "acme", "--db", store_dsn)
    added = run_cli("browser-key", "add", "acme", "--origin", "https://app.example.org",
                    "--origin", "http://127.0.0.1:8080", "--max-ttl", "120", "--name", "web",
                    "--db", store_dsn)
    key = added.stdout.strip()
    record = in_reactor(store.find_browser_key, key)
    assert (record.account_id, record.name, record.origins, record.max_ttl,
            record.requests_per_minute) == (
        "acme", "web", ("https://app.example.org", "http://127.0.0.1:8080"), 120, 600)
    assert key not in added.stderr and f"revoke {record.key_id}" in added.stderr
    second = run_cli("browser-key", "add", "acme", "--origin", "https://b.example",
                     "--db", store_dsn).stdout.strip()
    listing = run_cli("browser-key", "list", "--account", "acme", "--db", store_dsn).stdout
    assert key not in listing and second not in listing
    rows = [line.split() for line in listing.splitlines()]
    assert rows[0] == ["KEY", "ID", "ACCOUNT", "NAME", "MAX", "TTL", "PER", "MINUTE", "CREATED",
                       "ORIGINS"]
    assert sorted(row[:5] + row[6:] for row in rows[1:]) == sorted([
        [record.key_id, "acme", "web", "120", "600", "https://app.example.org",
         "http://127.0.0.1:8080"],
        [second[5:21], "acme", "browser", "600", "600", "https://b.example"]])
    revoked = run_cli("browser-key", "revoke", key, "--db", store_dsn)  # the whole key works too
    assert revoked.stdout.startswith(f"revoked browser key {record.key_id}")
    assert in_reactor(store.find_browser_key, key) is None
    assert f"no browser key {record.key_id}" in run_cli(
        "browser-key", "revoke", record.key_id, "--db", store_dsn, status=1).stderr


def test_a_token_is_minted_offline_with_the_first_secret(secret_file):
    before = time.time()
    token = mint("--account", "acme", "--ttl", "600", "--label", "phone",
                 "--secret-file", secret_file)
    after = time.time()
    assert set(token) == {"username", "password", "ttl", "date_expires"}
    expiry = int(re.fullmatch(r"(\d+):acme:phone", token["username"]).group(1))
    assert int(before) + 600 <= expiry <= after + 600 and token["ttl"] == 600
    assert token["password"] == password_for(b"first-secret", token["username"])
    expires = datetime.strptime(token["date_expires"], "%Y-%m-%dT%H:%M:%SZ")
    assert expires.replace(tzinfo=timezone.utc).timestamp() == expiry
    assert re.fullmatch(r"\d+:acme", mint("--account", "acme", "--secret-file",
                                          secret_file)["username"])


def test_with_a_database_a_token_needs_an_active_account(store_dsn, secret_file):
    run_cli("account", "add", "acme", "--db", store_dsn)
    assert mint("--account", "acme", "--secret-file", secret_file, "--db", store_dsn)["username"]
    run_cli("account", "suspend", "acme", "--db", store_dsn)
    refused = run_cli("token", "--account", "acme", "--secret-file", secret_file,
                        "--db", store_dsn, status=1)
    assert "account 'acme' is suspended" in refused.stderr and not refused.stdout
    refused = run_cli("token", "--account", "nobody", "--secret-file", secret_file,
                        env_db=store_dsn, status=1)
    assert "no account 'nobody'" in refused.stderr and not refused.stdout


def test_a_revoked_username_is_in_the_next_snapshot(store_dsn, store, secret_file, in_reactor):
    username = mint("--account", "acme", "--secret-file", secret_file)["username"]
    revoked = run_cli("revoke", username, "--db", store_dsn)
    assert revoked.stdout.startswith(f"revoked {username} until ")
    assert in_reactor(store.snapshot, time.time()).revoked == {username}


def test_an_expired_username_needs_no_revocation(store_dsn, store, in_reactor):
    assert "nothing to revoke" in run_cli("revoke", "1000:acme", "--db", store_dsn).stderr
    assert in_reactor(store.snapshot, 0).revoked == frozenset()


@pytest.mark.parametrize("argv, status, problem", [
    (["revoke", "acme", "--db", "{sqlite}"], 2,
     "'acme': not a <unix-expiry>:<account-id>[:<label>] username"),
    ([], 2, "required: COMMAND"),
    (["account", "list"], 2, "--db DSN (or TURNRELAY_DB) is required"),
    (["account", "list", "--db", "mysql://admin:hunter2@db/x"], 2, "unsupported database 'mysql'"),
    (["account", "list", "--db", "sqlite:///{tmp}/no/such/dir.db"], 1,
     "database: unable to open database file"),
    (["account", "list", "--db", "postgresql://turnrelay@127.0.0.1:{port}/x"], 1,
     "database: connection failed"),
    (["account", "add", "a:b", "--db", "{sqlite}"], 2, "an account id must be non-empty"),
    (["account", "add", "acme", "--max-allocations", "many", "--db", "{sqlite}"], 2,
     "--max-allocations: 'many': not a whole number"),
    (["browser-key", "add", "acme", "--origin", "app.example.org", "--db", "{sqlite}"], 2,
     "--origin: 'app.example.org': expected http:// or https:// and a host"),
    (["browser-key", "add", "acme", "--db", "{sqlite}"], 2, "required: --origin"),
    (["browser-key", "add", "nobody", "--origin", "https://a.example", "--db", "{sqlite}"], 1,
     "no account 'nobody' in the database"),
    (["browser-key", "add", "acme", "--origin", "https://a.example", "--name", "a b",
      "--db", "{sqlite}"], 2, "--name: 'a b': expected 1 to 64 letters"),
    (["browser-key", "revoke", "xyz", "--db", "{sqlite}"], 2,
     "'xyz' is not a browser key id (16 hex digits)"),
    (["token", "--account", "acme", "--ttl", "0", "--secret-file", "{tmp}/s"], 2,
     "--ttl: '0': must be 1 or more"),
    (["token", "--account", "acme", "--secret-file", "{tmp}/missing"], 1,
     "missing: No such file or directory"),
    (["token", "--account", "acme", "--secret-file", "{tmp}/empty"], 1, "holds no secret"),
])
def test_every_error_is_one_line(argv, status, problem, tmp_path):
    (tmp_path / "empty").write_text("\n")
    fill = {"tmp": tmp_path, "sqlite": f"sqlite:///{tmp_path}/accounts.db", "port": free_port()}
    refused = run_cli(*(arg.format(**fill) for arg in argv), status=status)
    assert problem in refused.stderr
    assert "hunter2" not in refused.stderr
