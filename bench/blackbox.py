"""Black box at scale: 100,000 garbage datagrams and malformed TCP/TLS streams at a running
relay while real aioice clients keep relaying through it.

    .venv/bin/python bench/blackbox.py --datagrams 100000 --streams 1000

tests/e2e/test_blackbox.py runs the same at a few thousand datagrams.  The relay is started on
loopback as the suite starts it (tests/support/servers.py); datagrams are mutations of real signed
requests and random bytes (tests/support/blackbox.py), sent in paced batches.  Passes when
the relay is still up, every real round trip succeeded, every answer to garbage was a
well-formed message, and its log holds no traceback.  Bounded by the counts given.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the tests' support package

from support.aioice_client import relay_round_trips  # noqa: E402
from support.blackbox import RealClients, fire_datagrams, malformed_streams, udp_drops  # noqa: E402
from support.servers import PASSWORD, USER, start_server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datagrams", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=3000, help="datagrams a second")
    args = parser.parse_args()
    if not 0 < args.datagrams <= 10_000_000 or not 0 <= args.streams <= 100_000:
        parser.error("--datagrams is 1-10^7 and --streams at most 10^5: this run is bounded")
    with tempfile.TemporaryDirectory(prefix="turnrelay-blackbox-") as state:
        server = start_server(state_dir=state)
        clients = RealClients(server)
        clients.start()
        began = time.monotonic()
        try:
            sent, answers = fire_datagrams((server.host, server.port), args.datagrams, args.seed,
                                           args.rate)
            datagram_time = time.monotonic() - began
            dropped = udp_drops(server.port)
            malformed_streams(server, args.streams, args.seed + 1)
        finally:
            clients.stop()
        elapsed = time.monotonic() - began
        alive = server.process.poll() is None
        if alive:
            relay_round_trips(server, USER, PASSWORD, [b"after the garbage"], "udp")
        log = server.stop()
    tracebacks = log.count("Traceback")
    print(f"{sent} datagrams in {datagram_time:.0f} s ({sent / datagram_time:.0f}/s), "
          f"{answers} answers, all well-formed; {dropped} dropped by the kernel (receive "
          f"buffer full) before the relay read them; {args.streams} malformed streams; "
          f"{elapsed:.0f} s in all")
    print(f"real clients: {clients.rounds} aioice round trips (UDP and TCP, 5 payloads each), "
          f"{len(clients.failures)} failed {clients.failures[:3]}")
    print(f"relay up throughout: {alive}; tracebacks in its log: {tracebacks}; "
          f"connection-limit refusals logged: {log.count('refusing more')}")
    ok = alive and not clients.failures and clients.rounds > 0 and not tracebacks
    print("blackbox: " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
