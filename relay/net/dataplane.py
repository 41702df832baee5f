"""The native UDP data plane (dataplane.c, built by dataplane_build.py) seen from Python.

The sans-IO core keeps every decision; this is how its decisions reach the native forwarder's
tables: allocations (a client listener and the client's address -> relay sockets), the
permissions and channels the core grants, and budgets the core's tick refills.  The forwarder
relays only what those tables allow, counts it per allocation (`take_counters`, read by the
ledger's and metrics' timers) and hands every other client datagram back through a bounded
queue whose eventfd the reactor watches (`pop`).
"""
from __future__ import annotations

import errno
import hashlib
import os
import socket
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from relay.core.allocation import Budget


def _stale(built_from: str) -> str:
    """Why a module built from sources with digest `built_from` must not be used: the sources
    beside it differ (a checkout updated without `pip install -e .`; dataplane_build.py's
    `source_digest` made the digest the same way).  "" when they match or are not shipped."""
    here = Path(__file__).resolve().parent
    try:
        sources = b"".join((here / name).read_bytes() for name in ("dataplane.h", "dataplane.c"))
    except OSError:
        return ""
    if hashlib.sha256(sources).hexdigest() == built_from:
        return ""
    return "relay/net/_dataplane was built from older sources: rebuild it with pip install -e ."


try:
    from relay.net._dataplane import ffi, lib
    _MISSING = _stale(ffi.string(lib.dp_source_digest()).decode()
                      if hasattr(lib, "dp_source_digest") else "")
except ImportError as _err:  # not built (no compiler at install time): the Python data plane runs
    ffi = lib = None
    _MISSING = str(_err)
if _MISSING:
    ffi = lib = None

Address = Tuple[str, int]
QUEUE_CAPACITY = 4096  # datagrams waiting for Python; beyond, dropped and counted
COUNTERS = ("bytes_from_client", "packets_from_client", "bytes_to_client", "packets_to_client",
            "limited_packets", "limited_bytes")
STATS = ("received", "forwarded", "queued", "queue_dropped", "dropped", "send_errors",
         "gso_sends", "gso_refused")
_MAX_DATAGRAM = 65536


def available() -> bool:
    """Whether the native module was built for this interpreter."""
    return lib is not None


def missing() -> str:
    """Why the native module could not be loaded (the ImportError), or "" once it is."""
    return _MISSING


def _ip(host: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)


def _host(ip: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(ip) == 4 else socket.AF_INET6, ip)


class DataPlaneError(OSError):
    """A table change the native data plane refused (out of memory, a duplicate)."""


def _check(result: int) -> None:
    if result < 0:
        raise DataPlaneError(-result, "native data plane: " + errno.errorcode.get(-result, "?"))


class NativeBudget(Budget):
    """A `Budget` whose balance the data plane keeps, so that its thread and the Python path
    (an account's TCP relays, a Send indication the data plane hands over) spend one balance.

    Every limited budget of a process with a native data plane is one
    (`TurnServer.limited_budget`): an allocation may go native after its budgets were made, and
    an account's is shared by allocations on either path.  The balance outlives this object
    while an installed allocation holds it; the `bytes` and `packets` slots of `Budget` stay
    unused.
    """

    __slots__ = ("handle",)

    def __init__(self, bandwidth: int = 0, packet_rate: int = 0):
        handle = lib.dp_budget_new()
        if handle == ffi.NULL:
            raise MemoryError("native data plane budget")
        self.handle = ffi.gc(handle, lib.dp_budget_release)
        super().__init__(bandwidth, packet_rate)

    def refill(self) -> None:
        lib.dp_budget_refill(self.handle, self.bandwidth, self.packet_rate)

    def affords(self, size: int) -> bool:
        return bool(lib.dp_budget_affords(self.handle, size))

    def charge(self, size: int) -> None:
        lib.dp_budget_charge(self.handle, size)


class NativeDataPlane:
    """One forwarder thread and its tables; a worker process has one.

    Allocation handles (`add_allocation`) are cffi pointers owned here: a handle is used only
    until it is removed, which the core's allocation lifecycle guarantees.
    """

    def __init__(self, queue_capacity: int = QUEUE_CAPACITY):
        if lib is None:
            raise RuntimeError("the native data plane is not built (relay/net/dataplane_build.py)")
        dp = lib.dp_new(queue_capacity)
        if dp == ffi.NULL:
            raise MemoryError("native data plane")
        self._dp: Any = dp
        self._buffer = ffi.new("unsigned char[]", _MAX_DATAGRAM)
        self._pop_out = ffi.new("int[4]")  # listener, ip length, port, (unused)
        self._pop_ip = ffi.new("unsigned char[16]")
        self._counters = ffi.new("unsigned long long[]", len(COUNTERS))
        if os.environ.get("TURNRELAY_DATAPLANE_GSO") == "off":  # to measure what GSO brings
            self.gso(False)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        _check(lib.dp_start(self._dp))

    def close(self) -> None:
        """Stop the thread and free the tables (the sockets stay open: they are Python's)."""
        if self._dp is not None:
            lib.dp_free(self._dp)
            self._dp = None

    def gso(self, enable: Optional[bool] = None) -> bool:
        """Whether runs of equal-size datagrams to one destination go out as one UDP GSO
        superpacket (on by default where the kernel has it); `enable` turns it on or off."""
        return bool(lib.dp_gso(self._dp, -1 if enable is None else int(enable)))

    def fileno(self) -> int:
        """The eventfd that is readable while datagrams wait in the queue for `pop`."""
        return lib.dp_event_fd(self._dp)

    # -- tables ---------------------------------------------------------------------------------

    def add_listener(self, fd: int) -> int:
        """Read the client listener socket `fd` from now on; its id for the allocations."""
        listener = lib.dp_add_listener(self._dp, fd)
        _check(listener)
        return listener

    def remove_listener(self, listener: int) -> None:
        _check(lib.dp_remove_listener(self._dp, listener))

    def set_own_port(self, port: int, own: bool = True) -> None:
        """A port of the relay's own endpoints: Send indications to it go to Python, which
        applies `OwnEndpoints` in full (the data plane knows ports only)."""
        lib.dp_set_own_port(self._dp, port, int(own))

    def add_allocation(self, listener: int, client: Address, relay4: Optional[int],
                       relay6: Optional[int], budget: Optional[NativeBudget] = None,
                       account_budget: Optional[NativeBudget] = None) -> Any:
        """Relay for `client` on `listener` through the relay sockets given (descriptors, which
        the data plane reads from now on), within the budgets given (None: no limit)."""
        ip = _ip(client[0])
        handle = lib.dp_alloc_add(self._dp, listener, ip, len(ip), client[1],
                                  -1 if relay4 is None else relay4, -1 if relay6 is None else relay6,
                                  budget.handle if budget is not None else ffi.NULL,
                                  account_budget.handle if account_budget is not None else ffi.NULL)
        if handle == ffi.NULL:
            raise DataPlaneError(f"native data plane: cannot add the allocation of {client}")
        return handle

    def remove_allocation(self, handle: Any) -> Tuple[int, ...]:
        """Stop relaying for it: its relay sockets may be closed once this returns, and the
        handle is no longer valid.  What it counted since the last `take_counters`."""
        lib.dp_alloc_remove(self._dp, handle, self._counters)
        return tuple(self._counters)

    def permit(self, handle: Any, ip: str, native_send: bool = True) -> None:
        """A permission for peer `ip`; with native_send False, Send indications to it go to
        Python (a peer the rules allow only as one of our live relays)."""
        raw = _ip(ip)
        _check(lib.dp_permit(self._dp, handle, raw, len(raw), int(native_send)))

    def unpermit(self, handle: Any, ip: str) -> None:
        raw = _ip(ip)
        lib.dp_unpermit(self._dp, handle, raw, len(raw))

    def bind_channel(self, handle: Any, number: int, peer: Address) -> None:
        raw = _ip(peer[0])
        _check(lib.dp_bind_channel(self._dp, handle, number, raw, len(raw), peer[1]))

    def unbind_channel(self, handle: Any, number: int) -> None:
        lib.dp_unbind_channel(self._dp, handle, number)

    # -- reading --------------------------------------------------------------------------------

    def take_counters(self, handle: Any) -> Tuple[int, ...]:
        """What the allocation relayed and the limits dropped since the last call, in the
        order of COUNTERS: the caller adds them to its own totals."""
        lib.dp_take_counters(self._dp, handle, self._counters)
        return tuple(self._counters)

    def catch_up(self, listener: int) -> int:
        """Read `listener`'s socket now, on this thread, as its own thread would: the datagrams
        then waiting for `pop`."""
        return lib.dp_catch_up(self._dp, listener)

    def pop(self) -> Optional[Tuple[int, bytes, Address]]:
        """The oldest datagram handed to Python: (listener, data, client address), or None."""
        out = self._pop_out
        size = lib.dp_pop(self._dp, self._buffer, _MAX_DATAGRAM, out, self._pop_ip, out + 1, out + 2)
        if size < 0:
            return None
        return out[0], ffi.buffer(self._buffer, size)[:], (_host(ffi.buffer(self._pop_ip, out[1])[:]),
                                                             out[2])

    def stats(self) -> Dict[str, int]:
        """Its counters (STATS); zeros once closed."""
        if self._dp is None:
            return dict.fromkeys(STATS, 0)
        values = ffi.new("unsigned long long[]", len(STATS))
        lib.dp_stats(self._dp, values)
        return dict(zip(STATS, values))


def parse_send(data: bytes) -> Optional[Tuple[Address, bytes]]:
    """The native Send indication parser: what `relay.proto.stun.parse_send_indication` returns
    for the same bytes (the tests and the fuzz target compare them)."""
    ip = ffi.new("unsigned char[16]")
    out = ffi.new("int[4]")  # ip length, port, payload offset, payload length
    if lib.dp_parse_send(data, len(data), ip, out, out + 1, out + 2, out + 3) < 0:
        return None
    return (_host(ffi.buffer(ip, out[0])[:]), out[1]), data[out[2]:out[2] + out[3]]
