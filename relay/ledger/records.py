"""The usage ledger's records, and the interfaces its backends and their plugins provide.

A session is one allocation: a `SessionStarted` when it is made, `UsageDelta`s while it relays,
a `SessionEnded` when it ends.  A delta is the usage since the session's previous delta, so a
session's deltas sum to its totals.  (session_id, seq) is a delta's key, and a backend keeps a
key once however often it is written: the ledger writes a batch again whenever it cannot know
that the last attempt was stored (a connection lost before the commit's answer).

What is counted is what `relay.core.allocation` counts: payload bytes and packets, the application
data inside ChannelData or the DATA attribute, without STUN or ChannelData headers or padding.
Times are UTC in RFC 3339 to the second (`2026-11-23T12:00:00Z`): fixed width, so they sort
and compare as text in every backend, and a report can cut them by day or month as text.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple, Union

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

# Why sessions end: the reasons `relay.core.server.TurnServer` closes allocations with.
END_REASONS = ("expired", "deleted", "revoked", "quota", "disconnected", "shutdown")


@dataclass(frozen=True)
class SessionStarted:
    """Who pays for a session, and where and how it ran."""

    session_id: str                    # UUIDv7 hex (time-ordered), made at Allocate
    account_id: str
    username: str
    region: str
    transport: str                     # "udp", "tcp" or "tls": the client's transport
    client_address: str                # "198.51.100.7:40000" or "[2001:db8::7]:40000"
    relay_addresses: Tuple[str, ...]   # as advertised to the client, one per family
    started_at: str


@dataclass(frozen=True)
class UsageDelta:
    """Usage of one session since its previous delta."""

    session_id: str
    seq: int                           # 1, 2, 3... within the session
    bytes_from_client: int
    packets_from_client: int
    bytes_to_client: int
    packets_to_client: int
    at: str


@dataclass(frozen=True)
class SessionEnded:
    session_id: str
    ended_at: str
    end_reason: str                    # one of END_REASONS


Record = Union[SessionStarted, UsageDelta, SessionEnded]
RECORD_TYPES = {SessionStarted: "session", UsageDelta: "usage", SessionEnded: "end"}


def as_dict(record: Record) -> Dict[str, Any]:
    """`record` as JSON-ready fields, its kind first under "type": a line of the `jsonl`
    backend, and a ready form for a third party's backend."""
    return {"type": RECORD_TYPES[type(record)], **dataclasses.asdict(record)}


class IUsageBackend(Interface):
    """Where usage records are kept.  The ledger hands a backend one batch at a time, in the
    order the records were made, and waits for its outcome before the next."""

    def write(records: Sequence[Record]) -> Deferred:
        """Store `records`; fire once they are durable, fail to have the same batch written
        again later.  Idempotent: a delta already stored under its (session_id, seq), a session
        already started or already ended, is left as it is."""

    def close() -> Deferred:
        """Release what the backend holds; nothing is written after."""


class IUsageBackendFactory(Interface):
    """A usage backend plugin, found with `twisted.plugin.getPlugins` and chosen on the command
    line with `--accounting NAME:ARGS`, as auth backends are chosen with `--auth`."""

    name = Attribute("The NAME --accounting chooses it by, e.g. 'sqlite'")
    help = Attribute("What it stores where, for --help-accounting")
    argStringFormat = Attribute("The ARGS it takes, e.g. 'path=PATH'")

    def make(argstring: str) -> IUsageBackend:
        """A backend configured by `argstring`.  ValueError names a wrong argument and never
        echoes its value: a DSN may hold a password."""


class IClientAddressRetention(Interface):
    """A backend that can blank the client addresses it keeps (personal data) while keeping
    the usage: `--client-address-retention DAYS` calls it periodically."""

    def forget_client_addresses(ended_before: str) -> Deferred:
        """Blank the client address of every session that ended before `ended_before`
        (RFC 3339 UTC); fire with how many were blanked.  Live sessions keep theirs."""
