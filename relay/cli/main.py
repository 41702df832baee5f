"""`turnrelay`: the operator's tool for the account database, offline credentials and usage.

It drives the same Deferred-returning AccountStore the relay uses, under `task.react`, so there
is one implementation of the SQL.  Every failure ends as one line on stderr and a non-zero exit
status (2 for a bad command line, 1 for a refusal or a database error), never a traceback: the
tool runs in scripts, whose logs should say what went wrong and nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from decimal import Decimal
from typing import Any, Awaitable, Callable, NoReturn, Optional, Sequence

from twisted.internet import defer, task

from relay.auth.tokens import mint, parse_username, valid_label
from relay.cli import probe
from relay.ledger.pricing import RateError, parse_utc, rates_from_options
from relay.ledger.report import GROUPS, NoLedger, UsageReader
from relay.storage.accounts import (
    ACTIVE,
    SUSPENDED,
    AccountExists,
    AccountStore,
    UnknownAccount,
    check_account_id,
)
from relay.storage.browser_keys import (
    DEFAULT_MAX_TTL,
    DEFAULT_REQUESTS_PER_MINUTE,
    check_key_id,
    check_origin,
)
from relay.util.secretfile import read_secrets
from relay.util.timefmt import rfc3339
from relay.util.units import MB, parse_megabytes

PROG = "turnrelay"
DSN_HELP = ("the account database: sqlite:///absolute/path.db or "
            "postgresql://user@host:port/dbname (default: $TURNRELAY_DB)")
LEDGER_HELP = ("the usage ledger relays write with --accounting sqlite:path=... or "
               "postgresql:dsn=...: sqlite:///absolute/path/usage.db or "
               "postgresql://user@host:port/dbname (default: $TURNRELAY_LEDGER)")
USAGE_COLUMNS = ("SESSIONS", "BYTES SENT", "BYTES RECEIVED", "TOTAL BYTES", "MB", "CHARGE")


_NOT_GIVEN = object()  # set-limits' --monthly-quota-mb absent, as opposed to `default`


class Refused(Exception):
    """A command that cannot do what it was asked: its message is the line the operator reads."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, naming the command and the problem (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def _argument_type(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that reports `check`'s own ValueError message, not a generic one."""
    def convert(text: str) -> Any:
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return convert


def _utc_time(text: str) -> str:
    try:
        return parse_utc(text)
    except ValueError as e:  # its message quotes the text already
        raise argparse.ArgumentTypeError(str(e)) from None


def _at_least(minimum: int) -> Callable[[str], int]:
    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError("not a whole number") from None
        if value < minimum:
            raise ValueError(f"must be {minimum} or more")
        return value
    return _argument_type(number)


def _rest_username(text: str) -> str:
    parse_username(text)
    return text


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _quota(text: str) -> Optional[int]:
    """--monthly-quota-mb: megabytes, or `default` for the relay's --monthly-quota-mb."""
    return None if text == "default" else parse_megabytes(text)


def _quota_text(value: Optional[int]) -> str:
    if value is None:
        return "default"
    return str(Decimal(value) / MB) if value else "unlimited"


async def _account_add(store: AccountStore, args: argparse.Namespace) -> None:
    api_key = await store.add_account(args.account, args.max_allocations, args.bandwidth,
                                      args.monthly_quota)
    print(api_key, flush=True)
    _note(f"the API key of {args.account!r} is above; it will not be shown again")


async def _account_status(store: AccountStore, args: argparse.Namespace) -> None:
    await store.set_status(args.account, args.status)
    print(f"{args.account}: {args.status}")


async def _account_set_limits(store: AccountStore, args: argparse.Namespace) -> None:
    quota_given = args.monthly_quota is not _NOT_GIVEN
    await store.set_limits(args.account, args.max_allocations, args.bandwidth,
                           args.monthly_quota if quota_given else None,
                           default_quota=quota_given and args.monthly_quota is None)
    record = await store.get_account(args.account)
    print(f"{args.account}: max-allocations {record.max_allocations}, "
          f"bandwidth {record.bandwidth_bps} B/s (0: unlimited), "
          f"monthly quota (MB) {_quota_text(record.monthly_quota_bytes)}")


async def _account_rotate_key(store: AccountStore, args: argparse.Namespace) -> None:
    api_key = await store.rotate_api_key(args.account)
    print(api_key, flush=True)
    _note(f"the new API key of {args.account!r} is above; it will not be shown again, "
          "and the old one no longer works")


async def _account_list(store: AccountStore, args: argparse.Namespace) -> None:
    def limit(value: int) -> str:
        return str(value) if value else "unlimited"
    rows = [("ACCOUNT", "STATUS", "MAX-ALLOCATIONS", "BANDWIDTH (B/s)", "MONTHLY QUOTA (MB)")]
    rows += [(r.account_id, r.status, limit(r.max_allocations), limit(r.bandwidth_bps),
              _quota_text(r.monthly_quota_bytes)) for r in await store.list_accounts()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])


async def _browser_key_add(store: AccountStore, args: argparse.Namespace) -> None:
    key, record = await store.add_browser_key(args.account, args.origin, args.name,
                                              args.max_ttl, args.requests_per_minute)
    print(key, flush=True)
    _note(f"browser key {record.key_id} of {args.account!r} is above: web pages of "
          f"{', '.join(record.origins)} may use it to fetch ICE servers; it will not be shown "
          f"again (`turnrelay browser-key revoke {record.key_id}` to revoke it)")


async def _browser_key_list(store: AccountStore, args: argparse.Namespace) -> None:
    rows = [("KEY ID", "ACCOUNT", "NAME", "MAX TTL", "PER MINUTE", "CREATED", "ORIGINS")]
    rows += [(k.key_id, k.account_id, k.name, str(k.max_ttl), str(k.requests_per_minute),
              rfc3339(k.created_at), " ".join(k.origins))
             for k in await store.browser_keys(args.account)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


async def _browser_key_revoke(store: AccountStore, args: argparse.Namespace) -> None:
    if not await store.revoke_browser_key(args.key_id):
        raise Refused(f"no browser key {args.key_id} in the database")
    print(f"revoked browser key {args.key_id}: web pages can no longer use it; credentials it "
          "minted expire on their own")


async def _token(store: Optional[AccountStore], args: argparse.Namespace) -> None:
    secret = read_secrets(args.secret_file)[0]
    if store is not None:
        record = await store.get_account(args.account)
        if record is None:
            raise Refused(f"no account {args.account!r} in the database")
        if record.status != ACTIVE:
            raise Refused(f"account {args.account!r} is {record.status}")
    username, password = mint(secret, args.account, args.ttl, time.time(), args.label)
    print(json.dumps({"username": username, "password": password, "ttl": args.ttl,
                      "date_expires": rfc3339(parse_username(username).expires)}))


async def _revoke(store: AccountStore, args: argparse.Namespace) -> None:
    parsed = parse_username(args.username)
    if parsed.expires < time.time():
        _note(f"{args.username!r} expired at {rfc3339(parsed.expires)}: nothing to revoke")
        return
    await store.revoke(args.username, parsed.account_id, parsed.expires)
    print(f"revoked {args.username} until {rfc3339(parsed.expires)}")


async def _usage(_: None, args: argparse.Namespace) -> None:
    """Print a usage report: a table (its last row the total) or, with --json, one object."""
    reader = args.reader
    try:
        report = await reader.report(args.since, args.until, args.by, args.rates, args.account)
    finally:
        await reader.close()
    for region in report.unrated:
        _note(f"no rate for some of region {region!r}'s usage (--rate-per-mb, --rate-table): "
              "its charge is left blank")
    if args.json:
        print(json.dumps({"since": args.since, "until": args.until, "by": args.by,
                          "account": args.account,
                          "rows": [row.as_json(args.by) for row in report.rows],
                          "total": report.total.as_json(args.by)}, indent=2))
        return
    table = [(args.by.upper(), *USAGE_COLUMNS)]
    for row in [*report.rows, report.total]:
        table.append(("TOTAL" if row is report.total else row.group, str(row.sessions),
                      str(row.bytes_sent), str(row.bytes_received), str(row.total_bytes),
                      str(row.mb), "-" if row.charge is None else str(row.charge)))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join([line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width
                                                       in zip(line[1:], widths[1:])]))


def _limit_arguments(parser: argparse.ArgumentParser, changing: bool) -> None:
    """The quota options `account add` and `account set-limits` share.  Adding, a limit not
    given is unlimited and the monthly quota the relay's default; changing, it stays as it is
    (None, or _NOT_GIVEN for the quota, whose None means `default`)."""
    unlimited = "0: unlimited" if changing else "default 0: unlimited"
    parser.add_argument("--max-allocations", metavar="N", type=_at_least(0),
                        default=None if changing else 0,
                        help=f"concurrent allocations allowed ({unlimited})")
    parser.add_argument("--bandwidth", metavar="BYTES_PER_S", type=_at_least(0),
                        default=None if changing else 0,
                        help=f"bytes per second per allocation ({unlimited})")
    parser.add_argument("--monthly-quota-mb", dest="monthly_quota", metavar="MB|default",
                        type=_argument_type(_quota), default=_NOT_GIVEN if changing else None,
                        help="billable megabytes per calendar month, UTC (0: unlimited; "
                             "default: the relay's --monthly-quota-mb)")


def _browser_key_commands(commands: Any, database: argparse.ArgumentParser,
                          account_id: Callable[[str], Any]) -> None:
    """`turnrelay browser-key add|list|revoke`: keys a web page may carry (docs/api.md)."""
    keys = commands.add_parser(
        "browser-key", help="add, list, revoke browser keys (ICE servers for web pages)",
        description="Browser keys let a web page fetch ICE servers itself, from the origins "
                    "listed only, for short-lived credentials only; they can do nothing else.")
    key_commands = keys.add_subparsers(dest="browser_key_command", required=True,
                                       metavar="ACTION")
    add = key_commands.add_parser(
        "add", parents=[database], help="add a browser key and print it once",
        description="Add a browser key of ACCOUNT for the web origins given, and print it once "
                    "on stdout.")
    add.add_argument("account", metavar="ACCOUNT", type=account_id, help="the account id")
    add.add_argument("--origin", required=True, action="append", type=_argument_type(check_origin),
                     help="a web origin whose pages may use the key, such as "
                          "https://app.example.org (repeat for more)")
    add.add_argument("--name", default="browser", type=_argument_type(valid_label),
                     help="the label of the usernames it mints, which usage reports show "
                          "(default: browser)")
    add.add_argument("--max-ttl", metavar="SECONDS", type=_at_least(1), default=DEFAULT_MAX_TTL,
                     help=f"longest credential it mints (default {DEFAULT_MAX_TTL}; the relay's "
                          "--api-max-ttl caps it too)")
    add.add_argument("--requests-per-minute", metavar="N", type=_at_least(1),
                     default=DEFAULT_REQUESTS_PER_MINUTE,
                     help=f"requests the key may make, from all its pages together (default "
                          f"{DEFAULT_REQUESTS_PER_MINUTE}; the relay also limits each source "
                          "address, --api-browser-requests-per-minute)")
    add.set_defaults(run=_browser_key_add, parser=add)
    listing = key_commands.add_parser("list", parents=[database], help="list browser keys",
                                      description="List browser keys, without their secrets.")
    listing.add_argument("--account", type=account_id, help="only this account's keys")
    listing.set_defaults(run=_browser_key_list, parser=listing)
    revoke = key_commands.add_parser(
        "revoke", parents=[database], help="revoke a browser key",
        description="Delete a browser key: the tokens API refuses it from the next request.")
    revoke.add_argument("key_id", metavar="KEY_ID", type=_argument_type(check_key_id),
                        help="the key's id (its 16 hex digits after trbk_), or the whole key")
    revoke.set_defaults(run=_browser_key_revoke, parser=revoke)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Manage turnrelay's account database and mint "
                    "TURN credentials.", epilog="--db may also come from the TURNRELAY_DB "
                    "environment variable.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument("--db", metavar="DSN", default=os.environ.get("TURNRELAY_DB"),
                          help=DSN_HELP)
    account_id = _argument_type(check_account_id)

    accounts = commands.add_parser("account", help="add, suspend, activate, list accounts",
                                   description="Manage accounts in the database.")
    account_commands = accounts.add_subparsers(dest="account_command", required=True,
                                               metavar="ACTION")

    add = account_commands.add_parser(
        "add", parents=[database], help="add an account and print its API key once",
        description="Add an active account; its API key is printed once, on stdout.")
    add.add_argument("account", metavar="ACCOUNT", type=account_id, help="the account id")
    _limit_arguments(add, changing=False)
    add.set_defaults(run=_account_add, parser=add)

    for action, status, summary in (("suspend", SUSPENDED, "refuse the account's credentials"),
                                    ("activate", ACTIVE, "accept the account's credentials again")):
        sub = account_commands.add_parser(action, parents=[database], help=summary,
                                          description=f"{summary[0].upper()}{summary[1:]}.")
        sub.add_argument("account", metavar="ACCOUNT", help="the account id")
        sub.set_defaults(run=_account_status, status=status, parser=sub)

    limits = account_commands.add_parser(
        "set-limits", parents=[database], help="change an account's quotas",
        description="Change an account's quotas; a limit not given stays as it is.")
    limits.add_argument("account", metavar="ACCOUNT", help="the account id")
    _limit_arguments(limits, changing=True)
    limits.set_defaults(run=_account_set_limits, parser=limits)

    rotate = account_commands.add_parser(
        "rotate-key", parents=[database], help="replace an account's API key",
        description="Replace an account's API key and print the new one once; the old one "
                    "stops working.")
    rotate.add_argument("account", metavar="ACCOUNT", help="the account id")
    rotate.set_defaults(run=_account_rotate_key, parser=rotate)

    listing = account_commands.add_parser("list", parents=[database], help="list the accounts",
                                          description="List every account, its status and quotas.")
    listing.set_defaults(run=_account_list, parser=listing)

    _browser_key_commands(commands, database, account_id)

    token = commands.add_parser(
        "token", parents=[database], help="mint a TURN credential offline",
        description="Mint a time-limited TURN credential (TURN REST form) with the first secret "
                    "of the secret file, and print it as JSON.  With --db, refuse an account "
                    "that is unknown or suspended.")
    token.add_argument("--account", required=True, type=account_id,
                       help="the account the credential's usage is charged to")
    token.add_argument("--ttl", metavar="SECONDS", type=_at_least(1), default=3600,
                       help="seconds the credential stays valid (default 3600)")
    token.add_argument("--label", help="free text appended to the username, e.g. a device")
    token.add_argument("--secret-file", metavar="FILE", required=True,
                       help="the relay's shared secrets, one a line (the first one signs)")
    token.set_defaults(run=_token, parser=token, optional_db=True)

    revoke = commands.add_parser(
        "revoke", parents=[database], help="refuse a credential before it expires",
        description="Record USERNAME as revoked until its own expiry: every relay sharing the "
                    "database refuses it within a few seconds.")
    revoke.add_argument("username", metavar="USERNAME", type=_argument_type(_rest_username),
                        help="the credential's username, <unix-expiry>:<account-id>[:<label>]")
    revoke.set_defaults(run=_revoke, parser=revoke)

    usage = commands.add_parser(
        "usage", help="report usage and charges from the usage ledger",
        description="Report the usage in [--since, --until) from the usage ledger: sessions, "
                    "bytes the clients sent and received, MB (10^6 bytes) and the charge at each "
                    "region's rate in effect when the usage happened (Decimal, rounded half up "
                    "to 6 places per row). Times are UTC.",
        epilog="--ledger may also come from the TURNRELAY_LEDGER environment variable.")
    usage.add_argument("--ledger", metavar="DSN", default=os.environ.get("TURNRELAY_LEDGER"),
                       help=LEDGER_HELP)
    usage.add_argument("--since", metavar="TIME", required=True, type=_utc_time,
                       help="first instant counted: 2026-11-01T00:00:00Z, or a date (its "
                            "midnight UTC)")
    usage.add_argument("--until", metavar="TIME", type=_utc_time,
                       help="first instant no longer counted (default: now)")
    usage.add_argument("--account", type=account_id, help="only this account's usage")
    usage.add_argument("--by", choices=[g for g in GROUPS if g != "all"], default="account",
                       help="one row per session, account, region, day or month "
                            "(default: account)")
    usage.add_argument("--json", action="store_true", help="print JSON (MB and charges as "
                                                           "decimal strings) instead of a table")
    usage.add_argument("--region", default="default",
                       help="the region --rate-per-mb prices (default: default)")
    usage.add_argument("--rate-per-mb", metavar="DECIMAL",
                       help="the charge per MB of --region's usage, as the relay's flag")
    usage.add_argument("--rate-table", metavar="FILE",
                       help="rates per region with effective times, as the relay's flag")
    usage.set_defaults(run=_usage, parser=usage, optional_db=True, usage=True)
    probe.add_command(commands)
    return parser


def _one_line(error: Exception) -> str:
    if isinstance(error, AccountExists):
        return f"account {error.args[0]!r} already exists"
    if isinstance(error, UnknownAccount):
        return f"no account {error.args[0]!r} in the database"
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    # Anything else comes from the database driver, whose messages may span several lines.
    message = " ".join(str(error).split()) or type(error).__name__
    return message if isinstance(error, (Refused, ValueError, NoLedger)) \
        else f"database: {message}"


async def _run(args: argparse.Namespace, store: Optional[AccountStore]) -> None:
    command: Callable[..., Awaitable[None]] = args.run
    try:
        if store is not None:
            await store.create_schema()
        await command(store, args)
    except Exception as e:
        _note(_one_line(e))
        raise SystemExit(1)
    finally:
        if store is not None:
            await store.close()


def _usage_options(args: argparse.Namespace) -> None:
    """The usage command's ledger, rates and window, or one line naming the flag at fault."""
    if args.ledger is None:
        args.parser.error("--ledger DSN (or TURNRELAY_LEDGER) is required")
    try:
        args.rates = rates_from_options(args.region, args.rate_per_mb, args.rate_table)
    except RateError as e:
        args.parser.error(str(e))
    if args.until is None:  # the ledger's whole seconds: up to now is before the next one
        args.until = rfc3339(int(time.time()) + 1)
    if args.until <= args.since:
        args.parser.error(f"--until {args.until} is not after --since {args.since}")
    try:
        args.reader = UsageReader.from_dsn(args.ledger)
    except NoLedger as e:
        _note(str(e))
        raise SystemExit(1)
    except ValueError as e:
        args.parser.error(f"--ledger: {e}")


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    args = build_parser().parse_args(argv)
    if "main" in args:  # a command of its own, needing neither the database nor a reactor
        raise SystemExit(args.main(args))
    store = None
    if getattr(args, "usage", False):
        _usage_options(args)
    elif args.db is not None:
        try:
            store = AccountStore.from_dsn(args.db)
        except ValueError as e:
            args.parser.error(f"--db: {e}")
    elif not getattr(args, "optional_db", False):
        args.parser.error("--db DSN (or TURNRELAY_DB) is required")
    task.react(lambda reactor: defer.ensureDeferred(_run(args, store)))
