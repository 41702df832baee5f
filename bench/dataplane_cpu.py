"""CPU per relayed packet of the native data plane's thread alone (relay/net/dataplane.c),
before it is wired into the relay: one listener, ALLOCATIONS allocations each with a channel,
and a load process on the other core that sends ChannelData from the clients and datagrams
from the peer at a paced rate, reads what is relayed back, and counts it.

    .venv/bin/python bench/dataplane_cpu.py --rate 10000 --seconds 10 --allocations 20

`--rate` is round trips a second: that many ChannelData to the peer and as many datagrams
from the peer, so 2 x rate relayed packets a second.  The figure is the thread's own CPU time
(/proc/self/task/TID/stat) over the packets it relayed: it leaves out the reactor, which
relays nothing here.  Loopback only, bounded in time.

    .venv/bin/python bench/dataplane_cpu.py --burst 400 --repeat 20

`--burst N` measures full batches instead, as at the highest load: before the thread starts,
each client queues N ChannelData on the listener and the peer N datagrams on each relay
socket; then the thread drains them all, and the figure is its CPU time (schedstat, in ns)
over the packets it relayed, the median over `--repeat` drains, with UDP GSO on and off in
turn (TURNRELAY_DATAPLANE_GSO does not apply here).
"""
import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys

from relay.net import dataplane

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu_s(tid: int) -> float:
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


LOAD = r"""
import select, socket, struct, sys, time
listener, relays, rate, seconds = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3]), float(sys.argv[4])
host, port = listener.rsplit(":", 1)


def drain(socks, timeout):
    got = 0
    for s in select.select(socks, [], [], timeout)[0]:
        try:
            while True:
                s.recv(2048); got += 1
        except BlockingIOError:
            pass
    return got


clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in relays]
for c in clients:
    c.bind(("127.0.0.1", 0)); c.setblocking(False)
peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); peer.bind(("127.0.0.1", 0)); peer.setblocking(False)
print(peer.getsockname()[1], *[c.getsockname()[1] for c in clients], flush=True)
sys.stdin.readline()  # the tables are installed
payload = b"x" * 96
frame = struct.pack("!HH", 0x4000, len(payload)) + payload
targets = [(h, int(p)) for h, p in (r.rsplit(":", 1) for r in relays)]
sent = received = 0
start = time.monotonic()
end = start + seconds
i = 0
while True:
    now = time.monotonic()
    if now >= end:
        break
    due = int((now - start) * rate)
    while sent < due:
        k = i % len(clients); i += 1
        clients[k].sendto(frame, (host, int(port)))
        peer.sendto(payload, targets[k])
        sent += 1
    received += drain(clients + [peer], 0.001)
until = time.monotonic() + 0.5
while time.monotonic() < until:
    received += drain(clients + [peer], 0.05)
print(2 * sent, received, flush=True)
"""


def thread_cpu_ns(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def udp(buffer: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    sock.bind(("127.0.0.1", 0))
    return sock


def drain_once(burst: int, allocations: int, gso: bool) -> float:
    """One drain of queued full batches (see --burst): the thread's CPU ns per relayed packet."""
    big = 4 * 1024 * 1024  # the kernel caps it at net.core.rmem_max
    plane = dataplane.NativeDataPlane()
    plane.gso(gso)
    listener_sock = udp(big)
    listener = plane.add_listener(listener_sock.fileno())
    peer = udp(big)
    clients, relays = [udp(big) for _ in range(allocations)], [udp(big) for _ in range(allocations)]
    for client, relay in zip(clients, relays):
        handle = plane.add_allocation(listener, client.getsockname(), relay.fileno(), None)
        plane.permit(handle, "127.0.0.1")
        plane.bind_channel(handle, 0x4000, peer.getsockname())
    payload = b"x" * 100
    frame = struct.pack("!HH", 0x4000, len(payload)) + payload
    for _ in range(burst):
        for client, relay in zip(clients, relays):
            client.sendto(frame, listener_sock.getsockname())
            peer.sendto(payload, relay.getsockname())
    expected = 2 * burst * allocations
    before = set(os.listdir("/proc/self/task"))
    plane.start()
    (tid,) = {int(t) for t in set(os.listdir("/proc/self/task")) - before}
    got = 0
    for sock in [peer] + clients:
        sock.settimeout(5)
    try:
        for sock, count in [(peer, burst * allocations)] + [(c, burst) for c in clients]:
            for _ in range(count):
                sock.recv(2048)
                got += 1
    except socket.timeout:
        pass
    cpu = thread_cpu_ns(tid)  # all of it: the thread began with the drain
    stats = plane.stats()
    plane.close()
    for sock in [listener_sock, peer] + clients + relays:
        sock.close()
    if got < expected or stats["forwarded"] < expected:
        raise SystemExit(f"lost datagrams: {got} of {expected} arrived ({stats}): use a smaller --burst")
    return cpu / stats["forwarded"]


def burst(args) -> None:
    results: dict = {True: [], False: []}
    for _ in range(args.repeat):
        for gso in (True, False):
            results[gso].append(drain_once(args.burst, args.allocations, gso))
    for gso, values in results.items():
        values.sort()
        print(f"GSO {'on ' if gso else 'off'}: {statistics.median(values):.0f} ns of the thread's CPU "
              f"per relayed packet (median of {len(values)}, {values[0]:.0f}-{values[-1]:.0f})")
    print(f"{args.burst} queued per socket, {args.allocations} allocations; "
          f"load average {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=10000, help="round trips a second")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--allocations", type=int, default=20)
    parser.add_argument("--burst", type=int, default=0, help="queued datagrams per socket (see above)")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):  # not on PyPy 3.9
        os.sched_setaffinity(0, {0})
    if args.burst:
        return burst(args)
    before = set(os.listdir("/proc/self/task"))
    plane = dataplane.NativeDataPlane()
    plane.start()
    (tid,) = {int(t) for t in set(os.listdir("/proc/self/task")) - before}
    listener_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener_sock.bind(("127.0.0.1", 0))
    listener_sock.setblocking(False)
    listener = plane.add_listener(listener_sock.fileno())
    relays = []
    for _ in range(args.allocations):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        relays.append(s)
    load = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-c", LOAD, "127.0.0.1:%d" % listener_sock.getsockname()[1],
         ",".join("127.0.0.1:%d" % s.getsockname()[1] for s in relays), str(args.rate), str(args.seconds)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    peer_port, *client_ports = map(int, load.stdout.readline().split())
    handles = []
    for relay, client_port in zip(relays, client_ports):
        handle = plane.add_allocation(listener, ("127.0.0.1", client_port), relay.fileno(), None)
        plane.permit(handle, "127.0.0.1")
        plane.bind_channel(handle, 0x4000, ("127.0.0.1", peer_port))
        handles.append(handle)
    cpu0 = thread_cpu_s(tid)
    load.stdin.write("go\n")
    load.stdin.flush()
    sent, received = map(int, load.stdout.readline().split())
    cpu = thread_cpu_s(tid) - cpu0
    relayed = plane.stats()["forwarded"]
    load.wait(timeout=30)
    print(f"rate {args.rate:.0f} rt/s, {args.allocations} allocations, {args.seconds:.0f} s: "
          f"sent {sent}, relayed {relayed}, received {received} (loss {1 - received / sent:.4%}); "
          f"data plane thread CPU {cpu:.2f} s = {cpu / relayed * 1e6:.2f} us per relayed packet; "
          f"load average {os.getloadavg()[0]:.2f}")
    plane.close()
    for s in relays + [listener_sock]:
        s.close()


if __name__ == "__main__":
    main()
