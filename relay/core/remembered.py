"""The answers a TURN server remembers so that a retransmitted request gets the same one
(RFC 8489 section 6.3.1): only answers to authenticated requests (`TurnServer.answer`)."""
from __future__ import annotations

from typing import Dict, Hashable, Optional, Tuple

from relay.core.allocation import Address

AnswerKey = Tuple[Hashable, Address, bytes]  # (listener, client address, transaction id)


class RememberedAnswers:
    """Each answer kept from `lifetime` to twice that seconds, fewer than `size` at once.

    Two generations of dicts: the newer takes every answer; once it is `lifetime` seconds old
    (`expire`, or the next answer) or holds half of `size`, the older is forgotten whole and the
    newer becomes it.  So no answer needs an expiry record of its own (a tuple and a float each
    in a queue, which at 14,000 answers a second held 100,000), and the older dict is not written
    to: on PyPy, whose collector marks the heap a step at a time, one big dict written at every
    answer stretched some of its marking steps to 40-50 ms (docs/performance.md).  Under a
    flood of answers the bound keeps the last `size / 2` to `size` of them.
    """

    def __init__(self, lifetime: float, size: int):
        self.lifetime = lifetime
        self.half = size // 2
        self.newer: Dict[AnswerKey, bytes] = {}
        self.older: Dict[AnswerKey, bytes] = {}
        self.since = float("-inf")  # when `newer` began

    def get(self, key: AnswerKey) -> Optional[bytes]:
        found = self.newer.get(key)
        return self.older.get(key) if found is None else found

    def put(self, key: AnswerKey, wire: bytes, now: float) -> None:
        if len(self.newer) >= self.half or now - self.since >= self.lifetime:
            self._turn(now)
        self.newer[key] = wire

    def expire(self, now: float) -> None:
        """Forget the older answers if the newer have been taken for `lifetime` seconds."""
        if now - self.since >= self.lifetime:
            self._turn(now)

    def _turn(self, now: float) -> None:
        """The newer answers become the older, and the older are forgotten; the newer too if
        they are all `lifetime` old (no answer or tick for a while: each turns the newer by
        then)."""
        self.older = self.newer if now - self.since < 2 * self.lifetime else {}
        self.newer, self.since = {}, now

    def __len__(self) -> int:
        return len(self.newer) + len(self.older)
