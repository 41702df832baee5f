"""The TURN server's protocol core (RFC 8656 over RFC 8489): state and decisions, no I/O.

Sockets are not opened here: relay ports come from an injected `bind` function, replies leave
through the `send` callable of the `Client` they answer, and time arrives as an argument.
Authentication is the one step that may wait (a database checker), so a request that needs it
is handled in two halves: `receive` returns the `StunCredentials` to log in with, and the
caller passes the outcome to `authenticated` or `login_failed`.  A TCP allocation's Connect
(RFC 6062, dispatched to `relay.core.tcp_relay`) waits too: the I/O layer connects to the peer
and reports back, and the answer goes out then.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, Iterable, Iterator, List, Optional, Tuple, cast

from relay.core.allocation import (
    NO_LIMIT,
    PERMISSION_LIFETIME,
    Address,
    Allocation,
    AnyRelayEndpoint,
    Budget,
    RelayEndpoint,
)
from relay.core.client import Client
from relay.core.credentials import Account, StunCredentials
from relay.core.issuer import issue, issuer
from relay.core.nonces import FEATURE_USERNAME_ANONYMITY, NonceIssuer, NonceStatus
from relay.core.peers import LiveRelays, PeerPolicy
from relay.core.ratelimit import RateLimiter
from relay.core.redirect import DRAINING, FULL, Alternate, Redirects, try_alternate
from relay.core.remembered import RememberedAnswers
from relay.core.tcp import StreamRelayEndpoint
from relay.core.tcp_relay import TcpRelay
from relay.proto import stun
from relay.util.secure_random import PooledSystemRandom

UDP_PROTOCOL = 17
TCP_PROTOCOL = 6
RESERVATION_LIFETIME = 30
# Answers remembered for retransmissions (relay.core.remembered) from 40 to 80 s: RFC 8489
# section 6.3.1's 40 s covers a UDP client's retransmits.  At most 100,000: a flood of
# requests must not grow them without bound.
RESPONSE_CACHE_LIFETIME = 40
RESPONSE_CACHE_SIZE = 100_000
_BIND_ATTEMPTS = 40

# bind(host, port, dont_fragment) -> a bound RelayEndpoint, or None when the port is taken.
Binder = Callable[[str, int, bool], Optional[RelayEndpoint]]
# bind_stream(host, port) -> a listening TCP relay endpoint, or None when the port is taken.
StreamBinder = Callable[[str, int], Optional[StreamRelayEndpoint]]


@dataclass
class TurnConfig:
    realm: str
    relay_ips: Dict[int, str]                        # stun.FAMILY_* -> relay socket address
    external_ips: Dict[str, str] = field(default_factory=dict)  # relay IP -> advertised IP
    min_port: int = 49152
    max_port: int = 65535
    default_lifetime: int = 600
    max_lifetime: int = 3600
    user_quota: int = 0       # concurrent allocations per username, 0 = unlimited
    source_quota: int = 0     # concurrent allocations per client IP address, 0 = unlimited
    total_quota: int = 0      # concurrent allocations in this process, 0 = unlimited
    max_permissions: int = 64
    max_channels: int = 64
    # Highest channel number ChannelBind accepts: RFC 8656's, or RFC 5766's for old clients.
    max_channel: int = stun.MAX_CHANNEL
    # What one valid login may relay, both directions together, 0 = unlimited: per allocation
    # (the account database's bandwidth_bps too, whichever is lower) and per account (all its
    # allocations in this process).  Excess is dropped and counted.
    max_bps: int = 0
    max_pps: int = 0
    account_max_bps: int = 0
    account_max_pps: int = 0
    software: Optional[str] = None
    policy: PeerPolicy = field(default_factory=PeerPolicy)
    password_algorithms: Tuple[int, ...] = (stun.ALGORITHM_SHA256, stun.ALGORITHM_MD5)
    # The other relays of this region, where a draining or full server sends new Allocates
    # first (relay.core.redirect): UDP/TCP clients to `alternate_servers`, TLS clients to
    # `tls_alternate_servers` with `alternate_domain` (the name their certificate check needs).
    alternate_servers: Tuple[Address, ...] = ()
    tls_alternate_servers: Tuple[Address, ...] = ()
    alternate_domain: Optional[str] = None
    # RFC 6062 TCP allocations: seconds a peer data connection waits for its ConnectionBind,
    # and at most this many peer data connections per allocation (508/refused beyond).
    tcp_bind_timeout: float = 30.0
    max_tcp_connections: int = 64
    # Read by the stream adapter: a client data connection idle this long (no byte either
    # way) is closed.
    tcp_idle_timeout: float = 600.0
    # Which of how many worker processes (relay.service.workers) this server is: the
    # CONNECTION-IDs and RESERVATION-TOKENs it issues say so (relay.core.issuer).
    worker_index: int = 0
    worker_count: int = 1
    # A worker's min_port-max_port is its slice of the relay's range, this one (or None).
    whole_range: Optional[Tuple[int, int]] = None


@dataclass
class ServerStats:
    """Running totals for the metrics, read when scraped: each a plain integer addition, made
    once per allocation or request, never per relayed packet.  `closed_usage` keeps what ended
    allocations relayed, so the relayed totals never go down when one closes."""

    created: Dict[str, int] = field(default_factory=dict)         # transport -> allocations
    allocate_errors: Dict[int, int] = field(default_factory=dict)  # error code -> Allocates
    auth_failures: int = 0
    # transport -> [bytes, packets from the client, bytes, packets to the client]
    closed_usage: Dict[str, List[int]] = field(default_factory=dict)
    closed: Dict[str, int] = field(default_factory=dict)  # end reason -> allocations
    # [packets, bytes] the rate limits dropped in ended allocations (live ones hold their own).
    closed_limited: List[int] = field(default_factory=lambda: [0, 0])
    redirected: Dict[str, int] = field(default_factory=dict)  # draining|full -> Allocates


@dataclass
class Reservation:
    """A port held back by EVEN-PORT's R bit for a later Allocate with RESERVATION-TOKEN."""

    endpoint: RelayEndpoint
    expires: float


class TurnServer:
    def __init__(self, config: TurnConfig, nonces: NonceIssuer, bind: Binder,
                 auth_limiter: Optional[RateLimiter] = None, rng: Optional[random.Random] = None,
                 allocation_policy: Callable[[str, Account, float], bool] = lambda u, a, now: True,
                 bind_stream: Optional[StreamBinder] = None, live: Optional[LiveRelays] = None):
        self.config = config
        # This relay's live relayed addresses, every worker's (shared memory then): peers
        # even where the peer rules refuse the relay's own address (loopback, private).
        self.live = live if live is not None else LiveRelays(config.relay_ips.values(),
                                                             config.external_ips)
        self.live.clear(config.min_port, config.max_port)  # none of ours is live yet
        self.bind_stream = bind_stream
        # Asked every tick whether each allocation's login still stands (expiry, revocation,
        # suspension): the auth backends' verdicts can change after the Allocate.
        self.allocation_policy = allocation_policy
        self.nonces = nonces
        self.bind = bind
        self.auth_limiter = auth_limiter or RateLimiter(rate=2.0, burst=20)
        self.rng = rng or PooledSystemRandom()
        self.allocations: Dict[Tuple[Hashable, Address], Allocation] = {}
        self.reservations: Dict[bytes, Reservation] = {}
        # Account id -> the budget its allocations here share; its `users` counts them, so it
        # goes with the last one, and an Allocate checks max_allocations without a scan.
        self._account_budgets: Dict[str, Budget] = {}
        # What a budget with a limit is made as: relay.net.native makes it the data plane's, so
        # that its thread and this core spend one balance.
        self.limited_budget: Callable[[int, int], Budget] = Budget
        # Worker processes (relay.service.workers): account id -> this process's share of the account's
        # --account-max-bps/pps, as the parent last told it (absent: the whole of them).
        self._account_shares: Dict[str, float] = {}
        self._answers = RememberedAnswers(RESPONSE_CACHE_LIFETIME, RESPONSE_CACHE_SIZE)
        # Told of each new allocation, and of each allocation's end with its reason, in turn:
        # the operator's log (relay.service.eventlog), the usage ledger (its first and last
        # readings), and in a worker process the quotas shared with the others.
        self.opened_observers: List[Callable[[Allocation], None]] = []
        self.closed_observers: List[Callable[[Allocation, str], None]] = []
        # The usage ledger's seam (relay.ledger.writer): asked before each Allocate whether one
        # more session can be recorded; False answers 508.
        self.may_allocate: Callable[[], bool] = lambda: True
        self.stats = ServerStats()
        # Set by `drain` (SIGTERM): new Allocates are redirected or refused, the rest goes on.
        self.draining = False
        # Where new Allocates go while draining or full, beyond `config`'s alternates: the
        # other regions' relays, kept current by the service layer.
        self.redirects = Redirects()
        # The monthly byte quota's seam (relay.ledger.monthly_quota): asked before each Allocate (True answers
        # 486) and, every tick, for each allocation (True closes it, reason "quota").
        self.over_quota: Callable[[Account], bool] = lambda account: False
        # RFC 6062's requests and CONNECTION-IDs (relay.core.tcp_relay).
        self.tcp = TcpRelay(self)
        self.connections = self.tcp.connections
        self._algorithms_attr = [(alg, b"") for alg in config.password_algorithms]
        # A challenge's REALM and PASSWORD-ALGORITHMS, encoded once: every new client gets one.
        self._realm_attr = (stun.REALM, stun.Message(0, 0, b"").add(stun.REALM, config.realm)
                            .attributes[0][1])
        self._algorithms_wire = (stun.PASSWORD_ALGORITHMS, stun.Message(0, 0, b"").add(
            stun.PASSWORD_ALGORITHMS, self._algorithms_attr).attributes[0][1])
        self._handlers = {
            stun.ALLOCATE: self._allocate,
            stun.REFRESH: self._refresh,
            stun.CREATE_PERMISSION: self._create_permission,
            stun.CHANNEL_BIND: self._channel_bind,
            stun.CONNECT: self.tcp.connect,
            stun.CONNECTION_BIND: self.tcp.connection_bind,
        }

    # -- entry points -------------------------------------------------------------------------

    def receive(self, client: Client, data: bytes, now: float) -> Optional[StunCredentials]:
        """A STUN message from a client; returns credentials when a login must happen first."""
        try:
            msg = stun.parse(data)
        except stun.StunDecodeError:
            return None
        if msg.cls == stun.INDICATION:
            if msg.method == stun.SEND:
                self.send_indication(client, data)
            return None
        if msg.cls != stun.REQUEST:
            return None
        if msg.method == stun.CONNECTION_BIND and self.tcp.hand_over(client, msg):
            return None
        cached = self._answers.get((client.listener, client.address, msg.transaction_id))
        if cached is not None:
            client.send(cached)
            return None
        try:
            if msg.method == stun.BINDING:
                self._binding(client, msg)
                return None
            if msg.method not in self._handlers:
                raise stun.StunError(400, "Bad Request")
            return self._credentials(client, msg, now)
        except stun.StunError as err:
            self._reply(client, msg, self._failure(msg, err))
            return None

    def authenticated(self, client: Client, credentials: StunCredentials, account: Account,
                      now: float) -> None:
        """The login for `credentials` succeeded: run the request and answer it, signed."""
        if not client.connected:
            return
        msg = credentials.message
        try:
            unknown = msg.unknown_required()
            if unknown:
                raise stun.StunError(420, "Unknown Attribute", [(stun.UNKNOWN_ATTRIBUTES, unknown)])
            response = self._handlers[msg.method](client, msg, credentials, account, now)
        except stun.StunError as err:
            response = self._failure(msg, err)
        if response is not None:  # None: the handler answers itself (Connect, ConnectionBind)
            self.answer(client, credentials, response, now)

    def login_failed(self, client: Client, credentials: StunCredentials, now: float) -> None:
        """Wrong user or password: a fresh challenge, unless this source has failed too often."""
        self.stats.auth_failures += 1
        if not self.auth_limiter.allow(client.address[0], now):
            return
        self._reply(client, credentials.message, self._challenge(client, credentials.message, 401,
                                                                 "Unauthorized", now))

    def refused(self, client: Client, credentials: StunCredentials, err: stun.StunError,
                now: float) -> None:
        """A check outside the core refused this authenticated request: the quotas the
        worker processes share (relay.service.quota_book)."""
        if client.connected:
            self.answer(client, credentials, self._failure(credentials.message, err), now)

    def server_error(self, client: Client, msg: stun.Message) -> None:
        """The auth backend failed: say so rather than blame the client's password."""
        self._reply(client, msg, self._failure(msg, stun.StunError(500, "Server Error")))

    def channel_data(self, client: Client, data: bytes) -> None:
        """ChannelData on a stream connection, whose client is known without a lookup."""
        allocation = self.allocations.get(client.key)
        if allocation is not None:
            allocation.from_client_channel(data)

    def send_indication(self, client: Client, data: bytes) -> None:
        """A Send indication, relayed without building a `Message`: the listeners call this
        directly, as they do `channel_data`, once they have seen its type."""
        allocation = self.allocations.get(client.key)
        if allocation is not None:
            allocation.from_client_send(data)

    def connection_lost(self, client: Client) -> None:
        """A TCP/TLS client went away: its allocation goes with it (RFC 8656 section 3.1)."""
        client.connected = False
        allocation = self.allocations.get(client.key)
        if allocation is not None:
            self._close(allocation, "disconnected")

    def tick(self, now: float) -> None:
        """Expire allocations, permissions, channels, reservations and cached responses."""
        allows = self.allocation_policy
        # Accounts' budgets first: an allocation's own is refilled by its sweep, and only with
        # both refilled may its throttled TCP connections read again.
        for budget in self._account_budgets.values():
            budget.refill()
        NO_LIMIT.refill()  # shared by every allocation without a limit of its own
        for allocation in list(self.allocations.values()):
            if allocation.expires <= now:
                self._close(allocation, "expired")
            elif not allows(allocation.username, allocation.account, now):
                self._close(allocation, "revoked")
            elif self.over_quota(allocation.account):
                self._close(allocation, "quota")
            else:
                allocation.sweep(now)
                if allocation.relay_only:
                    allocation.drop_ended_relays()
                if allocation.limited and allocation.connections:
                    allocation.resume_throttled()
        for token in [t for t, r in self.reservations.items() if r.expires <= now]:
            self.reservations.pop(token).endpoint.close()
        self._answers.expire(now)

    def refresh_counters(self) -> None:
        """Bring every allocation's counters up to this instant: what a native data plane
        relayed is counted there, and added here when the ledger or the metrics read them."""
        for allocation in self.allocations.values():
            if allocation.tables is not None:
                allocation.tables.collect()

    def forget_logins(self) -> None:
        """The credentials changed (SIGHUP): each allocation's next request logs in again."""
        for allocation in self.allocations.values():
            allocation.login_key = None

    def set_peer_rules(self, allowed: Iterable[str], denied: Iterable[str],
                       cluster: Iterable[str]) -> None:
        """New peer rules (SIGHUP), in the policy every part holds.  Permissions they forbid
        end at once, which stops relaying to those peers both ways, channels and Send
        included, and so do TCP connections to them (RFC 6062 data relays without looking at
        permissions); the allocations stay.  ValueError for a bad rule, the old ones kept."""
        policy = self.config.policy
        policy.set_rules(allowed, denied, cluster)
        for allocation in self.allocations.values():
            for ip in [ip for ip in allocation.permissions
                       if not policy.permits(ip, ip in allocation.relay_only)]:
                allocation.revoke(ip)
            for connection in [c for c in allocation.connections.values()
                               if not policy.permits(c.peer[0])]:
                connection.close()

    def reservation_owner(self, token: bytes) -> Optional[int]:
        """The worker process holding `token`'s reserved port, when it is another one: the
        client's Allocate with RESERVATION-TOKEN comes from a new client port, which the
        kernel may give to any worker.  The I/O layer then moves the port's socket here
        (`take_reservation` there, `adopt_reservation` here) before the Allocate runs."""
        count = self.config.worker_count
        if count == 1 or len(token) != 8:
            return None
        owner = issuer(int.from_bytes(token, "big"), count)
        return None if owner == self.config.worker_index else owner

    def take_reservation(self, token: bytes, now: float) -> Optional[Reservation]:
        """The reservation `token` names, given up to another worker; None if gone."""
        reservation = self.reservations.get(token)
        if reservation is None or reservation.expires <= now:
            return None
        return self.reservations.pop(token)

    def adopt_reservation(self, token: bytes, reservation: Reservation) -> None:
        """A reservation another worker gave up for an Allocate here."""
        self.reservations[token] = reservation

    def drain(self) -> None:
        """Stop taking allocations (see `_check_quotas`); the existing ones carry on."""
        self.draining = True

    def shutdown(self) -> None:
        for allocation in list(self.allocations.values()):
            self._close(allocation, "shutdown")
        for reservation in self.reservations.values():
            reservation.endpoint.close()
        self.reservations.clear()

    # -- replies ------------------------------------------------------------------------------

    def _failure(self, msg: stun.Message, err: stun.StunError) -> stun.Message:
        """The error response for `err`, counted per code when it refuses an Allocate."""
        if msg.method == stun.ALLOCATE:
            errors = self.stats.allocate_errors
            errors[err.code] = errors.get(err.code, 0) + 1
        return _error(msg, err)

    def answer(self, client: Client, credentials: StunCredentials, response: stun.Message,
               now: float) -> None:
        """The signed answer to an authenticated request, remembered 40 to 80 s when it came
        in a datagram, so that a retransmitted request gets the same answer (RFC 8489 section
        6.3.1; relay.core.remembered).

        Only these are remembered: the same section finds remembering inappropriate for a
        request that is not authenticated, and such a request's answer (a challenge, a stale
        nonce, a refused login, a bad request) changes no state, so a retransmission is answered
        afresh.  Nor can a flood of them push real answers out of the bounded memory."""
        if self.config.software:
            response.add(stun.SOFTWARE, self.config.software)
        request = credentials.message
        wire = self._reply(client, request, response, credentials.key)
        if client.datagram:  # over TCP or TLS, no client retransmits
            self._answers.put((client.listener, client.address, request.transaction_id), wire, now)

    def _reply(self, client: Client, request: stun.Message, response: stun.Message,
               key: Optional[bytes] = None) -> bytes:
        """Send `response` to `request` (signed under `key`, if any); returns what was sent."""
        wire = response.encode(key=key, sha256=request.has(stun.MESSAGE_INTEGRITY_SHA256),
                               fingerprint=request.has(stun.FINGERPRINT))
        client.send(wire)
        return wire

    def _challenge(self, client: Client, msg: stun.Message, code: int, reason: str,
                   now: float) -> stun.Message:
        response = msg.error(code, reason)
        response.attributes.append(self._realm_attr)
        response.add(stun.NONCE, self.nonces.issue(client.address[0], now))
        response.attributes.append(self._algorithms_wire)
        return response

    # -- authentication (RFC 8489 section 9.2.4) ----------------------------------------------

    def _credentials(self, client: Client, msg: stun.Message, now: float) -> Optional[StunCredentials]:
        if not (msg.has(stun.MESSAGE_INTEGRITY) or msg.has(stun.MESSAGE_INTEGRITY_SHA256)):
            # Not remembered, as no answer to a request not authenticated is (`answer`): every
            # allocation begins with one, and kept 40 s they made up a tenth of the memory of an
            # idle allocation.
            self._reply(client, msg, self._challenge(client, msg, 401, "Unauthorized", now))
            return None
        username, userhash = msg.get(stun.USERNAME), msg.get(stun.USERHASH)
        realm, nonce = msg.get(stun.REALM), msg.get(stun.NONCE)
        if (username is None and userhash is None) or realm is None or nonce is None:
            raise stun.StunError(400, "Bad Request")
        if userhash is not None and not self.nonces.features & FEATURE_USERNAME_ANONYMITY:
            raise stun.StunError(400, "Bad Request")
        if self.nonces.check(nonce, client.address[0], now) is not NonceStatus.VALID:
            self._reply(client, msg, self._challenge(client, msg, 438, "Stale Nonce", now))
            return None
        offered, chosen = msg.get(stun.PASSWORD_ALGORITHMS), msg.get(stun.PASSWORD_ALGORITHM)
        if offered is None and chosen is None:
            algorithm = stun.ALGORITHM_MD5
        elif offered == self._algorithms_attr and chosen is not None \
                and chosen[0] in self.config.password_algorithms:
            algorithm = chosen[0]
        else:
            raise stun.StunError(400, "Bad Request")
        if realm != self.config.realm:
            self.login_failed(client, StunCredentials(msg, username, userhash, realm, algorithm), now)
            return None
        credentials = StunCredentials(msg, username, userhash, realm, algorithm)
        allocation = self.allocations.get(client.key)
        if allocation is not None and allocation.login_key is not None \
                and username == allocation.username and algorithm == allocation.algorithm \
                and credentials.checkKey(username, allocation.login_key):
            # A request on a live allocation signed with the key its Allocate logged in with:
            # that login still stands (each tick ends the allocations whose login no longer
            # does: expiry, revocation, suspension; a credentials reload forgets the keys), so
            # it is not asked again, as coturn keeps a session's key.
            self.authenticated(client, credentials, allocation.account, now)
            return None
        return credentials

    # -- requests -----------------------------------------------------------------------------

    def _binding(self, client: Client, msg: stun.Message) -> None:
        unknown = msg.unknown_required()
        if unknown:
            response = _error(msg, stun.StunError(420, "Unknown Attribute",
                                                  [(stun.UNKNOWN_ATTRIBUTES, unknown)]))
        else:
            response = msg.response().add(stun.XOR_MAPPED_ADDRESS, client.address)
        # Not cached: Binding is idempotent, and caching every NAT probe would cost memory.
        client.send(response.encode(fingerprint=msg.has(stun.FINGERPRINT)))

    def owned_allocation(self, client: Client, credentials: StunCredentials) -> Allocation:
        allocation = self.allocations.get(client.key)
        if allocation is None:
            raise stun.StunError(437, "Allocation Mismatch")
        if allocation.username != credentials.username:
            raise stun.StunError(441, "Wrong Credentials")
        return allocation

    def _lifetime(self, msg: stun.Message) -> int:
        """RFC 8656 section 7.2: the client's wish, capped at the maximum, at least the default."""
        requested = msg.get(stun.LIFETIME)
        if requested is None:
            return self.config.default_lifetime
        return max(self.config.default_lifetime, min(requested, self.config.max_lifetime))

    def _allocate(self, client: Client, msg: stun.Message, credentials: StunCredentials,
                  account: Account, now: float) -> stun.Message:
        if client.key in self.allocations:
            raise stun.StunError(437, "Allocation Mismatch")
        transport = msg.get(stun.REQUESTED_TRANSPORT)
        if transport is None:
            raise stun.StunError(400, "Bad Request")
        tcp = transport == TCP_PROTOCOL and self.bind_stream is not None
        if transport != UDP_PROTOCOL and not tcp:
            raise stun.StunError(442, "Unsupported Transport Protocol")
        family = msg.get(stun.REQUESTED_ADDRESS_FAMILY)
        additional = msg.get(stun.ADDITIONAL_ADDRESS_FAMILY)
        token = msg.get(stun.RESERVATION_TOKEN)
        even_port = msg.get(stun.EVEN_PORT)
        # RFC 6062 section 5.1: a TCP allocation needs a TCP or TLS control connection, and
        # has no use for the UDP-only attributes.
        if tcp and (client.datagram or token is not None or even_port is not None
                    or msg.has(stun.DONT_FRAGMENT)):
            raise stun.StunError(400, "Bad Request")
        # Combinations RFC 8656 section 7.2 rejects: a token already fixes the family and
        # port, and a reserved next port can only belong to one family.
        if (family is not None and additional is not None) \
                or (token is not None and (even_port is not None or family is not None
                                           or additional is not None)) \
                or (even_port and additional is not None) \
                or (additional is not None and additional != stun.FAMILY_IPV6):
            raise stun.StunError(400, "Bad Request")
        if family is not None and family not in (stun.FAMILY_IPV4, stun.FAMILY_IPV6):
            raise stun.StunError(440, "Address Family not Supported")
        username = credentials.username
        assert username is not None  # the login (StunCredentials.checkKey) has set it
        self._check_quotas(client, username, account)
        dont_fragment = msg.has(stun.DONT_FRAGMENT)
        response = msg.response()
        relays: Dict[int, AnyRelayEndpoint] = {}
        if token is not None:
            reservation = self.reservations.pop(token, None)
            if reservation is None or reservation.expires <= now:
                if reservation is not None:
                    # Expired but not yet swept by `tick`: popped here, so release the port
                    # here, or nothing ever would.
                    reservation.endpoint.close()
                raise stun.StunError(508, "Insufficient Capacity")
            primary = stun.address_family(reservation.endpoint.address[0])
            relays[primary] = reservation.endpoint
        else:
            primary = family or stun.FAMILY_IPV4
            if primary not in self.config.relay_ips:
                raise stun.StunError(440, "Address Family not Supported")
            relays[primary] = self._bind_relay(primary, dont_fragment, even_port, response, now, tcp)
        if additional is not None:
            try:
                if stun.FAMILY_IPV6 not in self.config.relay_ips:
                    raise stun.StunError(440, "Address Family not Supported")
                relays[stun.FAMILY_IPV6] = self._bind_relay(stun.FAMILY_IPV6, dont_fragment, None,
                                                            response, now, tcp)
            except stun.StunError as err:
                response.add(stun.ADDRESS_ERROR_CODE, (stun.FAMILY_IPV6, err.code, err.reason))
        lifetime = self._lifetime(msg)
        session_id = _uuid7_hex(now, self.rng.getrandbits(74))
        config = self.config
        budget = self._budget(_lowest(account.bandwidth_bps, config.max_bps), config.max_pps)
        allocation = Allocation(client.key, client.address, client.transport, username,
                                account, relays, client.send, started=now, expires=now + lifetime,
                                session_id=session_id, budget=budget,
                                account_budget=self._account_budget(account.account_id), tcp=tcp,
                                own=config.policy.own, live=self.live,
                                login_key=credentials.key, algorithm=credentials.algorithm)
        self.allocations[client.key] = allocation
        for relay in relays.values():
            self.live.add(relay.address, tcp)
        created = self.stats.created
        created[client.transport] = created.get(client.transport, 0) + 1
        if tcp:
            for relay in relays.values():
                cast(StreamRelayEndpoint, relay).listen(
                    lambda peer, end, when: self.tcp.incoming(allocation, peer, end, when))
        for relay in relays.values():
            host, port = relay.address
            response.add(stun.XOR_RELAYED_ADDRESS, (self.config.external_ips.get(host, host), port))
        response.add(stun.LIFETIME, lifetime)
        response.add(stun.XOR_MAPPED_ADDRESS, client.address)
        for observe in self.opened_observers:
            observe(allocation)
        allocation.start_relaying()
        return response

    def _account_budget(self, account_id: str) -> Budget:
        """The budget all of an account's allocations share (unlimited without
        --account-max-bps/--account-max-pps), counting one more of them."""
        budget = self._account_budgets.get(account_id)
        if budget is None:
            budget = self._account_budgets[account_id] = \
                self._budget(*self._account_limits(account_id)) or Budget()
        budget.users += 1
        return budget

    def _budget(self, bandwidth: int, packet_rate: int) -> Optional[Budget]:
        """A new budget with these limits (0: none), or None without any."""
        return self.limited_budget(bandwidth, packet_rate) if bandwidth or packet_rate else None

    def _account_limits(self, account_id: str) -> Tuple[int, int]:
        share = self._account_shares.get(account_id, 1.0)
        return (_part(self.config.account_max_bps, share),
                _part(self.config.account_max_pps, share))

    def set_account_share(self, account_id: str, share: float) -> None:
        """With worker processes, each holds part of an account's allocations and so should
        relay that part of its limits: the parent tells each worker its share (its fraction
        of the account's allocations) when it changes, and 0 once it holds none."""
        if share:
            self._account_shares[account_id] = share
        else:
            self._account_shares.pop(account_id, None)
        budget = self._account_budgets.get(account_id)
        if budget is not None:
            budget.bandwidth, budget.packet_rate = self._account_limits(account_id)

    def limited_totals(self) -> Tuple[int, int]:
        """Packets and bytes the rate limits have dropped, ended and live allocations alike."""
        packets, size = self.stats.closed_limited
        for allocation in list(self.allocations.values()):
            packets += allocation.limited_packets
            size += allocation.limited_bytes
        return packets, size

    def _check_quotas(self, client: Client, username: str, account: Account) -> None:
        if self.draining:
            raise self.redirect(client, DRAINING)
        if not self.may_allocate():
            raise stun.StunError(508, "Insufficient Capacity")
        config = self.config
        if config.total_quota and len(self.allocations) >= config.total_quota:
            raise self.redirect(client, FULL)
        if self.over_quota(account):
            raise stun.StunError(486, "Allocation Quota Reached")
        shared = self._account_budgets.get(account.account_id)
        if account.max_allocations and shared is not None \
                and shared.users >= account.max_allocations:
            raise stun.StunError(486, "Allocation Quota Reached")
        if config.user_quota and sum(
                a.username == username for a in self.allocations.values()) >= config.user_quota:
            raise stun.StunError(486, "Allocation Quota Reached")
        if config.source_quota and sum(
                a.client[0] == client.address[0] for a in self.allocations.values()) >= config.source_quota:
            raise stun.StunError(486, "Allocation Quota Reached")

    def redirect(self, client: Client, reason: str) -> stun.StunError:
        """The answer to an Allocate this server does not take (`reason`: draining, or full
        with --total-quota allocations, which with workers the parent's count tells): 300 to
        the nearest alternate of the client's kind (relay.core.redirect), else 508
        Insufficient Capacity."""
        config = self.config
        own_region = tuple(Alternate(a) for a in config.alternate_servers) + tuple(
            Alternate(a, True, config.alternate_domain) for a in config.tls_alternate_servers)
        alternate = self.redirects.choose((own_region,) + self.redirects.regions,
                                          stun.address_family(client.address[0]),
                                          client.transport, config.policy.own)
        if alternate is None:
            return stun.StunError(508, "Insufficient Capacity")
        self.stats.redirected[reason] = self.stats.redirected.get(reason, 0) + 1
        return try_alternate(alternate)

    def _bind_relay(self, family: int, dont_fragment: bool, even_port: Optional[bool],
                    response: stun.Message, now: float, tcp: bool = False) -> AnyRelayEndpoint:
        """Bind a relay port; with EVEN-PORT an even one, and with its R bit the next one too."""
        host = self.config.relay_ips[family]
        low, high = self.config.min_port, self.config.max_port
        for port in self._ports(host, low, high - 1 if even_port else high, even_port is not None,
                                tcp):
            if even_port is None:
                endpoint: Optional[AnyRelayEndpoint] = (
                    self.bind_stream(host, port) if tcp and self.bind_stream is not None
                    else self.bind(host, port, dont_fragment))
                if endpoint is not None:
                    return endpoint
                continue
            port -= port % 2
            if port < low:
                continue
            endpoint = self.bind(host, port, dont_fragment)
            if endpoint is None:
                continue
            if not even_port:
                return endpoint
            reserved = self.bind(host, port + 1, dont_fragment)
            if reserved is None:
                endpoint.close()
                continue
            token = issue(self.rng, 64, self.config.worker_index,
                          self.config.worker_count).to_bytes(8, "big")
            self.reservations[token] = Reservation(reserved, now + RESERVATION_LIFETIME)
            response.add(stun.RESERVATION_TOKEN, token)
            return endpoint
        raise stun.StunError(508, "Insufficient Capacity")

    def _ports(self, host: str, low: int, high: int, even: bool, tcp: bool) -> Iterator[int]:
        """Relay ports to try: random ones first (a relay port should be hard to guess), then,
        when a crowded range made those fail, every port from a random start that this server
        does not hold already (for the same protocol), so 508 means the range is really full."""
        for _ in range(_BIND_ATTEMPTS):
            yield self.rng.randint(low, high)
        held = {endpoint.address[1] for allocation in self.allocations.values()
                if allocation.tcp == tcp
                for endpoint in allocation.relays.values() if endpoint.address[0] == host}
        if not tcp:
            held.update(r.endpoint.address[1] for r in self.reservations.values()
                        if r.endpoint.address[0] == host)
        start = self.rng.randint(low, high)
        # Then, in a worker process, the other workers' slices: ports they hold fail to bind
        # and are skipped, so an Allocate reaching a worker whose slice is full still gets
        # a port while the range has one.
        whole_low, whole_high = self.config.whole_range or (low, high)
        others = itertools.chain(range(max(high + 1, whole_low), whole_high + 1),
                                 range(whole_low, min(low, whole_high + 1)))
        for port in itertools.chain(range(start, high + 1), range(low, start), others):
            if port not in held and not (even and port % 2):
                yield port

    def _refresh(self, client: Client, msg: stun.Message, credentials: StunCredentials,
                 account: Account, now: float) -> stun.Message:
        allocation = self.owned_allocation(client, credentials)
        family = msg.get(stun.REQUESTED_ADDRESS_FAMILY)
        if family is not None and family not in allocation.relays:
            raise stun.StunError(443, "Peer Address Family Mismatch")
        if msg.get(stun.LIFETIME) == 0:
            self._close(allocation, "deleted")
            return msg.response().add(stun.LIFETIME, 0)
        lifetime = self._lifetime(msg)
        allocation.expires = now + lifetime
        return msg.response().add(stun.LIFETIME, lifetime)

    def checked_peer(self, allocation: Allocation, peer: Address) -> None:
        if stun.address_family(peer[0]) not in allocation.relays:
            raise stun.StunError(443, "Peer Address Family Mismatch")
        policy = self.config.policy
        if policy.permits_peer(peer):
            return
        if not (self.live.live(peer, allocation.tcp) and policy.permits_peer(peer, True)):
            raise stun.StunError(403, "Forbidden")
        allocation.permit_relay_only(peer[0])

    def _create_permission(self, client: Client, msg: stun.Message, credentials: StunCredentials,
                           account: Account, now: float) -> stun.Message:
        allocation = self.owned_allocation(client, credentials)
        peers = msg.get_all(stun.XOR_PEER_ADDRESS)
        if not peers:
            raise stun.StunError(400, "Bad Request")
        for peer in peers:
            self.checked_peer(allocation, peer)
        ips = {peer[0] for peer in peers}
        if len(ips | allocation.permissions.keys()) > self.config.max_permissions:
            raise stun.StunError(508, "Insufficient Capacity")
        for ip in ips:
            allocation.permit(ip, now + PERMISSION_LIFETIME)
        return msg.response()

    def _channel_bind(self, client: Client, msg: stun.Message, credentials: StunCredentials,
                      account: Account, now: float) -> stun.Message:
        allocation = self.owned_allocation(client, credentials)
        number, peer = msg.get(stun.CHANNEL_NUMBER), msg.get(stun.XOR_PEER_ADDRESS)
        # A channel carries datagrams, which a TCP allocation (RFC 6062) does not relay.
        if allocation.tcp or number is None or peer is None \
                or not stun.MIN_CHANNEL <= number <= self.config.max_channel:
            raise stun.StunError(400, "Bad Request")
        self.checked_peer(allocation, peer)
        if allocation.channel_conflict(number, peer, now):
            raise stun.StunError(400, "Bad Request")
        if number not in allocation.channels and len(allocation.channels) >= self.config.max_channels:
            raise stun.StunError(508, "Insufficient Capacity")
        if peer[0] not in allocation.permissions \
                and len(allocation.permissions) >= self.config.max_permissions:
            raise stun.StunError(508, "Insufficient Capacity")
        allocation.bind_channel(number, peer, now)
        allocation.permit(peer[0], now + PERMISSION_LIFETIME)
        return msg.response()

    def _close(self, allocation: Allocation, reason: str) -> None:
        del self.allocations[allocation.key]
        for relay in allocation.relays.values():
            self.live.discard(relay.address, allocation.tcp)
        allocation.close()
        usage = self.stats.closed_usage.setdefault(allocation.transport, [0, 0, 0, 0])
        usage[0] += allocation.bytes_from_client
        usage[1] += allocation.packets_from_client
        usage[2] += allocation.bytes_to_client
        usage[3] += allocation.packets_to_client
        self.stats.closed[reason] = self.stats.closed.get(reason, 0) + 1
        limited = self.stats.closed_limited
        limited[0] += allocation.limited_packets
        limited[1] += allocation.limited_bytes
        shared = allocation.account_budget
        shared.users -= 1
        if not shared.users:
            del self._account_budgets[allocation.account.account_id]
        for observe in self.closed_observers:
            observe(allocation, reason)


def _uuid7_hex(now: float, bits: int) -> str:
    """An RFC 9562 UUIDv7 as 32 hex digits: the Unix time in milliseconds (48 bits), the
    version, 74 of `bits` at random, the variant.  A session id: the ledger's sessions table
    is keyed by it, and time-ordered keys land at the end of its primary key's B-tree, where
    uuid4's land anywhere in it (each a page written again on every batch: the ledger
    thread's CPU per Allocate+Refresh(0) cycle fell from 11-13 to 6-7 us)."""
    millis = int(now * 1000) & 0xFFFF_FFFF_FFFF
    value = (millis << 80 | 7 << 76 | (bits >> 62 & 0xFFF) << 64 | 0b10 << 62
             | bits & 0x3FFF_FFFF_FFFF_FFFF)
    return "%032x" % value


def _part(limit: int, share: float) -> int:
    """`share` of a limit where 0 means none: at least 1, or it would become no limit."""
    return max(1, round(limit * share)) if limit else 0


def _lowest(*limits: int) -> int:
    """The strictest of several limits where 0 means none."""
    return min((limit for limit in limits if limit), default=0)


def _error(msg: stun.Message, err: stun.StunError) -> stun.Message:
    response = msg.error(err.code, err.reason)
    for attr_type, value in err.attributes:
        response.add(attr_type, value)
    return response
