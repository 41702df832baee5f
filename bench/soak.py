"""Soak: thousands of concurrent UDP allocations, refreshed, with a trickle of data, on loopback.

    .venv/bin/python bench/soak.py --allocations 5000 --minutes 10

Starts `twistd turnrelay` on 127.0.0.1 as the tests do (tests/support/servers.py, UDP only), then
from one process and one epoll loop (no aioice: one socket and a few bytes of state per
allocation): allocates `--allocations` relays, binds a channel on each to an echo peer in this
process, and for `--minutes` sends each allocation's payload through its channel every
`--data-interval` seconds, checking the echo comes back, while refreshing every allocation
every `--refresh-interval` seconds (and re-binding its channel before it expires).  Then it
stops refreshing and waits for the server to expire every allocation on its own.

Measured on the server process (/proc): resident memory and open descriptors at start, once
every allocation is made, at the end of warm-up and every 30 s.  Warm-up ends with the first
channel rebind (240 s), when every periodic job has run once.  The report gives RSS per allocation, the RSS drift after warm-up (flat means within
--max-drift), descriptors back to the start count after expiry, and "allocation closed
... reason=expired" for every allocation in the server's log.  Exit status 1 on any failure.
Bounded: every phase has a deadline; the server is stopped by PID at the end.
"""
from __future__ import annotations

import argparse
import os
import resource
import selectors
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the tests' support package
from relay.proto import stun  # noqa: E402
from support.servers import PASSWORD, REALM, USER, start_server  # noqa: E402

HOST = "127.0.0.1"
# Below the kernel's ephemeral ports, which the clients use; room for 15,000 allocations.
RELAY_PORTS = (10000, 30000)
CHANNEL = 0x4000
LIFETIME = 600                 # RFC 8656's default lifetime: the shortest the server grants
CHANNEL_REBIND = 240           # channels last 600 s, permissions 300 s: rebinding renews both
Request = Tuple[int, int, List[Tuple[int, object]]]   # (allocation index, method, attributes)


def server_stats(pid: int) -> Tuple[int, int]:
    """(resident set size in KiB, open descriptors) of `pid`."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def wait_for_closed(server, reason: str, wanted: int, timeout: float) -> int:
    """How many allocations the log says were closed with `reason`, once `wanted` were, the
    server exited, or `timeout` passed.  Counted every second: one event per allocation would
    rescan a log of tens of thousands of lines each time."""
    deadline = time.monotonic() + timeout
    while True:
        closed = sum(reason in line for line in list(server.log))
        if closed >= wanted or server.process.poll() is not None or time.monotonic() > deadline:
            return closed
        time.sleep(1)


class Load:
    """Every allocation's client socket and the echo peer, served by one epoll loop."""

    def __init__(self, server: Tuple[str, int], count: int):
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.peer = self._socket(-1)
        self.peer_address = self.peer.getsockname()
        self.socks = [self._socket(i) for i in range(count)]
        self.key = stun.long_term_key(USER, REALM, PASSWORD)
        self.nonce: Optional[str] = None
        self.pending: Dict[bytes, list] = {}
        self.answers: Dict[bytes, Optional[stun.Message]] = {}
        self.sent = self.echoed = self.retransmits = 0
        self.errors: Dict[int, int] = {}
        self.rate = 0.0            # payloads a second, once `start_trickle` is called
        self.payload = b""
        self._due = 0.0
        self._last = 0.0

    def start_trickle(self, rate: float, payload: bytes) -> None:
        self.rate, self.payload, self._last = rate, payload, time.monotonic()

    def trickle(self) -> None:
        """Send the payloads due by now, round robin over the allocations, evenly paced.

        Called from every loop, requests included, so refreshes never pause the data; a
        late call does not make up for lost time with a burst (at most 50 ms worth).
        """
        now = time.monotonic()
        self._due = min(self._due + (now - self._last) * self.rate, max(self.rate * 0.05, 1))
        self._last = now
        while self._due >= 1:
            self.send_data(self.sent % len(self.socks), self.payload)
            self._due -= 1

    def _socket(self, index: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16 if index >= 0 else 1 << 22)
        sock.bind((HOST, 0))
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, index)
        return sock

    def close(self) -> None:
        for sock in self.socks + [self.peer]:
            self.selector.unregister(sock)
            sock.close()

    def challenge(self) -> None:
        """One nonce serves every socket: it binds the client IP, and they share one."""
        msg = stun.Message(stun.ALLOCATE, stun.REQUEST).add(stun.REQUESTED_TRANSPORT, 17)
        reply = self.transact([(0, msg)])[msg.transaction_id]
        assert reply is not None and reply.get(stun.ERROR_CODE)[0] == 401, reply
        self.nonce = reply.get(stun.NONCE)

    def signed(self, method: int, attributes: List[Tuple[int, object]]) -> stun.Message:
        msg = stun.Message(method, stun.REQUEST)
        for attr_type, value in attributes:
            msg.add(attr_type, value)
        msg.add(stun.USERNAME, USER).add(stun.REALM, REALM).add(stun.NONCE, self.nonce)
        return msg

    def requests(self, requests: List[Request], window: int = 200) -> List[Optional[stun.Message]]:
        """Signed requests, `window` in flight; the answers in order (None: never answered)."""
        messages = [(index, self.signed(method, attrs)) for index, method, attrs in requests]
        answers = self.transact(messages, window)
        result = []
        for _, msg in messages:
            reply = answers[msg.transaction_id]
            if reply is not None and reply.cls == stun.ERROR:
                code = reply.get(stun.ERROR_CODE)[0]
                self.errors[code] = self.errors.get(code, 0) + 1
            result.append(reply)
        return result

    def transact(self, messages: List[Tuple[int, stun.Message]], window: int = 200,
                 timeout: float = 2.0, tries: int = 6) -> Dict[bytes, Optional[stun.Message]]:
        queue = deque(messages)
        self.answers = {}
        wanted = {msg.transaction_id for _, msg in messages}
        while queue or self.pending:
            while queue and len(self.pending) < window:
                index, msg = queue.popleft()
                wire = msg.encode(key=None if self.nonce is None else self.key)
                self.pending[msg.transaction_id] = [index, wire, time.monotonic(), 1]
                self._send(index, wire)
            self.poll(0.01)
            self.trickle()
            now = time.monotonic()
            for tid, entry in list(self.pending.items()):
                if now - entry[2] > timeout:
                    if entry[3] >= tries:
                        del self.pending[tid]
                        self.answers[tid] = None
                    else:
                        entry[2:] = [now, entry[3] + 1]
                        self.retransmits += 1
                        self._send(entry[0], entry[1])
        return {tid: self.answers.get(tid) for tid in wanted}

    def _send(self, index: int, wire: bytes) -> None:
        try:
            self.socks[index].sendto(wire, self.server)
        except BlockingIOError:
            pass   # a full buffer: the retransmission covers it

    def send_data(self, index: int, payload: bytes) -> None:
        self.sent += 1
        try:
            self.socks[index].sendto(stun.CHANNEL_HEADER.pack(CHANNEL, len(payload)) + payload,
                                     self.server)
        except BlockingIOError:
            pass   # counted as sent, so as lost

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            sock, index = key.fileobj, key.data
            while True:
                try:
                    data, address = sock.recvfrom(65536)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if index < 0:
                    self.peer.sendto(data, address)   # the echo peer
                elif data[0] >= 0x40:
                    self.echoed += 1
                elif stun.is_stun(data):
                    reply = stun.parse(data)
                    if self.pending.pop(reply.transaction_id, None) is not None:
                        self.answers[reply.transaction_id] = reply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocations", type=int, default=5000)
    parser.add_argument("--minutes", type=float, default=10.0, help="relaying, after set-up")
    parser.add_argument("--refresh-interval", type=float, default=120.0)
    parser.add_argument("--data-interval", type=float, default=10.0,
                        help="seconds between two payloads of one allocation")
    parser.add_argument("--payload", type=int, default=100, help="bytes per payload")
    parser.add_argument("--max-drift", type=float, default=0.05,
                        help="largest RSS growth after warm-up, as a fraction")
    parser.add_argument("--delete", action="store_true",
                        help="end allocations with Refresh LIFETIME 0 instead of waiting "
                             f"{LIFETIME} s for them to expire (a short trial run)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for turnrelay (repeat)")
    args = parser.parse_args()
    if not 1 <= args.allocations <= 15000 or not 0 < args.minutes <= 120:
        parser.error("--allocations is 1-15000 and --minutes at most 120: this run is bounded")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.allocations + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    failures: List[str] = []
    # Stopped early (even from a background job, where SIGINT is ignored): stop the server too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    with tempfile.TemporaryDirectory(prefix="turnrelay-soak-") as workdir:
        server = start_server("--stale-nonce", "86400", *args.server_arg, tcp=False, tls=False,
                              state_dir=workdir, relay_ports=RELAY_PORTS)
        # The start figures once start-up is over: the ledger opens after the listeners.
        server.search(r"usage backend \S+ ready")
        pid = server.process.pid
        load = Load((HOST, server.port), args.allocations)
        try:
            start_rss, start_fds = server_stats(pid)
            print(f"server pid {pid}: RSS {start_rss} KiB, {start_fds} fds before allocating")
            began = time.monotonic()
            load.challenge()
            replies = load.requests([(i, stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
                                     for i in range(args.allocations)])
            made = sum(r is not None and r.cls == stun.SUCCESS for r in replies)
            bind = [(i, stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, CHANNEL),
                                            (stun.XOR_PEER_ADDRESS, load.peer_address)])
                    for i in range(args.allocations)]
            bound = sum(r is not None and r.cls == stun.SUCCESS for r in load.requests(bind))
            alloc_rss, alloc_fds = server_stats(pid)
            per_allocation = (alloc_rss - start_rss) * 1024 / max(made, 1)
            print(f"{made} allocations, {bound} channels in {time.monotonic() - began:.0f} s: "
                  f"RSS {alloc_rss} KiB, {alloc_fds} fds; {per_allocation:.0f} B RSS per "
                  f"allocation")
            if made != args.allocations or bound != args.allocations:
                failures.append(f"only {made} allocations and {bound} channels made")

            load.start_trickle(args.allocations / args.data_interval, b"x" * args.payload)
            relay_start = time.monotonic()
            end = relay_start + args.minutes * 60
            next_refresh = relay_start + args.refresh_interval
            next_rebind = relay_start + CHANNEL_REBIND
            next_sample = relay_start + 30
            warm: Optional[int] = None
            warm_at = 0.0
            samples: List[Tuple[float, int, int]] = []
            while time.monotonic() < end:
                now = time.monotonic()
                load.trickle()
                load.poll(0.01)
                if now >= next_refresh:
                    refreshed = load.requests([(i, stun.REFRESH, []) for i in range(args.allocations)])
                    ok = sum(r is not None and r.cls == stun.SUCCESS for r in refreshed)
                    if ok != args.allocations:
                        failures.append(f"refresh at {now - relay_start:.0f} s: only {ok} answered 200")
                    next_refresh = now + args.refresh_interval
                if now >= next_rebind:
                    rebound = sum(r is not None and r.cls == stun.SUCCESS for r in load.requests(bind))
                    if rebound != args.allocations:
                        failures.append(f"channel rebind: only {rebound} answered 200")
                    next_rebind = now + CHANNEL_REBIND
                    if warm is None:
                        # Warm: every periodic job (refresh, rebind) has run once.
                        warm, warm_at = server_stats(pid)[0], now - relay_start
                        print(f"warm-up done at {now - relay_start:.0f} s: RSS {warm} KiB")
                if now >= next_sample:
                    rss, fds = server_stats(pid)
                    samples.append((now - relay_start, rss, fds))
                    print(f"  {now - relay_start:5.0f} s: RSS {rss} KiB, {fds} fds, "
                          f"{load.sent} sent, {load.echoed} echoed")
                    next_sample = now + 30
            # Let the last echoes arrive before counting them.
            load.rate = 0
            settle = time.monotonic() + 5
            while time.monotonic() < settle and load.echoed < load.sent:
                load.poll(0.1)
            lost = load.sent - load.echoed
            print(f"relayed for {args.minutes:g} min: {load.sent} payloads sent, {load.echoed} "
                  f"echoed back ({lost} lost, {lost / max(load.sent, 1):.3%}); "
                  f"{load.retransmits} request retransmissions; error answers {load.errors}")
            if lost > load.sent * 0.01:
                failures.append(f"{lost} of {load.sent} payloads lost")
            after = [rss for t, rss, _ in samples if warm is not None and t >= warm_at]
            if warm is not None and after:
                drift = (max(after) - warm) / warm
                print(f"RSS after warm-up: {warm} -> max {max(after)}, last {after[-1]} KiB "
                      f"({drift:+.1%})")
                if drift > args.max_drift:
                    failures.append(f"RSS grew {drift:.1%} after warm-up")
                fds_seen = {fds for _, _, fds in samples}
                print(f"descriptors while relaying: {sorted(fds_seen)}")
                if max(fds_seen) > alloc_fds:
                    failures.append(f"descriptors grew while relaying: {sorted(fds_seen)}")
            else:
                failures.append(f"no sample after warm-up: run longer than {CHANNEL_REBIND} s")

            # Expiry: no more refreshes; the server closes everything on its own (or, for a
            # short trial run, on a Refresh with LIFETIME 0).
            reason = "reason=deleted" if args.delete else "reason=expired"
            if args.delete:
                load.requests([(i, stun.REFRESH, [(stun.LIFETIME, 0)]) for i in range(args.allocations)])
            else:
                print(f"waiting for expiry ({LIFETIME} s after the last refresh) ...")
            closed = wait_for_closed(server, reason, made, LIFETIME + 120)
            end_rss, end_fds = server_stats(pid)
            print(f"after expiry: {closed} allocations closed ({reason}), RSS {end_rss} KiB, "
                  f"{end_fds} fds (at start: {start_rss} KiB, {start_fds} fds)")
            if closed < made:
                failures.append(f"only {closed} of {made} allocations expired")
            if end_fds > start_fds:
                failures.append(f"{end_fds - start_fds} descriptors more than at start")
        finally:
            load.close()
            exited = server.process.poll()
            log = server.stop()
        if exited is not None:
            failures.append(f"turnrelay exited with {exited} before the end:\n{log[-3000:]}")
        if "Traceback" in log:
            failures.append("a traceback in the server's log")
    for failure in failures:
        print("FAIL:", failure)
    print("soak: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
