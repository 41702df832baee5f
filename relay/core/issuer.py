"""Identifiers that say which worker process issued them (`--workers`).

A CONNECTION-ID (RFC 6062) or a RESERVATION-TOKEN (RFC 8656) names state one worker holds,
but the request that names it may reach any worker: a new connection or a new client port is
spread over them by the kernel.  So each worker issues only the random values equal to its
index modulo the worker count, and any worker can tell whose a value is without asking.
"""
from __future__ import annotations

import random


def issue(rng: random.Random, bits: int, index: int, count: int) -> int:
    """A random `bits`-bit value that `issuer` attributes to worker `index` of `count`."""
    return rng.randrange(2 ** bits // count) * count + index


def issuer(value: int, count: int) -> int:
    """The worker that issued `value`."""
    return value % count
