"""A reconnect storm: many UDP clients arriving at once, each setting up a call and relaying.

    .venv/bin/python bench/storm.py                       # 10,000 clients within 2 s
    .venv/bin/python bench/storm.py --clients 2000 --arrival 1
    .venv/bin/python bench/storm.py --pypy          # turnrelay on PyPy too

What a region failing over looks like to the region that takes its clients: every client
arrives within `--arrival` seconds and does what a call does first: an Allocate (challenged
with 401, then signed), a CreatePermission and a ChannelBind for the echo peer
(`turnutils_peer`), then `--packets` ChannelData packets, done once the first comes back.
coturn, pion/turn (bench/pion_server.go, Go on as many cores as the servers get; `--no-pion`
leaves it out) and turnrelay (its default worker count, the one users run) face the same
clients in the same run, one after the other, each on its own fresh ports.

Printed per server: the time until every client relays (from the first arrival), how many
never did within `--timeout`, error answers by method and code (a 401/438 challenge is not an
error), retransmissions (RFC 8489's doubling from 500 ms), the peak resident memory and the
CPU time of the server's processes (for turnrelay, the parent of the workers on its own), and
the datagrams the kernel dropped at full receive queues meanwhile (RcvbufErrors).  Bounded:
`--clients` at most 20,000, the whole run at most `--timeout` seconds a server; loopback only.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import os
import resource
import select
import socket
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (puts the checkout and tests/ on the path)

from relay.proto import stun  # noqa: E402
from support.servers import running_echo_peer  # noqa: E402

RTO = 0.5  # seconds before the first retransmission, doubled for each next (RFC 8489 6.2.1)
CHANNEL = 0x4000
# A client's steps: (method, attributes) of each request, in order, then the packets.
ALLOCATE, PERMISSION, BIND, RELAYING, DONE = range(5)
METHODS = {ALLOCATE: stun.ALLOCATE, PERMISSION: stun.CREATE_PERMISSION, BIND: stun.CHANNEL_BIND}
NAMES = {stun.ALLOCATE: "Allocate", stun.CREATE_PERMISSION: "CreatePermission",
         stun.CHANNEL_BIND: "ChannelBind"}


class Client:
    __slots__ = ("sock", "step", "nonce", "tid", "wire", "sent_at", "rto", "arrives",
                 "relaying_at")

    def __init__(self, arrives: float):
        self.sock: Optional[socket.socket] = None
        self.step = ALLOCATE
        self.nonce: Optional[str] = None
        self.tid = b""
        self.wire = b""
        self.sent_at = 0.0
        self.rto = RTO
        self.arrives = arrives
        self.relaying_at = 0.0


class Storm:
    def __init__(self, port: int, peer: Tuple[str, int], count: int, arrival: float,
                 packets: int):
        self.port, self.peer, self.packets = port, peer, packets
        self.key = stun.long_term_key(compare.USER, compare.REALM, compare.PASSWORD)
        start = time.monotonic() + 0.2
        self.clients = [Client(start + arrival * i / count) for i in range(count)]
        self.start = start
        self.by_fd: Dict[int, Client] = {}
        self.poll = select.epoll()
        self.errors: Dict[Tuple[str, int], int] = {}
        self.retransmissions = 0
        # (when to retransmit, order, client, its send's time), soonest first.
        self.timers: List[Tuple[float, int, Client, float]] = []
        self.order = itertools.count()
        self.channel_data = stun.CHANNEL_HEADER.pack(CHANNEL, 100) + bytes(100)

    def request(self, client: Client, now: float) -> None:
        method = METHODS[client.step]
        msg = stun.Message(method, stun.REQUEST)
        if client.step == ALLOCATE:
            msg.add(stun.REQUESTED_TRANSPORT, 17)
        elif client.step == PERMISSION:
            msg.add(stun.XOR_PEER_ADDRESS, self.peer)
        else:
            msg.add(stun.CHANNEL_NUMBER, CHANNEL).add(stun.XOR_PEER_ADDRESS, self.peer)
        if client.nonce is not None:
            msg.add(stun.USERNAME, compare.USER).add(stun.REALM, compare.REALM)
            msg.add(stun.NONCE, client.nonce)
        client.tid = msg.transaction_id
        client.wire = msg.encode(key=self.key if client.nonce is not None else None)
        self.send(client, client.wire, now)

    def send(self, client: Client, wire: bytes, now: float, again: bool = False) -> None:
        """Send `wire`; a first send starts the backoff anew, a retransmission doubles it."""
        client.rto = client.rto * 2 if again else RTO
        client.sent_at = now
        heapq.heappush(self.timers, (now + client.rto, next(self.order), client, now))
        try:
            client.sock.send(wire)
        except OSError:
            pass  # a full buffer: the retransmission timer sends it again

    def arrive(self, client: Client, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((compare.HOST, self.port))
        client.sock = sock
        self.by_fd[sock.fileno()] = client
        self.poll.register(sock.fileno(), select.EPOLLIN)
        self.request(client, now)

    def receive(self, client: Client, data: bytes, now: float) -> None:
        if client.step == DONE:  # e.g. the answer to a retransmitted ChannelBind, late
            return
        if client.step == RELAYING:
            if data[:2] == self.channel_data[:2]:
                client.step, client.relaying_at = DONE, now
            return
        try:
            reply = stun.parse(data)
        except stun.StunDecodeError:
            return
        if reply.transaction_id != client.tid:
            return
        if reply.cls == stun.SUCCESS:
            client.step += 1
            if client.step == RELAYING:
                for _ in range(self.packets):
                    self.send(client, self.channel_data, now)
            else:
                self.request(client, now)
            return
        code = reply.get(stun.ERROR_CODE)[0]
        if code in (401, 438) and reply.has(stun.NONCE):
            client.nonce = reply.get(stun.NONCE)
        else:
            name = NAMES[METHODS[client.step]]
            self.errors[name, code] = self.errors.get((name, code), 0) + 1
            if code == 437 and client.step == ALLOCATE:  # the 5-tuple is taken: a new socket
                self.close(client)
                self.arrive(client, now)
                return
        self.request(client, now)

    def close(self, client: Client) -> None:
        if client.sock is not None:
            self.poll.unregister(client.sock.fileno())
            del self.by_fd[client.sock.fileno()]
            client.sock.close()
            client.sock = None

    def run(self, timeout: float, rss: "PeakRss") -> Dict[str, float]:
        waiting = list(reversed(self.clients))  # next to arrive last
        deadline = self.start + timeout
        next_sample = 0.0
        done = 0
        while done < len(self.clients):
            now = time.monotonic()
            if now > deadline:
                break
            while waiting and waiting[-1].arrives <= now:
                self.arrive(waiting.pop(), now)
            wait = 0.05 if not waiting else max(0.0, min(0.05, waiting[-1].arrives - now))
            for fd, _ in self.poll.poll(wait):
                client = self.by_fd.get(fd)
                while client is not None and client.sock is not None:
                    try:
                        data = client.sock.recv(2048)
                    except OSError:
                        break
                    before = client.step
                    self.receive(client, data, time.monotonic())
                    if client.step == DONE and before != DONE:
                        done += 1
            if now >= next_sample:
                next_sample = now + 0.1
                rss.sample()
            timers = self.timers
            while timers and timers[0][0] <= now:
                _, _, client, sent_at = heapq.heappop(timers)
                if client.sock is not None and client.step != DONE and client.sent_at == sent_at:
                    self.retransmissions += 1
                    self.send(client, self.channel_data if client.step == RELAYING
                              else client.wire, now, again=True)
        relaying = [c.relaying_at for c in self.clients if c.step == DONE]
        for client in self.clients:
            self.close(client)
        self.poll.close()
        return {"all_relaying_s": (max(relaying) - self.start) if len(relaying) == len(self.clients)
                else float("nan"),
                "median_setup_ms": 1000 * sorted(c.relaying_at - c.arrives for c in self.clients
                                                 if c.step == DONE)[len(relaying) // 2]
                if relaying else float("nan"),
                "never_relayed": len(self.clients) - len(relaying),
                "retransmissions": self.retransmissions}


class PeakRss:
    """The highest resident memory seen of a server and its child processes (the workers)."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0

    def sample(self) -> None:
        total = sum(compare.rss_kib(pid) for pid in [self.pid] + compare.children(self.pid))
        self.peak = max(self.peak, total)


def udp_receive_drops() -> int:
    """The kernel's count of datagrams dropped at full UDP receive queues (RcvbufErrors),
    machine-wide: on a shared machine, others' drops count too."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--arrival", type=float, default=2.0, help="seconds over which they arrive")
    parser.add_argument("--packets", type=int, default=3, help="ChannelData packets per client")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a server, at most")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="turnrelay's worker processes (default: its own default, one per CPU)")
    parser.add_argument("--no-pion", action="store_true")
    parser.add_argument("--dataplane", default="native", choices=["native", "python"],
                        help="turnrelay's UDP data plane (default: native, the relay's default)")
    parser.add_argument("--server-cores", default=None,
                        help="taskset CPU list for the servers (default: every CPU)")
    parser.add_argument("--cpython", default=None, metavar="TWISTD",
                        help="twistd of the CPython environment turnrelay runs in (default: a "
                             "venv of /usr/bin/python3, made once, as users run it)")
    parser.add_argument("--pypy", nargs="?", const=compare.PYPY_TWISTD,
                        default=None, metavar="TWISTD",
                        help="also run turnrelay on PyPy: this twistd (default: the venv "
                             "docs/performance.md describes)")
    args = parser.parse_args()
    if not 1 <= args.clients <= 20000:
        parser.error("bounded: --clients from 1 to 20,000")
    if args.timeout > 300:
        parser.error("bounded: --timeout at most 300 s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < args.clients + 100:
        parser.error(f"the open-file limit ({hard}) is below --clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cores = args.server_cores or f"0-{(os.cpu_count() or 1) - 1}"
    workdir = tempfile.mkdtemp(prefix="turnrelay-storm-")
    cert, key = compare.self_signed_cert(workdir)
    twistd = args.cpython or compare.system_cpython()
    pion = None if args.no_pion else compare.build_pion()
    servers = [compare.coturn(workdir, cert, key)]
    servers += [compare.pion(pion, workdir, cert, key)] if pion else []
    servers.append(compare.turnrelay(f"turnrelay x{args.workers}", twistd, workdir, cert, key,
                                     workers=args.workers, dataplane=args.dataplane))
    if args.pypy:
        if not os.path.exists(args.pypy):
            parser.error(f"no PyPy twistd at {args.pypy} (see docs/performance.md)")
        servers.append(compare.turnrelay(f"turnrelay PyPy x{args.workers}", args.pypy, workdir,
                                         cert, key, workers=args.workers, dataplane=args.dataplane))
    results: List[Tuple[str, Dict[str, float], Dict[Tuple[str, int], int], int]] = []
    load = os.getloadavg()
    with running_echo_peer(compare.HOST) as peer:
        for server in servers:
            server.start(cores)
            try:
                storm = Storm(server.port, peer, args.clients, args.arrival, args.packets)
                rss = PeakRss(server.pid)
                before = compare.cpu_ns_by_process(server.pid)
                drops = udp_receive_drops()
                figures = storm.run(args.timeout, rss)
                figures["drops"] = udp_receive_drops() - drops
                used = {pid: ns - before.get(pid, 0)
                        for pid, ns in compare.cpu_ns_by_process(server.pid).items()}
                figures["cpu_s"] = sum(used.values()) / 1e9
                figures["main_cpu_s"] = used.get(server.pid, 0) / 1e9
                results.append((server.name, figures, storm.errors, rss.peak))
            finally:
                server.stop()
    print(f"{args.clients} clients arriving within {args.arrival} s, {args.packets} packets each, "
          f"servers on CPUs {cores}; loadavg {load[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after; turnrelay CPython is {compare.interpreter(twistd)}")
    for name, figures, errors, peak in results:
        shown = ", ".join(f"{method} {code}: {n}" for (method, code), n in sorted(errors.items()))
        print(f"{name:16} all relaying after {figures['all_relaying_s']:.2f} s, median setup "
              f"{figures['median_setup_ms']:.0f} ms, never relayed {figures['never_relayed']}, "
              f"retransmissions {figures['retransmissions']}, peak RSS {peak / 1024:.0f} MiB, "
              f"CPU {figures['cpu_s']:.1f} s (main process {figures['main_cpu_s']:.1f} s), "
              f"UDP receive-buffer drops {figures['drops']:.0f}, "
              f"errors: {shown or 'none'}")
    times = {name: figures["all_relaying_s"] for name, figures, _, _ in results}
    ours = [name for name in times if name.startswith("turnrelay")]
    for name in ours:
        for peer in [peer for peer in times if peer not in ours]:
            print(f"time until all relay, {name}/{peer}: {times[name] / times[peer]:.2f}")


if __name__ == "__main__":
    main()
