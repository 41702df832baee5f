"""How many CPUs this process may really use: the default number of `--workers`."""
from __future__ import annotations

import math
import os


def usable_cpus(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The CPUs in this process's affinity mask, lowered to its cgroup's CPU quota.

    A container limited to 2 CPUs on a 64-core node still sees 64 cores in its affinity mask;
    64 workers would share 2 CPUs' worth of time slices and lose to 2.  cgroup v2's
    `cpu.max` holds "QUOTA PERIOD" (or "max PERIOD" for no limit); a fractional limit rounds
    up, since one worker can use less than a whole CPU but not less than one.
    """
    cpus = len(os.sched_getaffinity(0))
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 here, or a file we do not understand: the affinity mask stands
    return cpus
