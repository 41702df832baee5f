"""A py-spy profile of the relay's Allocate+Refresh(0) cycles: where a cycle's CPU goes.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/allocate_profile.py --seconds 10 --out /tmp/allocate.svg
    .venv/bin/python bench/allocate_profile.py --root /tmp/old-checkout ...   # another version

One server (`--workers 1`, as compare.py runs it), 4 UDP clients each doing Allocate (401,
signed Allocate) + Refresh(0) as a new client every cycle, as fast as the server answers, for
`--seconds` while py-spy samples the server (a flame graph, `--out` ending in .svg, or py-spy's
collapsed stacks otherwise).  It prints the share of samples under a few functions of
interest, the figure docs/performance.md quotes.  Loopback only, bounded in time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

from support.servers import running_echo_peer  # noqa: E402  (compare puts tests/ on the path)

# Frames (py-spy's "function (file)" names, matched as substrings) whose share is printed.
OF_INTEREST = ("relay/service/eventlog.py", "twisted/logger/", "relay/service/logtext.py",
               "relay/ledger/", "threadpool", "sqlite3", "relay/core/", "relay/auth/",
               "relay/proto/", "sendto", "doRead")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default="allocate-profile.svg")
    parser.add_argument("--root", default=compare.ROOT, help="the checkout whose relay/ runs")
    parser.add_argument("--dataplane", default="python", choices=["python", "native"],
                        help="the relay's data plane (python: the figures docs/performance.md "
                             "has tracked since before the native one)")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 60:
        parser.error("bounded: --seconds between 1 and 60")
    workdir = tempfile.mkdtemp(prefix="turnrelay-profile-")
    cert, key = compare.self_signed_cert(workdir)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    server = compare.turnrelay("turnrelay", twistd, workdir, cert, key,
                               dataplane=args.dataplane)
    server.env["PYTHONPATH"] = args.root
    compare.ROOT = args.root  # the server's working directory, which twistd puts on sys.path
    collapsed = os.path.join(workdir, "stacks.txt")
    with running_echo_peer(compare.HOST):
        server.start("1")
        clients = compare.UdpClients(server.port, 4)
        try:
            for s in clients.socks:
                clients.send(s, compare.stun.ALLOCATE)
            clients.cycles(2.0)  # warm-up, not sampled
            spies = [subprocess.Popen(["py-spy", "record", "--pid", str(server.pid), "--duration",
                                       str(int(args.seconds)), "--rate", "250", "--nonblocking",
                                       "--format", fmt, "--output", out],
                                      stdout=subprocess.DEVNULL)
                     for fmt, out in (("raw", collapsed), ("flamegraph", args.out))
                     if fmt == "raw" or args.out.endswith(".svg")]
            start = time.monotonic()
            done = clients.cycles(args.seconds)
            took = time.monotonic() - start
            for spy in spies:
                spy.wait(timeout=60)
        finally:
            clients.close()
            server.stop()
    print(f"{done} cycles in {took:.1f} s ({done / took:.0f}/s) while sampled")
    shares(collapsed)
    if not args.out.endswith(".svg"):
        os.replace(collapsed, args.out)


def shares(collapsed: str) -> None:
    """Print the share of samples whose stack passes through each frame of interest."""
    total, under = 0, Counter()
    with open(collapsed) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            total += int(count)
            for name in OF_INTEREST:
                if name in stack:
                    under[name] += int(count)
    print(f"{total} samples")
    for name in OF_INTEREST:
        print(f"  {100 * under[name] / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
