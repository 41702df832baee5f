"""What the host gives this process: the CPUs it may use (the default number of `--workers`),
its outbound and local addresses (the default relay addresses), and its open-file limit."""
from __future__ import annotations

import ipaddress
import math
import os
import resource
import socket
from typing import Iterator, List, Optional


def usable_cpus(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int:
    """The CPUs in this process's affinity mask, lowered to its cgroups' CPU quota.

    A container limited to 2 CPUs on a 64-core node still sees 64 cores in its affinity mask;
    64 workers would share 2 CPUs' worth of time slices and lose to 2.  The quota is the
    strictest of the process's cgroup and its ancestors (cgroup v2's `cpu.max`, "QUOTA PERIOD"
    or "max PERIOD"; v1's `cpu.cfs_quota_us` over `cpu.cfs_period_us`, -1 for none).  A
    fractional quota rounds up: one worker can use less than a CPU, not less than one.
    """
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every CPU counts
    cpus = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    quotas = [q for q in _quotas(proc_cgroup, root) if q is not None]
    return max(1, min([cpus] + [math.ceil(q) for q in quotas]))


def _quotas(proc_cgroup: str, root: str) -> Iterator[Optional[float]]:
    """The CPU quota (in CPUs) of each cgroup holding this process, from itself up."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: one hierarchy
            base, read = root, _v2_quota
        elif "cpu" in controllers.split(","):
            base, read = os.path.join(root, controllers), _v1_quota
        else:
            continue
        # Inside a cgroup namespace the path is "/" and the root is its own cgroup.
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            yield read(os.path.join(base, *parts[:depth]))


def _v2_quota(directory: str) -> Optional[float]:
    text = _read(os.path.join(directory, "cpu.max"))
    if text is None:
        return None
    try:
        quota, period = text.split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except ValueError:  # not the format we know: no quota we can honour
        return None


def _v1_quota(directory: str) -> Optional[float]:
    quota = _read(os.path.join(directory, "cpu.cfs_quota_us"))
    period = _read(os.path.join(directory, "cpu.cfs_period_us"))
    try:
        return int(quota) / int(period) if quota and period and int(quota) > 0 else None
    except ValueError:
        return None


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def outbound_ip(family: int) -> Optional[str]:
    """This host's source address toward the internet; connecting a UDP socket sends nothing."""
    probe = ("192.0.2.1", 9) if family == socket.AF_INET else ("2001:db8::1", 9)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(probe)
            return s.getsockname()[0]
    except OSError:
        return None


def local_addresses(fib_trie: str = "/proc/net/fib_trie",
                    if_inet6: str = "/proc/net/if_inet6") -> List[str]:
    """Every address of this host's interfaces (Linux's /proc; elsewhere none): a wildcard
    listener answers on each, so none of them with a listener's port may be a peer."""
    found: List[str] = []
    try:
        with open(fib_trie) as f:
            last = None
            for line in f:
                if "|--" in line:
                    last = line.split("|--")[1].strip()
                elif line.strip() == "/32 host LOCAL" and last and last not in found:
                    found.append(last)
    except OSError:
        pass
    try:
        with open(if_inet6) as f:
            for line in f:
                digits = line.split()[0]
                found.append(str(ipaddress.IPv6Address(int(digits, 16))))
    except (OSError, ValueError, IndexError):
        pass
    return found


def raise_file_limit() -> int:
    """Each relay socket is a descriptor: take the hard limit, as far as we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
