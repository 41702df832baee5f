"""Time as the APIs and the ledger write it."""
from __future__ import annotations

import functools
from datetime import datetime, timezone


@functools.lru_cache(maxsize=4)
def rfc3339(unix: int) -> str:
    """`2026-11-23T12:00:00Z`: the UTC timestamp form of Twilio's and most JSON APIs.  Kept
    for the last few seconds: the ledger stamps each session's start and end, hundreds a second
    under load, and datetime's strftime is slow on PyPy."""
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
