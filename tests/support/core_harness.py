"""Drive the sans-IO TURN core without sockets or a reactor: a fake binder, a fake clock and a
client that signs its requests the way a real long-term-credential client does.

`Harness` owns a `TurnServer` built on a `FakeBinder`, a `StaticUsersChecker` and a clock that
only moves when a test moves it.  `CoreClient` is one 5-tuple: it learns REALM and NONCE from a
401, signs with the long-term key (MD5 or SHA-256, USERNAME or USERHASH), runs the login the
way `relay.net.listeners.LoginDispatcher` does (the static checker's Deferreds have already fired,
so the outcome is read synchronously) and parses whatever the server sent back.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python.failure import Failure

from relay.auth.checkers import StaticUser, StaticUsersChecker
from relay.auth.cred import AccountRealm, IAccount
from relay.cli.turnclient import error_code
from relay.core.credentials import Account
from relay.core.nonces import FEATURE_PASSWORD_ALGORITHMS, FEATURE_USERNAME_ANONYMITY, NonceIssuer
from relay.core.ratelimit import RateLimiter
from relay.core.server import Client, TurnConfig, TurnServer
from relay.proto import stun

Address = Tuple[str, int]

REALM = "turnrelay.test"
SOFTWARE = "turnrelay-test 1.0"
NONCE_SECRET = b"0123456789abcdef0123456789abcdef"
NONCE_LIFETIME = 600
RELAY_V4 = "192.0.2.10"        # the relay socket addresses; never used as a peer
RELAY_V6 = "2001:db8::10"
PEER = ("8.8.8.8", 5000)        # public addresses the default peer policy lets through
PEER2 = ("1.1.1.1", 6000)
PEER_V6 = ("2606:4700::1111", 7000)
USERS = {"alice": "wonderland", "bob": "builder"}
START = 1_000_000.0


class FakeEndpoint:
    """A relay socket that records what it sends; `deliver` plays a datagram from a peer."""

    def __init__(self, binder: "FakeBinder", host: str, port: int, dont_fragment: bool):
        self.binder = binder
        self.address: Address = (host, port)
        self.dont_fragment = dont_fragment
        self.sent: List[Tuple[bytes, Address]] = []
        self.receiver: Optional[Callable[[bytes, Address], None]] = None
        self.closed = False

    def send(self, data: bytes, peer: Address) -> None:
        assert not self.closed, "send on a closed relay endpoint"
        self.sent.append((bytes(data), peer))

    def attach(self, receiver: Callable[[bytes, Address], None]) -> None:
        self.receiver = receiver

    def close(self) -> None:
        self.closed = True
        self.binder.bound.discard(self.address)

    def deliver(self, data: bytes, peer: Address) -> None:
        assert self.receiver is not None, "no allocation attached to this endpoint"
        self.receiver(data, peer)


class FakeBinder:
    """`bind(host, port, dont_fragment)`: a FakeEndpoint, or None for a busy or bound port."""

    def __init__(self, busy: Iterable[int] = ()):
        self.busy: Set[int] = set(busy)
        self.all_busy = False
        self.bound: Set[Address] = set()
        self.endpoints: List[FakeEndpoint] = []
        self.calls: List[Tuple[str, int, bool]] = []

    def __call__(self, host: str, port: int, dont_fragment: bool) -> Optional[FakeEndpoint]:
        self.calls.append((host, port, dont_fragment))
        if self.all_busy or port in self.busy or (host, port) in self.bound:
            return None
        endpoint = FakeEndpoint(self, host, port, dont_fragment)
        self.bound.add((host, port))
        self.endpoints.append(endpoint)
        return endpoint

    def endpoint(self, address: Address) -> FakeEndpoint:
        """The most recent endpoint bound to `address` (as the relay sees it)."""
        for endpoint in reversed(self.endpoints):
            if endpoint.address == address:
                return endpoint
        raise KeyError(address)


class FakeStreamEnd:
    """One socket of a relayed TCP connection: records writes, pauses and its close."""

    def __init__(self) -> None:
        self.written: List[bytes] = []
        self.paused = self.closed = False
        self.connection: Any = None

    def write(self, data: bytes) -> None:
        assert not self.closed, "write on a closed connection"
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def start(self, connection: Any) -> None:
        self.connection = connection


class FakeStreamEndpoint:
    """A TCP relayed address: `incoming` plays a peer connecting, `connects` holds the Connect
    attempts for the test to complete with a FakeStreamEnd or fail with None."""

    def __init__(self, host: str, port: int):
        self.address: Address = (host, port)
        self.closed = False
        self.incoming: Optional[Callable[[Address, FakeStreamEnd, float], None]] = None
        self.connects: List[Tuple[Address, Callable[[Optional[FakeStreamEnd], float], None]]] = []

    def listen(self, incoming: Callable[[Address, FakeStreamEnd, float], None]) -> None:
        self.incoming = incoming

    def connect(self, peer: Address, result: Callable[[Optional[FakeStreamEnd], float], None]) -> None:
        self.connects.append((peer, result))

    def close(self) -> None:
        self.closed = True


class FakeStreamBinder:
    """`bind_stream(host, port)`: a FakeStreamEndpoint per call."""

    def __init__(self) -> None:
        self.endpoints: List[FakeStreamEndpoint] = []

    def __call__(self, host: str, port: int) -> FakeStreamEndpoint:
        endpoint = FakeStreamEndpoint(host, port)
        self.endpoints.append(endpoint)
        return endpoint


class Harness:
    """One TurnServer with injected clock, binder, users and rate limiter."""

    def __init__(self, users: Optional[Dict[str, str]] = None,
                 relay_ips: Optional[Dict[int, str]] = None,
                 auth_limiter: Optional[RateLimiter] = None, seed: int = 7,
                 nonce_features: int = FEATURE_PASSWORD_ALGORITHMS | FEATURE_USERNAME_ANONYMITY,
                 checker: Any = None, allocation_policy: Any = None, **config: Any):
        self.now = START
        self.binder = FakeBinder()
        self.stream_binder = FakeStreamBinder()
        config.setdefault("software", SOFTWARE)
        config.setdefault("min_port", 50000)
        config.setdefault("max_port", 50199)
        self.config = TurnConfig(realm=REALM,
                                 relay_ips=dict(relay_ips or {stun.FAMILY_IPV4: RELAY_V4}),
                                 **config)
        self.nonces = NonceIssuer([NONCE_SECRET], NONCE_LIFETIME, nonce_features)
        policy = {} if allocation_policy is None else {"allocation_policy": allocation_policy}
        self.server = TurnServer(self.config, self.nonces, self.binder, auth_limiter=auth_limiter,
                                 rng=random.Random(seed), bind_stream=self.stream_binder, **policy)
        self.users = dict(USERS if users is None else users)
        self.checker = checker or StaticUsersChecker({
            name: StaticUser(account_id=f"acct-{name}", password=password)
            for name, password in self.users.items()})
        self.realm = AccountRealm()
        self.closed: List[Tuple[Any, str]] = []
        self.server.closed_observers.append(lambda alloc, reason: self.closed.append((alloc, reason)))

    def advance(self, seconds: float, tick: bool = True) -> None:
        self.now += seconds
        if tick:
            self.server.tick(self.now)

    def client(self, username: str = "alice", password: Optional[str] = None,
               address: Address = ("198.51.100.20", 40000), transport: str = "udp",
               listener: Any = ("192.0.2.1", 3478)) -> "CoreClient":
        if password is None:
            password = self.users.get(username, "no-such-password")
        return CoreClient(self, username, password, address, transport, listener)


class CoreClient:
    """One client 5-tuple talking to a Harness's server."""

    def __init__(self, harness: Harness, username: str, password: str, address: Address,
                 transport: str, listener: Any):
        self.harness = harness
        self.username = username
        self.password = password
        self.received: List[bytes] = []
        self.client = Client(transport, listener, address, self.received.append)
        self.realm: Optional[str] = None
        self.nonce: Optional[str] = None
        self.algorithms: Optional[List[Tuple[int, bytes]]] = None
        self.last_key: Optional[bytes] = None

    # -- raw exchange -------------------------------------------------------------------------

    def exchange(self, wire: bytes, now: Optional[float] = None) -> List[bytes]:
        """Feed bytes to the server, complete the login if one is asked for; return replies."""
        now = self.harness.now if now is None else now
        server = self.harness.server
        before = len(self.received)
        credentials = server.receive(self.client, wire, now)
        if credentials is not None:
            outcome: List[Any] = []
            self.harness.checker.requestAvatarId(credentials).addBoth(outcome.append)
            assert len(outcome) == 1, "the static checker answers synchronously"
            if isinstance(outcome[0], Failure):
                outcome[0].trap(UnauthorizedLogin)
                server.login_failed(self.client, credentials, now)
            else:
                _, account, _ = self.harness.realm.requestAvatar(outcome[0], None, IAccount)
                server.authenticated(self.client, credentials, account, now)
        return self.received[before:]

    def exchange_one(self, wire: bytes, now: Optional[float] = None) -> stun.Message:
        replies = self.exchange(wire, now)
        assert len(replies) == 1, f"expected one reply, got {len(replies)}"
        response = stun.parse(replies[0])
        self._learn(response)
        return response

    def _learn(self, response: stun.Message) -> None:
        """What a client takes from a 401/438 challenge: REALM, NONCE, PASSWORD-ALGORITHMS."""
        if error_code(response) in (401, 438):
            self.realm = response.get(stun.REALM, self.realm)
            self.nonce = response.get(stun.NONCE, self.nonce)
            self.algorithms = response.get(stun.PASSWORD_ALGORITHMS, self.algorithms)

    # -- building requests --------------------------------------------------------------------

    @staticmethod
    def build(method: int, attributes: Sequence[Tuple[int, Any]] = (),
              transaction_id: Optional[bytes] = None) -> stun.Message:
        msg = stun.Message(method, stun.REQUEST)
        if transaction_id is not None:
            msg.transaction_id = transaction_id
        for attr_type, value in attributes:
            if isinstance(value, RawValue):
                msg.attributes.append((attr_type, value.data))
            else:
                msg.add(attr_type, value)
        return msg

    def unsigned(self, method: int, attributes: Sequence[Tuple[int, Any]] = (),
                 fingerprint: bool = False) -> stun.Message:
        """Send a request without MESSAGE-INTEGRITY (the first step of every login)."""
        return self.exchange_one(self.build(method, attributes).encode(fingerprint=fingerprint))

    def challenge(self) -> stun.Message:
        """Get REALM and NONCE from a 401, as a client's first Allocate does."""
        response = self.unsigned(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
        assert error_code(response) == 401
        return response

    def key(self, algorithm: int = stun.ALGORITHM_MD5, password: Optional[str] = None) -> bytes:
        return stun.long_term_key(self.username, self.realm or REALM,
                                  self.password if password is None else password, algorithm)

    def signed_wire(self, method: int, attributes: Sequence[Tuple[int, Any]] = (), *,
                    sha256: bool = False, algorithm: Optional[int] = None,
                    algorithms: Optional[List[Tuple[int, bytes]]] = None,
                    userhash: bool = False, fingerprint: bool = False,
                    transaction_id: Optional[bytes] = None, password: Optional[str] = None,
                    nonce: Optional[str] = None, realm: Optional[str] = None,
                    omit: Sequence[int] = ()) -> bytes:
        """A request signed with the long-term key, challenging first if no nonce is known.

        `algorithm` adds PASSWORD-ALGORITHM and echoes PASSWORD-ALGORITHMS (or `algorithms`);
        `omit` leaves out any of USERNAME, REALM, NONCE to build malformed requests.
        """
        if self.nonce is None:
            self.challenge()
        realm = self.realm if realm is None else realm
        msg = self.build(method, attributes, transaction_id)
        if stun.USERNAME not in omit:
            if userhash:
                msg.add(stun.USERHASH, stun.userhash(self.username, realm))
            else:
                msg.add(stun.USERNAME, self.username)
        if stun.REALM not in omit:
            msg.add(stun.REALM, realm)
        if stun.NONCE not in omit:
            msg.add(stun.NONCE, self.nonce if nonce is None else nonce)
        if algorithm is not None:
            msg.add(stun.PASSWORD_ALGORITHMS, self.algorithms if algorithms is None else algorithms)
            msg.add(stun.PASSWORD_ALGORITHM, (algorithm, b""))
        elif algorithms is not None:
            msg.add(stun.PASSWORD_ALGORITHMS, algorithms)
        used = algorithm or stun.ALGORITHM_MD5
        self.last_key = stun.long_term_key(self.username, realm,
                                           self.password if password is None else password, used)
        return msg.encode(key=self.last_key, sha256=sha256, fingerprint=fingerprint)

    def request(self, method: int, attributes: Sequence[Tuple[int, Any]] = (),
                retry_stale: Optional[bool] = None, **options: Any) -> stun.Message:
        """Sign, send, log in and return the one parsed response.

        Like a real client, a 438 is answered once by signing again with the fresh nonce,
        unless the test pinned the nonce or the transaction id, or asked not to.
        """
        if retry_stale is None:
            retry_stale = "nonce" not in options and "transaction_id" not in options
        response = self.exchange_one(self.signed_wire(method, attributes, **options))
        if retry_stale and error_code(response) == 438:
            response = self.exchange_one(self.signed_wire(method, attributes, **options))
        return response

    # -- TURN conveniences --------------------------------------------------------------------

    def allocate(self, *extra: Tuple[int, Any], transport: int = 17, **options: Any) -> stun.Message:
        attributes = [(stun.REQUESTED_TRANSPORT, transport)] + list(extra)
        return self.request(stun.ALLOCATE, attributes, **options)

    def allocate_ok(self, *extra: Tuple[int, Any], **options: Any) -> stun.Message:
        response = self.allocate(*extra, **options)
        assert error_code(response) is None, response.get(stun.ERROR_CODE)
        return response

    def refresh(self, lifetime: Optional[int] = None, **options: Any) -> stun.Message:
        attributes = [] if lifetime is None else [(stun.LIFETIME, lifetime)]
        return self.request(stun.REFRESH, attributes, **options)

    def create_permission(self, *peers: Address, **options: Any) -> stun.Message:
        return self.request(stun.CREATE_PERMISSION,
                            [(stun.XOR_PEER_ADDRESS, peer) for peer in peers], **options)

    def channel_bind(self, number: int, peer: Address, **options: Any) -> stun.Message:
        return self.request(stun.CHANNEL_BIND,
                            [(stun.CHANNEL_NUMBER, number), (stun.XOR_PEER_ADDRESS, peer)], **options)

    def send_indication(self, peer: Address, data: bytes) -> List[bytes]:
        msg = stun.Message(stun.SEND, stun.INDICATION)
        msg.add(stun.XOR_PEER_ADDRESS, peer).add(stun.DATA, data)
        return self.exchange(msg.encode())

    @property
    def allocation(self):
        return self.harness.server.allocations.get(self.client.key)

    def relay(self, family: int = stun.FAMILY_IPV4) -> FakeEndpoint:
        """The fake relay endpoint of this client's allocation for `family`."""
        return self.allocation.relays[family]


class RawValue:
    """An attribute value put on the wire as is, for types the codec does not know."""

    def __init__(self, data: bytes):
        self.data = data


def channel_data(number: int, payload: bytes, pad: bool = False) -> bytes:
    """A ChannelData frame; `pad` rounds it to 4 bytes as a stream transport must."""
    frame = stun.CHANNEL_HEADER.pack(number, len(payload)) + payload
    return frame + stun.PADDING[len(payload) & 3] if pad else frame


class FixedAccount:
    """A checker that logs everyone in as one account with the given limits."""

    credentialInterfaces = StaticUsersChecker.credentialInterfaces

    def __init__(self, **limits):
        self.account = Account("limited", **limits)

    def requestAvatarId(self, credentials):
        credentials.checkPassword(credentials.username, "wonderland")
        return defer.succeed(self.account)


def traffic(client, out: List[bytes], back: List[bytes]) -> None:
    """Payloads from the client to PEER (Send indications) and from PEER back."""
    for data in out:
        client.send_indication(PEER, data)
    for data in back:
        client.relay().deliver(data, PEER)


def open_session(harness, user="alice", port=40000):
    client = harness.client(user, address=("198.51.100.20", port))
    client.allocate_ok()
    client.create_permission(PEER)
    return client
