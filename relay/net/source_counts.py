"""TCP/TLS connections per client address, counted across the worker processes of one relay.

`--source-connection-quota` bounds one address's open connections for the relay, but the
kernel spreads an address's connections over the workers, each of which would otherwise
count only its own (and allow N times the quota).  So the workers share a table in memory the
parent maps into each (as it does `relay.core.peers.LiveRelays`): one column of counters per
worker, which only that worker writes, so no two processes ever write one cell; a worker
reads the others' columns when it admits a connection.  The parent zeroes a dead worker's
column.

An address's row is a keyed hash of it (the key from the nonce secrets every worker has), so
two addresses may share a row: they then share a quota, which a client cannot aim for.
"""
from __future__ import annotations

import hashlib
from typing import Any

SLOTS = 65536
CELL = 2  # bytes: an unsigned 16-bit count


def size(workers: int) -> int:
    """Bytes of the table for `workers` workers."""
    return SLOTS * CELL * workers


class SourceCounts:
    """Worker `worker`'s view of the table in `memory` (`size(workers)` bytes)."""

    def __init__(self, memory: Any, worker: int, workers: int, secret: bytes):
        self.cells = memoryview(memory).cast("H")
        self.worker, self.workers = worker, workers
        self.key = hashlib.sha256(b"turnrelay source counts\0" + secret).digest()

    def _row(self, host: str) -> int:
        digest = hashlib.blake2b(host.encode(), key=self.key, digest_size=4).digest()
        return int.from_bytes(digest, "big") % SLOTS

    def others(self, host: str) -> int:
        """Connections from `host` the other workers hold."""
        row, cells = self._row(host), self.cells
        return sum(cells[w * SLOTS + row] for w in range(self.workers) if w != self.worker)

    def add(self, host: str, change: int) -> None:
        """This worker holds `change` (1 or -1) more connections from `host`."""
        cell = self.worker * SLOTS + self._row(host)
        self.cells[cell] = max(0, min(0xFFFF, self.cells[cell] + change))

    @staticmethod
    def clear(memory: Any, worker: int) -> None:
        """Forget worker `worker`'s connections (its process died)."""
        start = worker * SLOTS * CELL
        memory[start:start + SLOTS * CELL] = bytes(SLOTS * CELL)
