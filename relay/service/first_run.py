"""The first-run credential: a relay started with no credential source works at once.

With none of --user, --users-file, --auth, --use-auth-secret, --static-auth-secret given (and
no --no-first-run), the first start makes one random account in --state-dir and every later
start reuses it: a username and password for TURN clients, and, for the tokens API, the same
name as an account of a small SQLite account database with an API key, and a REST secret the
API mints credentials with.  The tokens API is then on, on loopback, at `API_PORT` unless
--api-port says otherwise.  The start banner (relay.service.banner) prints what to paste.

Nothing is open: the password, API key and secret are random (`secrets`), kept in files only
their owner may read (0600, in a 0700 directory), and any credential source turns it all off.
Like the self-signed certificate, it is a start, not a setup: see docs/auth.md for real ones.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Optional

from twisted.python.usage import UsageError

from relay.storage.accounts import AccountStore
from relay.util.tomlfile import read_toml

FILE = "first-run.toml"
SECRET_FILE = "first-run-secret"
ACCOUNTS = "first-run-accounts.db"
API_PORT = 3480
CREDENTIAL_SOURCES = ("user", "users-file", "auth", "use-auth-secret", "static-auth-secret")


@dataclass(frozen=True)
class FirstRun:
    path: str        # the file that holds it all
    username: str    # also the tokens API's account id
    password: str
    api_key: str
    made: bool       # made by this start, not read back

    def dsn(self) -> str:
        return "sqlite:///" + os.path.join(os.path.dirname(self.path), ACCOUNTS)

    def secret_file(self) -> str:
        return os.path.join(os.path.dirname(self.path), SECRET_FILE)


def wanted(options: dict) -> bool:
    """No credential source is configured, and first runs are not turned off."""
    return not options["no-first-run"] and not any(options[name] for name in CREDENTIAL_SOURCES)


def load_or_make(state_dir: str) -> FirstRun:
    """The first-run account kept in `state_dir`, made now if there is none.  OSError or
    ValueError when the directory cannot hold it."""
    path = os.path.join(state_dir, FILE)
    if not os.path.exists(path):
        return _make(state_dir, path)
    table = read_toml(path)
    try:
        return FirstRun(path, str(table["username"]), str(table["password"]),
                        str(table["api_key"]), made=False)
    except KeyError as err:
        raise ValueError(f"{path} lacks {err.args[0]}: delete it to make a new one") from None


def _private_file(path: str, text: str) -> None:
    """`text` in a new file at `path` only its owner may read; the file appears whole."""
    partial = f"{path}.{os.getpid()}.partial"
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    os.replace(partial, path)


def _make(state_dir: str, path: str) -> FirstRun:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    username = "turn-" + secrets.token_hex(4)
    password = secrets.token_urlsafe(18)
    first = FirstRun(path, username, password, api_key="", made=True)
    _private_file(first.secret_file(), secrets.token_urlsafe(32) + "\n")
    store = AccountStore.from_dsn(first.dsn())
    try:
        api_key = store.account_with_new_key_now(username)
    finally:
        store.close()
    os.chmod(os.path.join(state_dir, ACCOUNTS), 0o600)
    _private_file(path, "# Made by turnrelay's first start, which had no credential configured.\n"
                        "# Delete this file to make a new one; any --user or --auth turns it off.\n"
                        f'username = "{username}"\npassword = "{password}"\n'
                        f'api_key = "{api_key}"\n')
    return FirstRun(path, username, password, api_key, made=True)


def apply(options: dict) -> Optional[FirstRun]:
    """When `wanted`, the first-run account as the relay's credential source (a --user, and
    the account database with its secret as --auth db:), with the tokens API on; the settings
    these touch resolved again.  SystemExit naming --state-dir if it cannot be kept there."""
    if not wanted(options):
        return None
    try:
        first = load_or_make(options["state-dir"])
    except (OSError, ValueError) as err:
        raise SystemExit(f"turnrelay: --state-dir: cannot keep the first-run credential there: "
                         f"{err} (or give a credential, or --no-first-run)")
    options["user"].append(f"{first.username}:{first.password}")
    options["auth"].append(f"db:dsn={first.dsn()},secret-file={first.secret_file()}")
    if options["api-port"] is None:
        options["api-port"] = API_PORT
    try:
        options.resolve_credentials()
    except UsageError as err:
        raise SystemExit(f"turnrelay: {err}")
    return first
