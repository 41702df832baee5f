"""Allocation quotas that span the worker processes of one relay (`--workers`).

Each worker's core counts only its own allocations, but `--total-quota`, `--user-quota`,
`--source-quota` and an account's `max_allocations` bound the relay as a whole, and one user's
allocations land on several workers (the kernel spreads clients over them by their address and
port).  So the parent keeps the one count (`QuotaBook`) and a worker reserves a place in it
before each new allocation (`SharedQuotas`), then releases it when the allocation ends or
never comes to be.  A worker that dies loses its places with it.  The core's own checks still
run after a reservation; they only ever see fewer allocations than the book.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Optional, Set, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relay.core.allocation import Allocation
from relay.core.credentials import Account, StunCredentials
from relay.core.redirect import FULL
from relay.core.server import Client, TurnServer
from relay.proto import stun

log = Logger(namespace="turnrelay")
GRANTED = 0


@dataclass(frozen=True)
class Place:
    """What one allocation counts against."""

    username: str
    account: str
    source: str  # the client's IP address


class QuotaBook:
    """The parent's count of every worker's allocations (sans-IO: no process, no socket)."""

    def __init__(self, total: int, per_user: int, per_source: int):
        self.total, self.per_user, self.per_source = total, per_user, per_source
        self.places: Dict[Tuple[int, int], Place] = {}  # (worker, reservation) -> its place
        # ("user"|"account"|"source", name) -> allocations, and ("account", name, worker) ->
        # those of them the worker holds.
        self.counts: Dict[Tuple[Hashable, ...], int] = {}

    def reserve(self, worker: int, reservation: int, place: Place, max_allocations: int) -> int:
        """GRANTED, with the place taken, or the STUN error code of the limit in the way."""
        counts = self.counts
        if self.total and len(self.places) >= self.total:
            return 508
        for key, limit in ((("account", place.account), max_allocations),
                           (("user", place.username), self.per_user),
                           (("source", place.source), self.per_source)):
            if limit and counts.get(key, 0) >= limit:
                return 486
        self.places[(worker, reservation)] = place
        for key in self._keys(place, worker):
            counts[key] = counts.get(key, 0) + 1
        return GRANTED

    def release(self, worker: int, reservation: int) -> Optional[Place]:
        """The place given back, or None if it was not held."""
        place = self.places.pop((worker, reservation), None)
        if place is None:
            return None
        for key in self._keys(place, worker):
            left = self.counts.pop(key) - 1
            if left:
                self.counts[key] = left
        return place

    def share(self, account: str, worker: int) -> float:
        """The fraction of the account's allocations `worker` holds: its part of the account's
        rate limits (`TurnServer.set_account_share`)."""
        total = self.counts.get(("account", account), 0)
        return self.counts.get(("account", account, worker), 0) / total if total else 0.0

    def forget(self, worker: int) -> Set[str]:
        """A worker ended: so did its allocations.  The accounts they belonged to."""
        return {self.release(held, reservation).account
                for held, reservation in [key for key in self.places if key[0] == worker]}

    @staticmethod
    def _keys(place: Place, worker: int) -> Tuple[Tuple[Hashable, ...], ...]:
        return (("user", place.username), ("account", place.account), ("source", place.source),
                ("account", place.account, worker))


# How a worker asks its parent: reserve(reservation, place, max_allocations) -> code, and
# release(reservation), each a remote call (relay.service.workers).
Reserve = Callable[[int, Place, int], "Deferred[int]"]
Release = Callable[[int], None]


class SharedQuotas:
    """A worker's side: a new Allocate goes to the core only once the parent's book has a
    place for it, and the place goes back when the allocation ends."""

    def __init__(self, server: TurnServer, clock: IReactorTime, reserve: Reserve,
                 release: Release, always: bool):
        self.server, self.clock = server, clock
        # Whether relay-wide limits are set; else only accounts with max_allocations reserve.
        self.always = always
        self._reserve, self._release = reserve, release
        self._ids = itertools.count(1)
        self._held: Dict[Hashable, int] = {}  # allocation key -> its reservation
        server.closed_observers.append(self._closed)

    def _closed(self, allocation: Allocation, reason: str) -> None:
        reservation = self._held.pop(allocation.key, None)
        if reservation is not None:
            self._release(reservation)

    def wants(self, client: Client, credentials: StunCredentials, account: Account) -> bool:
        """Whether this authenticated request must reserve first: an Allocate, under some
        limit, by a client without an allocation (any other is answered 437 by the core)."""
        return (self.always or bool(account.max_allocations)) \
            and credentials.message.method == stun.ALLOCATE \
            and client.key not in self.server.allocations

    def allocate(self, client: Client, credentials: StunCredentials, account: Account) -> None:
        reservation = next(self._ids)
        place = Place(credentials.username, account.account_id, client.address[0])
        d = self._reserve(reservation, place, account.max_allocations)
        d.addCallback(self._answered, reservation, client, credentials, account)
        d.addErrback(self._failed, client, credentials)

    def _answered(self, code: int, reservation: int, client: Client,
                  credentials: StunCredentials, account: Account) -> None:
        now = self.clock.seconds()
        if code != GRANTED:
            # 508 is the relay's --total-quota: full, so the client is sent elsewhere if it
            # can be; 486 a user's, an account's or an address's quota.
            err = self.server.redirect(client, FULL) if code == 508 \
                else stun.StunError(486, "Allocation Quota Reached")
            self.server.refused(client, credentials, err, now)
            return
        self.server.authenticated(client, credentials, account, now)
        # Two Allocates of one client in flight at once: the second finds the first's
        # allocation (and has been answered 437), so only the first keeps its place.
        if client.key in self.server.allocations and client.key not in self._held:
            self._held[client.key] = reservation
        else:
            self._release(reservation)

    def _failed(self, failure, client: Client, credentials: StunCredentials) -> None:
        log.failure("the parent process did not answer a quota reservation", failure)
        self.server.server_error(client, credentials.message)
