"""turnrelay beside coturn over DTLS (and plain UDP for reference): server CPU per relayed packet.

    .venv/bin/python bench/dtls.py --rounds 3

Each round starts each server (compare.py's coturn with DTLS on, one relay thread; turnrelay
with --dtls and --workers 1), pinned to one core, and runs coturn's `turnutils_uclient` on the
other: `--clients` sessions, each sending `--messages` ChannelData messages `--interval` ms
apart through `turnutils_peer`, which echoes them.  The figure is the server's CPU time (every
thread and child, from /proc schedstat) over the packets it relayed, both directions (2 per
echoed message); DTLS handshakes and allocations are inside it, a few per run.  Everything binds
127.0.0.1 and every run is bounded in messages and seconds.  Not part of the test suite.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import (  # noqa: E402
    HOST,
    PASSWORD,
    USER,
    Server,
    coturn,
    cpu_ns,
    running_echo_peer,
    self_signed_cert,
    turnrelay,
)


def run(server: Server, peer, secure: bool, args) -> float:
    """CPU microseconds per relayed packet for one uclient run."""
    port = server.tls_port if secure else server.port
    before = cpu_ns(server.pid)
    result = subprocess.run(
        ["taskset", "-c", str(args.load_core), "turnutils_uclient", *(["-S"] if secure else []),
         "-c", "-p", str(port), "-u", USER, "-w", PASSWORD, "-e", peer[0], "-r", str(peer[1]),
         "-n", str(args.messages), "-m", str(args.clients), "-z", str(args.interval),
         "-l", str(args.size), HOST], capture_output=True, text=True, timeout=300)
    spent = cpu_ns(server.pid) - before
    output = result.stdout + result.stderr
    totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
    if not totals:
        raise SystemExit(f"uclient failed against {server.name}:\n{output[-2000:]}")
    received = int(totals[-1][1])
    return spent / 1000 / (2 * received)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--interval", type=int, default=5, help="ms between a session's messages")
    parser.add_argument("--size", type=int, default=100, help="payload bytes")
    parser.add_argument("--server-core", type=int, default=1)
    parser.add_argument("--load-core", type=int, default=0)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="turnrelay-dtls-bench-")
    cert, key = self_signed_cert(workdir)
    dtls_coturn = coturn(workdir, cert, key)
    dtls_coturn.template.remove("--no-dtls")
    ours = turnrelay("turnrelay", os.path.join(os.path.dirname(sys.executable), "twistd"),
                     workdir, cert, key)
    ours.template += ["--dtls", "--rfc5766-channels"]
    figures: Dict[str, List[float]] = {}
    with running_echo_peer() as peer:
        for _ in range(args.rounds):
            for server in (dtls_coturn, ours):
                server.start(str(args.server_core))
                try:
                    for secure, mode in ((False, "udp"), (True, "dtls")):
                        figures.setdefault(f"{server.name} {mode}", []).append(
                            run(server, peer, secure, args))
                finally:
                    server.stop()
    print(f"CPU us per relayed packet, median of {args.rounds} rounds ({args.clients} sessions x "
          f"{args.messages} messages of {args.size} B, {args.interval} ms apart):")
    for mode in ("udp", "dtls"):
        theirs, mine = (statistics.median(figures[f"{name} {mode}"])
                        for name in ("coturn", "turnrelay"))
        print(f"  {mode:5} coturn {theirs:7.2f}  turnrelay {mine:7.2f}  ratio {mine / theirs:5.2f}")


if __name__ == "__main__":
    main()
