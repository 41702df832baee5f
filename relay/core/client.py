"""The client side of a request: where it came from and how to answer it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Tuple

from relay.core.allocation import Address
from relay.core.tcp import StreamEnd, TcpConnection


@dataclass(eq=False)
class Client:
    """Where a request came from: the 5-tuple's client side, and how to answer it."""

    transport: str           # "udp", "tcp", "tls" or "dtls"
    listener: Hashable       # identifies the server side of the 5-tuple
    address: Address
    send: Callable[[bytes], None]
    # False once a stream connection is gone: a login that completes later (a database
    # checker) must not create an allocation nobody can reach.
    connected: bool = True
    # Stream clients only: turns this connection into the client data connection of an RFC
    # 6062 ConnectionBind, after which it carries raw bytes; returns its writing end.
    become_data: Optional[Callable[[TcpConnection], StreamEnd]] = None
    # Stream clients of a worker process only: hands this connection to worker n, with the
    # request being read and what follows it (relay.net.handoff), for a ConnectionBind
    # whose CONNECTION-ID that worker issued.
    hand_over: Optional[Callable[[int], None]] = None

    @property
    def datagram(self) -> bool:
        """Over UDP or DTLS: each request a datagram, which the client retransmits until
        answered, and no control connection for an RFC 6062 TCP allocation."""
        return self.transport in ("udp", "dtls")

    def __post_init__(self) -> None:
        # The allocations' key, made once: a stream's every ChannelData frame looks it up.
        self.key: Tuple[Hashable, Address] = (self.listener, self.address)
