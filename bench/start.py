"""Seconds from spawning `twistd -n turnrelay` to its start banner (every worker ready), on a
fresh --state-dir each run (so a first run: certificate, first-run account and ledger made).

    python bench/start.py [--runs 7] [--workers 2] [-- EXTRA TWISTD ARGS]

Without extra arguments it is the first-run default (its tokens API on a free port).

Prints each run and the median.  Binds 127.0.0.1 only; stops each relay with SIGINT.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

READY = re.compile(r"turnrelay \S+ ready: ")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def one_start(workers: int, extra: list) -> float:
    state = tempfile.mkdtemp(prefix="turnrelay-start-")
    argv = [TWISTD, "-n", "--pidfile=", "turnrelay", "--state-dir", state, "--workers",
            str(workers), "--listening-ip", "127.0.0.1", "--listening-port", "0",
            "--tls-listening-port", "0", *(extra or ["--api-port", "0"])]
    began = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    took = None
    try:
        for line in process.stdout:
            if READY.search(line):
                took = time.monotonic() - began
                break
    finally:
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=60)[0]
        shutil.rmtree(state, ignore_errors=True)
    if took is None:
        raise SystemExit(f"no start banner:\n{rest}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args()
    times = [one_start(args.workers, args.extra) for _ in range(args.runs)]
    print("runs:", " ".join(f"{t:.2f}" for t in times), "s")
    print(f"median: {sorted(times)[len(times) // 2]:.2f} s")


if __name__ == "__main__":
    main()
