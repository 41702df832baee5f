"""PooledSystemRandom: the kernel's random bytes, drawn in blocks, never shared with a child."""
import os

import pytest

from relay.util.secure_random import PooledSystemRandom


def test_numbers_stay_in_range_and_vary():
    rng = PooledSystemRandom()
    ports = [rng.randint(49152, 49160) for _ in range(2000)]
    assert set(ports) == set(range(49152, 49161))
    assert all(0 <= rng.getrandbits(k) < 2 ** k for k in (1, 7, 8, 53, 64, 128) for _ in range(50))
    assert all(0.0 <= rng.random() < 1.0 for _ in range(1000))
    assert len({rng.getrandbits(128) for _ in range(1000)}) == 1000


def test_it_reads_urandom_in_blocks(monkeypatch):
    reads = []
    real = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: reads.append(n) or real(n))
    rng = PooledSystemRandom()
    for _ in range(100):
        rng.getrandbits(128)
    assert reads == [PooledSystemRandom.BLOCK]


def test_it_cannot_be_seeded_into_predictability():
    a, b = PooledSystemRandom(), PooledSystemRandom()
    a.seed(1)
    b.seed(1)
    assert a.getrandbits(128) != b.getrandbits(128)
    with pytest.raises(NotImplementedError):
        a.getstate()


def test_a_forked_child_does_not_reuse_the_parents_bytes():
    rng = PooledSystemRandom()
    rng.getrandbits(8)  # a block is drawn
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, rng.getrandbits(128).to_bytes(16, "big"))
        os._exit(0)
    os.close(write)
    child = int.from_bytes(os.read(read, 16), "big")
    os.close(read)
    os.waitpid(pid, 0)
    assert child != rng.getrandbits(128)
