"""The TCP side of a TCP allocation (RFC 6062): its peer data connections, no I/O.

A TCP allocation listens on its relayed transport address and connects out from it; each
connection to a peer gets a CONNECTION-ID and waits, unread (the kernel's receive window
holds the peer back), until the client binds a data connection to it with ConnectionBind.
From then on bytes pass as they are, counted in the allocation's counters like relayed
datagrams.  The sockets behind the `StreamEnd`s belong to the I/O layer
(`relay.net.stream_relay`), which also does the flow control between the two ends.

Rate limits (--max-bps and the rest) cannot drop bytes here as they drop datagrams: bytes
read are relayed and charged, possibly overdrawing the second's budget, and the connection
stops reading both ends until the core's tick has refilled the budget past the debt.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Protocol, Tuple

Address = Tuple[str, int]

CONNECTING, PENDING, BOUND, CLOSED = "connecting", "pending", "bound", "closed"


class StreamEnd(Protocol):
    """One socket of a relayed TCP connection: the peer's, or the client's data connection."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause(self) -> None: ...     # stop reading (the rate limits)

    def resume(self) -> None: ...


class PeerEnd(StreamEnd, Protocol):
    """The peer's socket, which reads nothing until `start` hands it its connection."""

    def start(self, connection: "TcpConnection") -> None: ...


# connected(peer end or None on failure or timeout, now)
ConnectResult = Callable[[Optional[PeerEnd], float], None]
# incoming(peer address, peer end, now)
IncomingConnection = Callable[[Address, PeerEnd, float], None]


class StreamRelayEndpoint(Protocol):
    """A TCP relayed transport address: a listening socket that can also connect out."""

    address: Address

    def listen(self, incoming: IncomingConnection) -> None: ...

    def connect(self, peer: Address, result: ConnectResult) -> None: ...

    def close(self) -> None: ...


class StreamOwner(Protocol):
    """What a connection needs of its allocation (`relay.core.allocation.Allocation`): the
    payload counters, its table of connections and its budgets."""

    bytes_from_client: int
    packets_from_client: int
    bytes_to_client: int
    packets_to_client: int
    limited: bool
    username: str
    connections: Dict[int, "TcpConnection"]

    def overdraw(self, size: int) -> bool:
        """Charge `size` bytes read from a stream; False once a budget is spent."""


class TcpConnection:
    """One peer data connection and, once bound, its client data connection."""

    def __init__(self, connection_id: int, allocation: StreamOwner, peer: Address,
                 index: Dict[int, "TcpConnection"], state: str, deadline: float = 0.0):
        self.connection_id = connection_id
        self.allocation = allocation
        self.peer = peer
        self.state = state
        self.deadline = deadline     # a pending connection is closed if still unbound by then
        self.peer_end: Optional[PeerEnd] = None
        self.client_end: Optional[StreamEnd] = None
        self.throttled = False
        # The server-wide CONNECTION-ID index that ConnectionBind looks connections up in.
        self._index = index
        index[connection_id] = self
        allocation.connections[connection_id] = self

    def from_peer(self, data: bytes) -> None:
        """Bytes from the peer: to the client data connection, counted as relayed payload."""
        allocation = self.allocation
        allocation.bytes_to_client += len(data)
        allocation.packets_to_client += 1
        assert self.client_end is not None  # bytes flow once bound
        self.client_end.write(data)
        if allocation.limited:
            self._charge(len(data))

    def from_client(self, data: bytes) -> None:
        """Bytes from the client data connection: to the peer, counted as relayed payload."""
        allocation = self.allocation
        allocation.bytes_from_client += len(data)
        allocation.packets_from_client += 1
        assert self.peer_end is not None  # bytes flow once bound
        self.peer_end.write(data)
        if allocation.limited:
            self._charge(len(data))

    def _charge(self, size: int) -> None:
        if not self.allocation.overdraw(size) and not self.throttled:
            assert self.peer_end is not None and self.client_end is not None  # bound
            self.throttled = True
            self.peer_end.pause()
            self.client_end.pause()

    def unthrottle(self) -> None:
        if self.throttled and self.state == BOUND:
            assert self.peer_end is not None and self.client_end is not None
            self.throttled = False
            self.peer_end.resume()
            self.client_end.resume()

    def bind(self, client_end: StreamEnd) -> None:
        """ConnectionBind succeeded: splice the client's data connection to the peer's."""
        self.state = BOUND
        self.client_end = client_end
        assert self.peer_end is not None  # only a PENDING connection, which has its peer, binds
        self.peer_end.start(self)

    def close(self) -> None:
        """Either side ended, the bind deadline passed, or the allocation went: close both."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._index.pop(self.connection_id, None)
        self.allocation.connections.pop(self.connection_id, None)
        for end in (self.peer_end, self.client_end):
            if end is not None:
                end.close()
        self.peer_end = self.client_end = None
