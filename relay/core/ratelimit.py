"""Per-source token buckets, bounded in memory: failed logins cost tokens, time refills them."""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Tuple


class RateLimiter:
    def __init__(self, rate: float, burst: float, max_sources: int = 65536):
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: "OrderedDict[Hashable, Tuple[float, float]]" = OrderedDict()

    def allow(self, source: Hashable, now: float) -> bool:
        """Take one token for `source`; False when its bucket is empty."""
        tokens, last = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1
        self._buckets[source] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)  # the least recently seen source
        return allowed

    def refund(self, source: Hashable) -> None:
        """Give back the token `allow` took, for a caller that must pay before it can know
        whether the attempt fails (the tokens API hashes an API key only once paid): taking
        first means concurrent attempts cannot all pass before the first failure counts, and
        refunding successes means only failures are charged."""
        if source in self._buckets:
            tokens, last = self._buckets[source]
            self._buckets[source] = (min(self.burst, tokens + 1), last)
