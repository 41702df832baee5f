"""TCP allocations' requests (RFC 6062), which `TurnServer` dispatches here: Connect,
ConnectionBind, the ConnectionAttempt a peer's connection announces, and the CONNECTION-ID
registry that ties them together.

The server keeps what every allocation shares (the allocations, authentication, replies);
this part only adds what a TCP allocation has beyond a UDP one.  Its peer data connections
themselves are `relay.core.tcp.TcpConnection`s.  A Connect waits for the I/O layer to
connect to the peer, so its answer goes out later, from `_connected`.
"""
from __future__ import annotations

import logging
import random
from typing import Dict, Hashable, Optional, Protocol, Tuple, cast

from relay.core.allocation import Address, Allocation
from relay.core.client import Client
from relay.core.credentials import Account, StunCredentials
from relay.core.issuer import issue, issuer
from relay.core.tcp import (
    CLOSED,
    CONNECTING,
    PENDING,
    PeerEnd,
    StreamRelayEndpoint,
    TcpConnection,
)
from relay.proto import stun

log = logging.getLogger("turnrelay")


class TcpLimits(Protocol):
    """The settings of `relay.core.server.TurnConfig` that RFC 6062 reads."""

    tcp_bind_timeout: float
    max_tcp_connections: int
    worker_index: int
    worker_count: int


class Core(Protocol):
    """What RFC 6062 uses of its `relay.core.server.TurnServer`."""

    allocations: Dict[Tuple[Hashable, Address], Allocation]
    rng: random.Random

    @property
    def config(self) -> TcpLimits: ...

    def owned_allocation(self, client: Client, credentials: StunCredentials) -> Allocation: ...

    def checked_peer(self, allocation: Allocation, peer: Address) -> None: ...

    def answer(self, client: Client, credentials: StunCredentials, response: stun.Message,
               now: float) -> None: ...


class TcpRelay:
    """RFC 6062 for one `TurnServer`: its requests and its CONNECTION-IDs."""

    def __init__(self, server: Core):
        self.server = server
        self.connections: Dict[int, TcpConnection] = {}   # CONNECTION-ID -> connection

    def connect(self, client: Client, msg: stun.Message, credentials: StunCredentials,
                account: Account, now: float) -> None:
        """Connect (section 5.2): check the peer, then have the I/O layer connect to it."""
        server = self.server
        allocation = server.owned_allocation(client, credentials)
        peer = msg.get(stun.XOR_PEER_ADDRESS)
        if not allocation.tcp or peer is None:
            raise stun.StunError(400, "Bad Request")
        server.checked_peer(allocation, peer)  # 403 for forbidden peers and our own endpoints
        if any(c.peer == peer for c in allocation.connections.values()):
            raise stun.StunError(446, "Connection Already Exists")
        if len(allocation.connections) >= server.config.max_tcp_connections:
            raise stun.StunError(508, "Insufficient Capacity")
        connection = TcpConnection(self._new_connection_id(), allocation, peer, self.connections,
                                   CONNECTING)
        log.info("tcp connect user=%s session=%s peer=%s:%d", allocation.username,
                 allocation.session_id, peer[0], peer[1])
        cast(StreamRelayEndpoint, allocation.relays[stun.address_family(peer[0])]).connect(
            peer, lambda end, when: self._connected(client, credentials, connection, end, when))

    def _connected(self, client: Client, credentials: StunCredentials,
                   connection: TcpConnection, end: Optional[PeerEnd], now: float) -> None:
        """The I/O layer's answer to a Connect: a peer data connection, or None (447)."""
        if connection.state == CLOSED:  # the allocation ended while connecting
            if end is not None:
                end.close()
            return
        msg = credentials.message
        if end is None:
            connection.close()
            self.server.answer(client, credentials, msg.error(447, "Connection Timeout or Failure"),
                               now)
            return
        connection.peer_end = end
        connection.state = PENDING
        connection.deadline = now + self.server.config.tcp_bind_timeout
        self.server.answer(client, credentials,
                           msg.response().add(stun.CONNECTION_ID, connection.connection_id), now)

    def connection_bind(self, client: Client, msg: stun.Message, credentials: StunCredentials,
                        account: Account, now: float) -> None:
        """ConnectionBind (section 5.4): this new connection becomes a client data connection."""
        if client.become_data is None or client.key in self.server.allocations:
            raise stun.StunError(400, "Bad Request")
        connection = self.connections.get(msg.get(stun.CONNECTION_ID))
        if connection is None or connection.state != PENDING:
            raise stun.StunError(400, "Bad Request")
        if connection.allocation.username != credentials.username:
            raise stun.StunError(441, "Wrong Credentials")
        self.server.answer(client, credentials, msg.response(), now)
        connection.bind(client.become_data(connection))

    def hand_over(self, client: Client, msg: stun.Message) -> bool:
        """Whether a ConnectionBind went, with its connection, to the worker process that
        issued its CONNECTION-ID: a new TCP connection reaches whichever worker the kernel's
        SO_REUSEPORT hash picks, not necessarily the one holding the peer's connection.
        Decided before the login, which the owner does; a connection that holds an
        allocation here stays (and gets its 400 here)."""
        config = self.server.config
        connection_id = msg.get(stun.CONNECTION_ID)
        if client.hand_over is None or connection_id is None or config.worker_count == 1 \
                or client.key in self.server.allocations:
            return False
        owner = issuer(connection_id, config.worker_count)
        if owner == config.worker_index:
            return False
        client.hand_over(owner)
        return True

    def incoming(self, allocation: Allocation, peer: Address, end: PeerEnd, now: float) -> None:
        """A peer connected to a TCP relayed address (section 5.3): announce it, or refuse it."""
        config = self.server.config
        if allocation.key not in self.server.allocations or peer[0] not in allocation.permissions \
                or any(c.peer == peer for c in allocation.connections.values()) \
                or len(allocation.connections) >= config.max_tcp_connections:
            end.close()
            return
        connection = TcpConnection(self._new_connection_id(), allocation, peer, self.connections,
                                   PENDING, now + config.tcp_bind_timeout)
        connection.peer_end = end
        attempt = stun.Message(stun.CONNECTION_ATTEMPT, stun.INDICATION)
        attempt.add(stun.XOR_PEER_ADDRESS, peer).add(stun.CONNECTION_ID, connection.connection_id)
        allocation.send_to_client(attempt.encode())

    def _new_connection_id(self) -> int:
        config = self.server.config
        while True:
            connection_id = issue(self.server.rng, 32, config.worker_index, config.worker_count)
            if connection_id not in self.connections:
                return connection_id
