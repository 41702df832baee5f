"""--source-connection-quota across worker processes: each worker counts its own connections
in its column of a shared table and admits a connection against every worker's count
(relay.net.source_counts).  Here two workers' views share one bytearray, as two processes
share the parent's mapping."""
from relay.net import source_counts
from relay.net.listeners import StreamLimits
from relay.net.source_counts import SourceCounts

SECRET = b"nonce secret"


def two_workers(quota: int):
    memory = bytearray(source_counts.size(2))
    limits = [StreamLimits(per_source=quota, shared=SourceCounts(memory, w, 2, SECRET))
              for w in range(2)]
    return memory, limits


def test_the_quota_counts_every_workers_connections():
    _, (first, second) = two_workers(3)
    assert first.admit("192.0.2.1") and first.admit("192.0.2.1")
    assert second.admit("192.0.2.1")
    assert not second.admit("192.0.2.1") and not first.admit("192.0.2.1")
    assert second.admit("192.0.2.2")  # another address has its own count
    first.release("192.0.2.1")
    assert second.admit("192.0.2.1")
    assert (first.refused, second.refused) == (1, 1)


def test_a_dead_workers_connections_are_forgotten():
    memory, (first, second) = two_workers(2)
    assert first.admit("192.0.2.1") and first.admit("192.0.2.1")
    assert not second.admit("192.0.2.1")
    SourceCounts.clear(memory, 0)  # the parent, when worker 0 has died
    assert second.admit("192.0.2.1") and second.admit("192.0.2.1")


def test_one_process_counts_alone():
    limits = StreamLimits(per_source=1)
    assert limits.admit("192.0.2.1") and not limits.admit("192.0.2.1")
