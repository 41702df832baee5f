"""Usage ledger backends as plugins, chosen with `--accounting NAME:ARGS` (repeatable).

A third party adds a backend by dropping a module into any `twisted/plugins/` directory on
sys.path with an object providing `IUsageBackendFactory`; turnrelay finds it with `getPlugins`,
as it finds its own below.  ARGS are parsed like `--auth`'s (`relay.auth.plugins`).
"""
from __future__ import annotations

from typing import Dict, Tuple

from twisted.plugin import IPlugin, getPlugins
from twisted.python.reflect import namedAny
from zope.interface import implementer

from relay.ledger.records import IUsageBackend, IUsageBackendFactory


@implementer(IUsageBackendFactory, IPlugin)
class UsageBackendFactory:
    """A backend plugin whose module is imported only when chosen, like ServiceMaker: listing
    the plugins must not import a database driver."""

    def __init__(self, name: str, generator: str, help: str, argStringFormat: str):
        self.name = name
        self.generator = generator  # "module.function", called with the argstring
        self.help = help
        self.argStringFormat = argStringFormat

    def make(self, argstring: str) -> IUsageBackend:
        return namedAny(self.generator)(argstring)


def installed() -> Dict[str, IUsageBackendFactory]:
    """Every usage backend plugin on sys.path, by name."""
    return {factory.name: factory for factory in getPlugins(IUsageBackendFactory)}


def make_backend(description: str) -> Tuple[str, IUsageBackend]:
    """`NAME:ARGS` -> (NAME, its backend); ValueError naming what is wrong."""
    name, _, argstring = description.partition(":")
    factory = installed().get(name)
    if factory is None:
        raise ValueError(f"{name!r} is not an installed backend (see --help-accounting)")
    try:
        return name, factory.make(argstring)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


sqlite_usage = UsageBackendFactory(
    "sqlite", "relay.ledger.sql.sqlite_backend",
    "A SQLite file in WAL mode, one per relay: the default, in --state-dir/usage.db.",
    "path=PATH")
postgresql_usage = UsageBackendFactory(
    "postgresql", "relay.ledger.sql.postgresql_backend",
    "A PostgreSQL database, one ledger for a fleet of relays (needs the postgresql extra).",
    "dsn=postgresql://USER@HOST:PORT/DBNAME")
jsonl_usage = UsageBackendFactory(
    "jsonl", "relay.ledger.jsonl.jsonl_backend",
    "Append-only JSON lines, one record per line, fsync'd on each batch; one file per relay.",
    "path=PATH")
