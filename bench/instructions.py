"""User-space instructions per relayed packet, or per Allocate+Refresh(0) cycle, of turnrelay,
counted by callgrind.

    .venv/bin/python bench/instructions.py --mode udp-send --packets 600 --rate 50
    .venv/bin/python bench/instructions.py --mode allocate --packets 300   # cycles, not packets
    .venv/bin/python bench/instructions.py --root /tmp/old-checkout ...   # compare two versions

The figure compare.py reports (CPU time per packet) moves with whatever else the machine
runs; an instruction count does not, so this is the one to judge a hot-path change by.  The
server runs under `valgrind --tool=callgrind` (about 50 times slower: keep the rate low, every
packet then costs a reactor wake-up of its own), instrumentation on only while the measured
packets flow; kernel work (the syscalls themselves) is not counted.  Loopback only, bounded.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

from support.servers import running_echo_peer  # noqa: E402  (compare puts tests/ on the path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="udp-channel", choices=list(compare.MODES) + ["allocate"])
    parser.add_argument("--packets", type=int, default=600, help="round trips measured")
    parser.add_argument("--rate", type=float, default=50, help="round trips a second")
    parser.add_argument("--root", default=compare.ROOT, help="the checkout whose relay/ runs")
    parser.add_argument("--dataplane", default="python", choices=["python", "native"],
                        help="the relay's data plane (python: the figures docs/performance.md "
                             "has tracked since before the native one)")
    args = parser.parse_args()
    if args.packets / args.rate > 60:
        parser.error("bounded: --packets / --rate must be <= 60 seconds")
    workdir = tempfile.mkdtemp(prefix="turnrelay-callgrind-")
    cert, key = compare.self_signed_cert(workdir)
    out = os.path.join(workdir, "callgrind.out")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    server = compare.turnrelay("turnrelay", twistd, workdir, cert, key,
                               dataplane=args.dataplane)
    server.template = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                       f"--callgrind-out-file={out}", sys.executable] + server.template
    server.env["PYTHONPATH"] = args.root
    server.start_timeout = 300.0
    compare.ROOT = args.root  # the server's working directory, which twistd puts on sys.path
    with running_echo_peer(compare.HOST) as peer:
        try:
            start = time.monotonic()
            server.start("1")
            print(f"server up under callgrind in {time.monotonic() - start:.0f} s", file=sys.stderr)
            if args.mode == "allocate":
                allocate_cycles(server, args.packets)
                return
            transport, kind = args.mode.split("-")
            port = server.tls_port if transport == "tls" else server.port
            gen = compare.LoadGen(compare.build_loadgen(), transport, port, 8, 0)
            compare.set_up(gen, 8, peer, kind == "channel", 100)
            gen.run(args.rate, args.packets / args.rate, 100)  # warm-up, not counted
            subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True,
                           stdout=subprocess.DEVNULL)
            sent, received, _, _ = gen.run(args.rate, args.packets / args.rate, 100)
            subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True,
                           stdout=subprocess.DEVNULL)
            gen.close()
        finally:
            server.stop()  # callgrind writes its counts as the server exits
            if args.mode == "allocate":
                print(f"allocate: {args.packets} cycles, "
                      f"{instructions(out) / args.packets:.0f} instructions per Allocate+Refresh(0) "
                      "cycle (a new client each: 401, Allocate, Refresh)")
    if args.mode != "allocate":
        print(f"{args.mode}: {sent} sent, {received} echoed, "
              f"{instructions(out) / (sent + received):.0f} instructions per relayed packet")


def instructions(out: str) -> int:
    total = 0
    for path in glob.glob(out + "*"):
        with open(path) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
    return total


def allocate_cycles(server: compare.Server, cycles: int) -> None:
    """`cycles` Allocate (challenged once per client) + Refresh(0) cycles from 4 clients, as
    compare.py's allocation figures run them, after as many uncounted ones."""
    clients = compare.UdpClients(server.port, 4)
    for s in clients.socks:
        clients.send(s, compare.stun.ALLOCATE)

    def run(count: int) -> None:
        done = clients.cycles(120, count)
        if done < count:
            raise SystemExit(f"only {done} of {count} cycles in 120 s")
    try:
        run(cycles)  # warm-up, not counted
        subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True,
                       stdout=subprocess.DEVNULL)
        run(cycles)
        subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True,
                       stdout=subprocess.DEVNULL)
    finally:
        clients.close()


if __name__ == "__main__":
    main()
