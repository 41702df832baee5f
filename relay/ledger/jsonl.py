"""The `jsonl` usage backend: append-only JSON lines, one record per line (`relay.ledger.records.as_dict`).

Each batch is appended and fsync'd in a thread, never in the reactor.  A batch is all or
nothing: when a write or the fsync fails, the file is cut back to where the batch began, so the
ledger's retry appends it once.  That cut is why one file belongs to one relay.  A reader should
still keep one line per (session_id, seq) and skip a torn last line: a crash (or a full disk)
mid-batch can leave either.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from twisted.internet import defer, threads
from zope.interface import implementer

from relay.ledger.records import IUsageBackend, Record, as_dict
from relay.util.argstring import single_argument


@implementer(IUsageBackend)
class JsonLinesBackend:
    """IUsageBackend on one file, opened at start-up so a bad path stops the relay at once."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, records: Sequence[Record]) -> defer.Deferred[None]:
        lines = b"".join(json.dumps(as_dict(r), separators=(",", ":")).encode() + b"\n"
                         for r in records)
        return threads.deferToThread(self._append, lines)

    def _append(self, data: bytes) -> None:
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, start)
            raise

    def close(self) -> defer.Deferred[None]:
        os.close(self._fd)
        return defer.succeed(None)


def jsonl_backend(argstring: str) -> JsonLinesBackend:
    """`--accounting jsonl:path=PATH`."""
    try:
        return JsonLinesBackend(single_argument(argstring, "path"))
    except OSError as err:
        raise ValueError(f"path: cannot open it: {err.strerror}") from None
