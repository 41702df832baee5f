"""One TURN allocation: its relay sockets, permissions, channels, lifetime and counters.

The `from_*` methods are the relay's hot path, called once per relayed packet: a header
unpack, a dict lookup or two, plain integer additions and one send.  Expired permissions and
channels are swept by `TurnServer.tick`, so the hot path never reads a clock; an allocation
knows when its next one ends, so that most ticks pass it by.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, Protocol, Tuple, Union, cast

from relay.core.credentials import Account
from relay.core.peers import LiveRelays
from relay.core.tcp import PENDING, StreamRelayEndpoint, TcpConnection
from relay.proto import stun

Address = Tuple[str, int]
PERMISSION_LIFETIME = 300
CHANNEL_LIFETIME = 600
# After a channel expires, neither its number nor its peer may be bound to anything else
# for this long (RFC 8656 section 12).
CHANNEL_COOLDOWN = 300

_CHANNEL = stun.CHANNEL_HEADER
_PADDING = stun.PADDING
_transaction_id = stun.TransactionIds()

# What an allocation has none of yet: channels, channels in cooldown, peer data connections
# (UDP allocations never have any).  Many allocations never have any, and an empty dict costs
# 64 bytes, so they share this read-only one until their first entry (a write to it raises).
NONE_YET: Any = MappingProxyType({})


NEVER = float("inf")

# A budget without a limit: never reached in a second, so the hot path needs no "0 means
# unlimited" test.
UNLIMITED = 1 << 62


class Budget:
    """Bytes and packets that may still be relayed this second, both directions together.

    Refilled once a second by the core's tick (`refill`), so the hot path spends with integer
    compares and subtractions and never reads a clock.  One belongs to each allocation with a
    limit; one per account is shared by all of that account's allocations on this relay.
    """

    __slots__ = ("bandwidth", "packet_rate", "bytes", "packets", "users")

    def __init__(self, bandwidth: int = 0, packet_rate: int = 0):
        self.bandwidth = bandwidth      # bytes per second, 0 = unlimited
        self.packet_rate = packet_rate  # packets per second, 0 = unlimited
        self.users = 0                  # allocations sharing it (the core's bookkeeping)
        self.bytes = self.packets = 0
        self.refill()

    @property
    def limited(self) -> bool:
        return bool(self.bandwidth or self.packet_rate)

    def refill(self) -> None:
        # A TCP relay cannot drop what it has read, so it may overdraw (tcp_connections): the
        # debt is paid from the next second's budget.  Datagrams never overdraw.
        self.bytes = min(self.bytes, 0) + (self.bandwidth or UNLIMITED)
        self.packets = min(self.packets, 0) + (self.packet_rate or UNLIMITED)

    def affords(self, size: int) -> bool:
        """Room for a datagram of `size` bytes (`affords(1)`: neither balance is spent)."""
        return size <= self.bytes and self.packets >= 1

    def charge(self, size: int) -> None:
        """Take a packet of `size` bytes, even beyond the balance (a debt)."""
        self.bytes -= size
        self.packets -= 1


NO_LIMIT = Budget()


class RelayEndpoint(Protocol):
    """A bound relay socket, provided by the I/O layer (see `relay.net.listeners`)."""

    address: Address

    def send(self, data: bytes, peer: Address) -> None: ...

    def attach(self, receiver: Callable[[bytes, Address], None]) -> None: ...

    def close(self) -> None: ...


class ForwardingTables(Protocol):
    """An allocation's entries in a data plane outside Python (`relay.net.native`), which
    relays its datagrams from what these install and counts them, until `close`."""

    def permit(self, ip: str, native_send: bool) -> None: ...

    def unpermit(self, ip: str) -> None: ...

    def bind(self, number: int, peer: Address) -> None: ...

    def unbind(self, number: int) -> None: ...

    def collect(self) -> None:
        """Add what it relayed since the last call to the allocation's counters."""

    def close(self) -> None:
        """Collect, then stop using the relay sockets: they may be closed next."""


# A UDP allocation's relayed addresses are RelayEndpoints, a TCP allocation's (RFC 6062)
# StreamRelayEndpoints; the methods of one kind are only called where `tcp` says which it is.
AnyRelayEndpoint = Union[RelayEndpoint, StreamRelayEndpoint]


class Addresses(Protocol):
    """A set of transport addresses (`relay.core.peers.OwnEndpoints`, or a frozenset)."""

    def __contains__(self, address: Address) -> bool: ...


class Allocation:
    # Slots: an idle allocation is mostly this object, and with its 32 attributes (above the
    # 30 a shared-key instance dict holds on CPython 3.11) its dict alone took 1.6 kB.
    __slots__ = ("key", "client", "transport", "username", "session_id", "account", "relays",
                 "send_to_client", "own", "relay_only", "live", "stream", "started", "expires",
                 "permissions", "channels", "channel_of_peer", "cooldown", "budget",
                 "account_budget", "limited", "bytes_from_client", "packets_from_client",
                 "bytes_to_client", "packets_to_client", "limited_packets", "limited_bytes",
                 "tcp", "connections", "tables", "login_key", "algorithm", "due")

    def __init__(self, key: Tuple[Hashable, Address], client: Address, transport: str,
                 username: str, account: Account, relays: Mapping[int, AnyRelayEndpoint],
                 send_to_client: Callable[[bytes], None], started: float, expires: float,
                 session_id: str, budget: Optional[Budget] = None,
                 account_budget: Optional[Budget] = None, tcp: bool = False,
                 own: Addresses = frozenset(), live: Optional[LiveRelays] = None,
                 login_key: Optional[bytes] = None, algorithm: int = stun.ALGORITHM_MD5):
        self.key = key
        # Set by the I/O layer when a native data plane relays this allocation's datagrams:
        # every permission and channel change then reaches it too.
        self.tables: Optional[ForwardingTables] = None
        # The long-term key and algorithm its Allocate logged in with: the later requests of
        # the same user signed with them need no login of their own (TurnServer._credentials).
        self.login_key, self.algorithm = login_key, algorithm
        # Names this allocation in the log and in the usage ledger: a 5-tuple is reused, this
        # is not.
        self.session_id = session_id
        self.client = client
        self.transport = transport
        self.username = username
        self.account = account
        self.relays = relays
        self.send_to_client = send_to_client
        # The relay's own endpoints: a permission is for a peer's IP address, any port, and
        # must not let a Send indication reach one of our listeners.
        self.own = own
        # Peer IPs the peer rules forbid, permitted only as this relay's own live relayed
        # addresses (`LiveRelays`): a Send indication to one must name a live one, and a
        # channel to one ends with the allocation it reached (`drop_ended_relays`).
        self.relay_only: Dict[str, bool] = NONE_YET
        self.live = live
        self.stream = transport != "udp"
        self.started = started
        self.expires = expires
        self.permissions: Dict[str, float] = {}       # peer IP -> expiry
        # No later than the first end of a permission, a channel or a cooldown: before it,
        # `sweep` has nothing to drop.  An idle relay holds thousands of allocations, and
        # sweeping each of them every second cost a few microseconds apiece.
        self.due = NEVER
        # The next three: NONE_YET until `bind_channel`, `sweep` make them dicts.
        self.channels: Dict[int, Tuple[Address, Callable[[bytes, Address], None], float]] = NONE_YET
        self.channel_of_peer: Dict[Address, int] = NONE_YET
        self.cooldown: Dict[int, Tuple[Address, float]] = NONE_YET  # expired channel -> (peer, until)
        # Rate limits (this allocation's, its account's): checked only when there are any.
        # Spending from an unlimited budget never exhausts it: 2**62 bytes outlast any allocation.
        self.budget, self.account_budget = budget or NO_LIMIT, account_budget or Budget()
        self.limited = self.budget.limited or self.account_budget.limited
        self.bytes_from_client = self.packets_from_client = 0
        self.bytes_to_client = self.packets_to_client = 0
        # What the limits dropped, both directions: the relay's abuse counters.
        self.limited_packets = self.limited_bytes = 0
        # RFC 6062: a TCP allocation relays over its peer data connections, by CONNECTION-ID.
        self.tcp = tcp
        self.connections: Dict[int, TcpConnection] = {} if tcp else NONE_YET

    def start_relaying(self) -> None:
        """Have its relay sockets' datagrams come to `from_peer`, once the opened observers
        have run: none of that when a data plane outside Python took them then (`tables`),
        so their descriptors never enter the reactor just to leave it again."""
        if not self.tcp and self.tables is None:
            for relay in self.relays.values():
                cast(RelayEndpoint, relay).attach(self.from_peer)

    def from_peer(self, data: bytes, peer: Address) -> None:
        """A datagram arrived on a relay socket: pass it to the client if a permission allows."""
        if peer[0] not in self.permissions:
            return
        size = len(data)
        if self.limited and not self._spend(size):
            return
        number = self.channel_of_peer.get(peer)
        if number is not None:
            frame = _CHANNEL.pack(number, size) + data
            if self.stream and size & 3:
                frame += _PADDING[size & 3]
        else:
            frame = stun.data_indication(data, peer, _transaction_id())
        self.bytes_to_client += size
        self.packets_to_client += 1
        self.send_to_client(frame)

    def from_client_channel(self, data: bytes) -> None:
        """ChannelData from the client: relay its payload to the channel's peer."""
        number, size = _CHANNEL.unpack_from(data)
        channel = self.channels.get(number)
        if channel is None or size > len(data) - 4:
            return
        peer, send, _ = channel
        if peer[0] not in self.permissions:
            return
        if self.limited and not self._spend(size):
            return
        self.bytes_from_client += size
        self.packets_from_client += 1
        send(data[4:4 + size], peer)

    def from_client_send(self, data: bytes) -> None:
        """A Send indication from the client: relay its DATA to its XOR-PEER-ADDRESS."""
        parsed = stun.parse_send_indication(data)
        if parsed is None:
            return
        peer, payload = parsed
        relay = self.relays.get(stun.address_family(peer[0]))
        # A TCP allocation relays no datagrams (RFC 6062): a Send indication on it is dropped.
        if relay is None or self.tcp or peer[0] not in self.permissions or peer in self.own:
            return
        if peer[0] in self.relay_only and not (self.live and self.live.live(peer, False)):
            return
        size = len(payload)
        if self.limited and not self._spend(size):
            return
        self.bytes_from_client += size
        self.packets_from_client += 1
        cast(RelayEndpoint, relay).send(payload, peer)

    def _spend(self, size: int) -> bool:
        """Take one packet of `size` bytes from this second's budgets, the allocation's and its
        account's; False (drop, and count it) when either would overdraw."""
        own, shared = self.budget, self.account_budget
        if not (own.affords(size) and shared.affords(size)):
            self.limited_packets += 1
            self.limited_bytes += size
            return False
        own.charge(size)
        shared.charge(size)
        return True

    def permit(self, ip: str, expiry: float) -> None:
        """A permission for peer `ip` until `expiry` (new, or refreshed)."""
        if self.tables is not None and ip not in self.permissions:
            self.tables.permit(ip, ip not in self.relay_only)
        self.permissions[ip] = expiry
        if expiry < self.due:
            self.due = expiry

    def revoke(self, ip: str) -> None:
        del self.permissions[ip]
        if self.tables is not None:
            self.tables.unpermit(ip)

    def _unbind(self, number: int) -> Address:
        peer = self.channels.pop(number)[0]
        self.channel_of_peer.pop(peer, None)
        if self.tables is not None:
            self.tables.unbind(number)
        return peer

    def permit_relay_only(self, ip: str) -> None:
        """`ip` is permitted only as one of the relay's live relayed addresses."""
        if self.relay_only is NONE_YET:
            self.relay_only = {}
        self.relay_only[ip] = True
        if self.tables is not None and ip in self.permissions:
            self.tables.permit(ip, False)  # its Send indications: the live check is Python's

    def drop_ended_relays(self) -> None:
        """Unbind channels to relay-only peers whose allocation has ended (every tick): the
        port is free again, and whatever binds it next is no allocation of ours."""
        for number, (peer, _, _) in list(self.channels.items()):
            if peer[0] in self.relay_only and not (self.live and self.live.live(peer, False)):
                self._unbind(number)

    def bind_channel(self, number: int, peer: Address, now: float) -> None:
        relay = cast(RelayEndpoint, self.relays[stun.address_family(peer[0])])  # not TCP: 400 before
        if self.channels is NONE_YET:
            self.channels, self.channel_of_peer = {}, {}
        expiry = now + CHANNEL_LIFETIME
        self.channels[number] = (peer, relay.send, expiry)
        self.channel_of_peer[peer] = number
        if expiry < self.due:
            self.due = expiry
        if self.tables is not None:
            self.tables.bind(number, peer)
        if number in self.cooldown:
            del self.cooldown[number]

    def channel_conflict(self, number: int, peer: Address, now: float) -> bool:
        """True when binding `number` to `peer` would rebind either one (RFC 8656 12.2)."""
        bound = self.channels.get(number)
        if bound is not None and bound[0] != peer:
            return True
        if self.channel_of_peer.get(peer, number) != number:
            return True
        held = self.cooldown.get(number)
        if held is not None and held[1] > now and held[0] != peer:
            return True
        return any(p == peer and until > now and n != number for n, (p, until) in self.cooldown.items())

    def sweep(self, now: float) -> None:
        """Drop expired permissions and channels (into cooldown); refill this allocation's
        budget (the core refills the accounts' and the shared unlimited one)."""
        if self.budget is not NO_LIMIT:
            self.budget.refill()
        if now < self.due and not self.connections:
            return
        for ip in [ip for ip, expiry in self.permissions.items() if expiry <= now]:
            self.revoke(ip)
        for number in [n for n, (_, _, expiry) in self.channels.items() if expiry <= now]:
            if self.cooldown is NONE_YET:
                self.cooldown = {}
            self.cooldown[number] = (self._unbind(number), now + CHANNEL_COOLDOWN)
        for number in [n for n, (_, until) in self.cooldown.items() if until <= now]:
            del self.cooldown[number]
        for connection in [c for c in self.connections.values()
                           if c.state == PENDING and c.deadline <= now]:
            connection.close()  # RFC 6062 section 5.3: no ConnectionBind within the deadline
        self.due = min(min(self.permissions.values(), default=NEVER),
                       min((expiry for _, _, expiry in self.channels.values()), default=NEVER),
                       min((until for _, until in self.cooldown.values()), default=NEVER))

    def resume_throttled(self) -> None:
        """After the budgets' refill: TCP connections paused by the rate limits read again."""
        if self.within_budget():
            for connection in self.connections.values():
                connection.unthrottle()

    def overdraw(self, size: int) -> bool:
        """Charge a stream read of `size` bytes, which cannot be dropped, so a budget may go
        below zero; False once either budget is spent (the connections then pause)."""
        self.budget.charge(size)
        self.account_budget.charge(size)
        return self.within_budget()

    def within_budget(self) -> bool:
        return self.budget.affords(1) and self.account_budget.affords(1)

    def close(self) -> None:
        if self.tables is not None:
            self.tables.close()  # its counts in, its relay sockets released, before they close
            self.tables = None
        for connection in list(self.connections.values()):
            connection.close()
        for relay in self.relays.values():
            relay.close()
        self.relays = {}

