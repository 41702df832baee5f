"""A cryptographically strong `random.Random` that reads the kernel's generator in blocks.

`random.SystemRandom` makes one getrandom system call per number; the relay draws several
for every allocation (its relay port, its session id, tokens), so this one takes 4 KiB of
`os.urandom` at a time and serves numbers from it: the same source, one call per few hundred
numbers.  A child process must not share its parent's unread bytes, so the block is dropped
in the child after a fork.
"""
from __future__ import annotations

import os
import random
import weakref
from typing import Any, NoReturn

_instances: "weakref.WeakSet[PooledSystemRandom]" = weakref.WeakSet()


class PooledSystemRandom(random.Random):
    BLOCK = 4096

    def __init__(self) -> None:
        self._block = b""
        self._offset = 0
        super().__init__()
        _instances.add(self)

    def seed(self, *args: Any, **kwargs: Any) -> None:
        """Not seedable, like `random.SystemRandom`: the kernel's generator is the seed."""

    def _bytes(self, count: int) -> bytes:
        offset = self._offset
        if offset + count > len(self._block):
            self._block, offset = os.urandom(max(self.BLOCK, count)), 0
        self._offset = offset + count
        return self._block[offset:offset + count]

    def getrandbits(self, k: int) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        size = (k + 7) // 8
        return int.from_bytes(self._bytes(size), "big") >> (size * 8 - k)

    def _randbelow(self, n: int) -> int:
        """What randint and randrange draw: `getrandbits` inlined, rejection as Random's."""
        k = n.bit_length()
        size = (k + 7) // 8
        shift = size * 8 - k
        while True:
            r = int.from_bytes(self._bytes(size), "big") >> shift
            if r < n:
                return r

    def random(self) -> float:
        return self.getrandbits(53) * 2.0 ** -53

    def randbytes(self, n: int) -> bytes:
        return self._bytes(n)

    def getstate(self) -> NoReturn:
        raise NotImplementedError("a PooledSystemRandom has no state to save")

    def setstate(self, state: Any) -> NoReturn:
        raise NotImplementedError("a PooledSystemRandom has no state to restore")

    def _forget(self) -> None:
        self._block, self._offset = b"", 0


def _after_fork() -> None:
    for instance in list(_instances):
        instance._forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
