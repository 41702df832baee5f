"""Whether Allocate throughput scales with the CPU the worker processes get: Allocate+Refresh(0)
cycles a second of turnrelay with `--workers 1` and `--workers 2` (coturn with one and two relay
threads beside them), each worker held by a cgroup CPU quota to --cpu-per-worker CPUs.

    .venv/bin/python bench/scaling.py --rounds 3

On a machine of two cores, `bench/compare.py --workers 2` shares them with its load generator,
which a core's worth of answers keeps busy for about half a core: two workers cannot show there
what two cores of their own would give them.  Here a quota stands in for each worker's core:
every worker process runs in a cgroup of its own whose CPU quota is --cpu-per-worker, on any
core, and the load generator, outside them, has the rest.  (The relay's parent process, which
takes no part in an Allocate, is not held; its CPU counts.)  coturn's relay threads share one
cgroup of --cpu-per-worker times their number.  A relay that scales makes N times one worker's
cycles with N workers; "CPU used" shows whether a server used its quota (below it, something
else than its CPU held it back, and its ratio says little).  What this cannot show is what
cores add or take away beyond their time: caches, memory bandwidth.

Each cycle is a new client (compare.py's `allocation_figures`: 401, Allocate, Refresh(0)).
Root only, for the cgroups (v1's `cpu` controller or v2's); loopback; bounded in time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import compare

CGROUP_V1 = "/sys/fs/cgroup/cpu"
CGROUP_V2 = "/sys/fs/cgroup"
PERIOD_US = 10_000  # a short period: a quota used up stalls a worker for less of each


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


class CpuQuota:
    """A cgroup whose processes may use `cpus` CPUs' worth of time, spread over any cores."""

    def __init__(self, name: str, cpus: float):
        quota = int(PERIOD_US * cpus)
        if os.path.exists(os.path.join(CGROUP_V1, "cpu.cfs_quota_us")):
            self.path = os.path.join(CGROUP_V1, name)
            os.makedirs(self.path, exist_ok=True)
            self._write("cpu.cfs_period_us", str(PERIOD_US))
            self._write("cpu.cfs_quota_us", str(quota))
        elif "cpu" in _read(os.path.join(CGROUP_V2, "cgroup.subtree_control")).split():
            self.path = os.path.join(CGROUP_V2, name)
            os.makedirs(self.path, exist_ok=True)
            self._write("cpu.max", f"{quota} {PERIOD_US}")
        else:
            raise SystemExit("no cgroup CPU controller to hold a quota (v1 cpu or v2 cpu)")

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def hold(self, pid: int) -> None:
        """Move process `pid`, every thread of it, into this cgroup."""
        self._write("cgroup.procs", str(pid))

    def remove(self) -> None:
        """Once the processes it held are gone (a worker ends just after its parent: a bounded
        wait for that)."""
        deadline = time.monotonic() + 10
        while _read(os.path.join(self.path, "cgroup.procs")).strip():
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.path} still holds processes")
            time.sleep(0.05)
        os.rmdir(self.path)


def held_processes(server: compare.Server, workers: int) -> List[int]:
    """The processes that answer: a single process, or the `workers` children of the parent
    (all started by the time one answers, a bounded wait otherwise)."""
    if workers == 1:
        return [server.pid]
    deadline = time.monotonic() + 10
    while len(compare.children(server.pid)) < workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.name}: fewer than {workers} worker processes")
        time.sleep(0.05)
    return compare.children(server.pid)


def coturn_threads(workdir: str, cert: str, key: str, threads: int) -> compare.Server:
    server = compare.coturn(workdir, cert, key)
    server.template = [f"--relay-threads={threads}" if a == "--relay-threads=1" else a
                       for a in server.template]
    server.name = f"coturn, {threads} relay thread{'s' if threads > 1 else ''}"
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpu-per-worker", type=float, default=0.4,
                        help="CPUs a worker (or relay thread) may use (default 0.4: two of them "
                             "and the load generator fit in two cores)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=3.0, help="counted cycles, each run")
    parser.add_argument("--alloc-warmup", type=float, default=3.0,
                        help="seconds of cycles before the counted ones")
    parser.add_argument("--alloc-clients", type=int, default=16, help="clients at once")
    parser.add_argument("--load-core", type=int, default=0)
    parser.add_argument("--no-coturn", action="store_true")
    parser.add_argument("--cpython", default=None, metavar="TWISTD",
                        help="twistd of the CPython environment turnrelay runs in (default: "
                             "compare.py's venv of /usr/bin/python3)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    if args.rounds > 10 or args.seconds > 30 or args.alloc_warmup > 30:
        parser.error("bounded: --rounds <= 10, --seconds and --alloc-warmup <= 30")
    if not 0.05 <= args.cpu_per_worker * max(args.workers) <= cores:
        parser.error(f"--cpu-per-worker times the most --workers must fit in {cores} CPUs")
    workdir = tempfile.mkdtemp(prefix="turnrelay-scaling-")
    cert, key = compare.self_signed_cert(workdir)
    twistd = args.cpython or compare.system_cpython()
    servers = []  # (workers or relay threads, server, whether each worker has a quota of its own)
    for n in args.workers:
        if not args.no_coturn:
            servers.append((n, coturn_threads(workdir, cert, key, n), False))
        servers.append((n, compare.turnrelay(f"turnrelay, {n} worker{'s' if n > 1 else ''}",
                                             twistd, workdir, cert, key, workers=n,
                                             dataplane="native"), True))
    results: Dict[str, List[Dict[str, float]]] = {server.name: [] for _, server, _ in servers}
    every_core = f"0-{cores - 1}"
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[0]
    for round_no in range(args.rounds):
        for n, server, per_worker in servers:
            server.start(every_core)
            quotas = []
            try:
                if per_worker:
                    for index, pid in enumerate(held_processes(server, n)):
                        quotas.append(CpuQuota(f"turnrelay-scaling-{os.getpid()}-{index}",
                                               args.cpu_per_worker))
                        quotas[-1].hold(pid)
                else:
                    quotas.append(CpuQuota(f"turnrelay-scaling-{os.getpid()}",
                                           args.cpu_per_worker * n))
                    quotas[0].hold(server.pid)
                figures = compare.allocation_figures(server, args)
                figures["cpus_used"] = figures["alloc_cpu_us"] * figures["allocs_per_s"] / 1e6
            finally:
                server.stop()
                for quota in quotas:
                    quota.remove()
            results[server.name].append(figures)
            print(f"round {round_no + 1} {server.name}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in figures.items()), file=sys.stderr)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[0]
    print(f"{args.rounds} rounds of {args.seconds} s after {args.alloc_warmup} s, "
          f"{args.cpu_per_worker} CPU per worker or relay thread, servers on CPUs {every_core}, "
          f"load on CPU {args.load_core}; loadavg {load_before} before, {load_after} after; "
          f"turnrelay is {compare.interpreter(twistd)}")
    print(f"{'server':30} {'cycles/s':>10} {'x first':>8} {'CPU us/cycle':>13} {'CPU used':>9} "
          f"{'quota':>6} {'errors':>7}")
    single: Dict[str, float] = {}
    for n, server, _ in servers:
        runs = results[server.name]
        rate = statistics.median(r["allocs_per_s"] for r in runs)
        kind = server.name.split(",")[0]
        single.setdefault(kind, rate)  # the first --workers given is the base
        print(f"{server.name:30} {rate:10.0f} {rate / single[kind]:8.2f} "
              f"{statistics.median(r['alloc_cpu_us'] for r in runs):13.0f} "
              f"{statistics.median(r['cpus_used'] for r in runs):9.2f} "
              f"{args.cpu_per_worker * n:6.2f} {sum(r['alloc_errors'] for r in runs):7.0f}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
