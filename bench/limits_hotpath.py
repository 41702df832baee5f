"""What the rate limits cost on the hot path: one ChannelData from the client, relayed, in the
sans-IO core (no socket: the relay endpoint's send does nothing), without limits, with
--max-bps/--max-pps, and with the account limits too.

    .venv/bin/python bench/limits_hotpath.py --packets 200000 --rounds 15

Budgets are set too large to drop anything, so every packet takes the full path.  Rounds are
interleaved and the best of each kept, so a busy machine's load hits every variant alike; the
figures are wall-clock ns per packet, for comparing the variants with each other.
"""
from __future__ import annotations

import argparse
import os
import sys
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the tests' support package

from support.core_harness import PEER, Harness, channel_data  # noqa: E402

HUGE = 1 << 40
VARIANTS = {
    "no limits": {},
    "--max-bps/--max-pps": dict(max_bps=HUGE, max_pps=HUGE),
    "+ --account-max-bps/-pps": dict(max_bps=HUGE, max_pps=HUGE, account_max_bps=HUGE,
                                     account_max_pps=HUGE),
}


def allocation(**config):
    """An allocation with channel 0x4000 bound, whose relay endpoint sends nowhere."""
    client = Harness(**config).client()
    client.allocate_ok()
    client.channel_bind(0x4000, PEER)
    alloc = client.allocation
    peer, _, expiry = alloc.channels[0x4000]
    alloc.channels[0x4000] = (peer, lambda data, to: None, expiry)
    return alloc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size", type=int, default=160, help="payload bytes")
    args = parser.parse_args()
    frame = channel_data(0x4000, b"x" * args.size)
    allocations = {name: allocation(**config) for name, config in VARIANTS.items()}
    best = dict.fromkeys(allocations, float("inf"))
    for _ in range(args.rounds):
        for name, alloc in allocations.items():
            relay = alloc.from_client_channel
            best[name] = min(best[name], timeit.timeit(lambda: relay(frame), number=args.packets))
    for name, alloc in allocations.items():
        assert alloc.limited_packets == 0 and alloc.limited == (name != "no limits")
        print(f"{name:26s} {best[name] / args.packets * 1e9:7.0f} ns per ChannelData")


if __name__ == "__main__":
    main()
