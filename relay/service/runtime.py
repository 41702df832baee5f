"""What PyPy's collector should be told, and who can tell it.

PyPy reads its collector's settings from the environment once, as it starts, so only a
process about to start can be given them: the parent gives them to each worker process
(relay.service.workers), and a single process can only say in its start banner how to start
it with them (relay.service.banner).  CPython ignores them.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

# PyPy sizes its nursery by the L2 cache, 1 MB on the project machine: under steady Allocates it
# then made 3,000 minor collections a second, which with the marking steps of the major ones
# took a fifth of a worker's time.  A 16 MB nursery, with marking steps held at 2 MB (by default
# twice the nursery, so each step would grow with it), made 1.2x the cycles a second, and
# Binding answers' p99 fell from 13-15 to 5-6 ms (docs/performance.md).
PYPY_GC = {"PYPY_GC_NURSERY": "16MB", "PYPY_GC_INCREMENT_STEP": "2MB"}


def collector_hint(workers: int) -> Optional[str]:
    """The banner's line for a single process on PyPy started without any of `PYPY_GC`'s
    settings (the operator's own choice otherwise); None anywhere else."""
    if platform.python_implementation() != "PyPy" or workers > 1 \
            or any(name in os.environ for name in PYPY_GC):
        return None
    settings = " ".join(f"{name}={value}" for name, value in PYPY_GC.items())
    return (f"PyPy collector: its own nursery, sized by the L2 cache; a single process under load "
            f"runs faster started with {settings} (docs/configuration.md)")
