"""The usage a real relay has recorded, read from its ledger, and sessions held open to make some."""
import socket
import time
from typing import Callable, Dict, List, Tuple

from relay.ledger.sql import postgresql_backend, sqlite_backend
from relay.proto import stun
from support.db import raw_rows
from support.servers import PASSWORD, REALM, USER
from support.wire_client import WireClient

REGION = "test-region"
INTERVAL = ("--accounting-interval", "1")
Usage = Tuple[str, int, int, int, int]  # region, bytes/packets from the client, bytes/packets to it

TOTALS = ("SELECT s.account_id, s.region, SUM(d.bytes_from_client), SUM(d.packets_from_client),"
          " SUM(d.bytes_to_client), SUM(d.packets_to_client) FROM sessions s"
          " JOIN usage_deltas d ON d.session_id = s.session_id GROUP BY s.account_id, s.region")


def sql_usage(dsn: str) -> Dict[str, Usage]:
    """Usage per account, as the ledger's database has it (a static user's account is its name)."""
    return {account: (region, *map(int, sums))
            for account, region, *sums in raw_rows(dsn, TOTALS)}


def echoed(payloads: List[bytes]) -> Usage:
    """What relaying `payloads` to an echo peer and back counts."""
    size = sum(map(len, payloads))
    return REGION, size, len(payloads), size, len(payloads)


def eventually(read: Callable[[], object], expected: object, timeout: float = 10.0) -> None:
    """Poll until `read()` gives `expected`: a periodic write shows only in the database."""
    deadline = time.monotonic() + timeout
    while (value := read()) != expected:
        assert time.monotonic() < deadline, f"still {value!r}, expected {expected!r}"
        time.sleep(0.05)


def session_closed(server, user: str) -> str:
    """The session id of `user`'s allocation that relayed something, once it is closed."""
    return server.search(rf"allocation closed user={user} .*from_client=[1-9].* "
                         rf"session=(\w+)").group(1)


class HeldSession:
    """One allocation kept open by a WireClient, relaying to a UDP peer of the test's own."""

    def __init__(self, server, user: str = USER, password: str = PASSWORD):
        self.client = WireClient((server.host, server.port), user, password, REALM)
        reply = self.client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))
        assert reply.cls == stun.SUCCESS, reply.get(stun.ERROR_CODE)
        self.relayed = reply.get(stun.XOR_RELAYED_ADDRESS)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.settimeout(5)
        self.peer.bind((server.host, 0))
        self.peer_address = self.peer.getsockname()
        assert self.client.request(stun.CREATE_PERMISSION,
                                   (stun.XOR_PEER_ADDRESS, self.peer_address)).cls == stun.SUCCESS
        self.payloads: List[bytes] = []

    def relay(self, count: int, size: int) -> Usage:
        """`count` payloads of `size` bytes to the peer and back, each seen arriving; what
        the session has relayed so far."""
        for i in range(count):
            data = bytes([len(self.payloads) % 256]) * size
            self.client.send_indication(self.peer_address, data)
            assert self.peer.recvfrom(65536)[0] == data
            self.peer.sendto(data, self.relayed)
            assert self.client.receive_data() == (self.peer_address, data)
            self.payloads.append(data)
        return echoed(self.payloads)

    def delete(self) -> None:
        assert self.client.request(stun.REFRESH, (stun.LIFETIME, 0)).cls == stun.SUCCESS

    def close(self) -> None:
        self.client.close()
        self.peer.close()


def backend_for(dsn):
    if dsn.startswith("sqlite:"):
        return sqlite_backend("path=" + dsn[len("sqlite://"):])
    return postgresql_backend(f"dsn={dsn}")


def next_second() -> None:
    """Wait for the clock's next second, so that usage after it has a later time in the
    ledger (whole seconds) than usage before it."""
    target = int(time.time()) + 1
    while time.time() < target:
        time.sleep(0.02)
