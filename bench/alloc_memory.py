"""Where an idle UDP allocation's memory goes: tracemalloc over allocations made in-process.

    .venv/bin/python bench/alloc_memory.py                    # native data plane, 2,000
    .venv/bin/python bench/alloc_memory.py --dataplane python --allocations 4000

compare.py gives the resident memory per idle allocation of a real server (what an operator
sees, allocator pools and all); this runs the same relay service in this process (one
process, `--workers 1`) so that tracemalloc can say which lines hold the bytes: the growth
between a snapshot after 200 warm-up allocations and one after `--allocations` more, per
allocation, by line.  The C data plane's own entries are not Python objects and are not
counted here.  Loopback only, bounded.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import tracemalloc
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

from support.servers import free_port  # noqa: E402  (compare puts tests/ on the path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataplane", default="native", choices=["native", "python"])
    parser.add_argument("--allocations", type=int, default=2000)
    parser.add_argument("--lines", type=int, default=15, help="lines of the breakdown shown")
    args = parser.parse_args()
    if not 200 <= args.allocations <= 10000:
        parser.error("bounded: --allocations from 200 to 10,000")
    from twisted.internet import reactor

    from relay.service.options import Options
    from relay.service.tap import makeService

    port = free_port()
    options = Options()
    options.parseOptions([
        "--listening-ip", compare.HOST, "--listening-port", str(port), "--no-tcp", "--no-tls",
        "--relay-ip", compare.HOST, "--min-port", str(compare.RELAY_PORTS[0]),
        "--max-port", str(compare.RELAY_PORTS[1]), "--user", f"{compare.USER}:{compare.PASSWORD}",
        "--realm", compare.REALM, "--state-dir", tempfile.mkdtemp(prefix="turnrelay-memory-"),
        "--workers", "1", "--dataplane", args.dataplane, "--log-level", "warn"])
    service = makeService(options, reactor)
    service.privilegedStartService()
    service.startService()
    batches: List[compare.UdpClients] = []
    snapshots: List[tracemalloc.Snapshot] = []
    made: List[int] = []

    # The clients run in this process too: what they hold is not the relay's.
    theirs = [tracemalloc.Filter(False, os.path.join(compare.ROOT, folder, "*"))
              for folder in ("bench", "tests")]

    def snapshot(then=lambda: None) -> None:
        gc.collect()
        snapshots.append(tracemalloc.take_snapshot().filter_traces(theirs))
        then()

    def clients() -> None:
        try:
            compare.idle_allocations(port, 200, batches)  # warm: pools, caches, first nonces
            done = threading.Event()
            reactor.callFromThread(snapshot, done.set)
            done.wait(30)
            made.append(sum(compare.idle_allocations(port, 200, batches)
                            for _ in range(args.allocations // 200)))
        finally:
            reactor.callFromThread(snapshot, reactor.stop)

    tracemalloc.start(1)
    threading.Thread(target=clients, daemon=True).start()
    reactor.run()
    for batch in batches:
        batch.close()
    count = made[0] if made else 0
    if len(snapshots) < 2 or not count:
        raise SystemExit("no allocation was made")
    diff = snapshots[1].compare_to(snapshots[0], "lineno")
    total = sum(stat.size_diff for stat in diff)
    print(f"{args.dataplane} data plane: {count} allocations, {total / count:.0f} traced bytes "
          "each (Python objects; the C entries and the allocator's pools aside)")
    for stat in diff[:args.lines]:
        frame = stat.traceback[0]
        where = os.path.relpath(frame.filename, compare.ROOT)
        print(f"{stat.size_diff / count:8.0f} B {stat.count_diff / count:6.2f} objects  "
              f"{where}:{frame.lineno}")


if __name__ == "__main__":
    main()
