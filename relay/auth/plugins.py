"""Auth backends as twisted.cred checker-factory plugins, chosen with `--auth TYPE:ARGS`.

A third party adds a backend by dropping a module into any `twisted/plugins/` directory on
sys.path with an object providing `ICheckerFactory` whose `credentialInterfaces` include
`IStunCredentials`; turnrelay finds it with `getPlugins`, as it finds its own below.

ARGS are `name=value` pairs separated by commas (`db:dsn=postgresql://h/db,secret-file=/s`);
a value may itself hold colons.  Error messages name the argument, never echo its value:
a DSN or a path may be a secret.
"""
from __future__ import annotations

import importlib

from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.auth.cred import IStunCredentials


def truth(value: str, name: str) -> bool:
    if value.lower() in ("1", "yes", "true", "on"):
        return True
    if value.lower() in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{name}: expected yes or no")


@implementer(ICheckerFactory, IPlugin)
class CheckerFactory:
    """A checker plugin whose backend module is imported only when chosen, like ServiceMaker."""

    credentialInterfaces = (IStunCredentials,)

    def __init__(self, authType: str, generator: str, authHelp: str, argStringFormat: str):
        self.authType = authType
        self.generator = generator  # "module.function", called with the argstring
        self.authHelp = authHelp
        self.argStringFormat = argStringFormat

    def generateChecker(self, argstring: str = ""):
        module, _, function = self.generator.rpartition(".")
        return getattr(importlib.import_module(module), function)(argstring)


static = CheckerFactory(
    "static", "relay.auth.checkers.static_checker",
    "Users from a TOML file ([users.NAME] with password=... or key=<MD5 hex>, optional "
    "account=...), re-read on SIGHUP.", "file=PATH")
rest_secret = CheckerFactory(
    "rest-secret", "relay.auth.checkers.rest_secret_checker",
    "Time-limited TURN REST credentials: username <unix-expiry>:<account>[:<label>], "
    "password base64(HMAC-SHA1(secret, username)). The file holds one secret per line; all "
    "verify, for rotation. skew: seconds of clock skew allowed (default 30).",
    "secret-file=PATH[,skew=SECONDS]")
db = CheckerFactory(
    "db", "relay.auth.db_checker.db_checker",
    "TURN REST credentials for accounts kept in SQLite or PostgreSQL, with status, quotas, "
    "bandwidth caps and revocation, checked again every few seconds.",
    "dsn=sqlite:///PATH|postgresql://...,secret-file=PATH[,skew=SECONDS]")
