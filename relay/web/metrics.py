"""Prometheus metrics, read from the relay's own counters when scraped.

The hot path counts with plain integer additions on each allocation (`relay.core.allocation`); the
core keeps running totals per allocation and request and adds an allocation's counters to them
when it closes (`relay.core.server.ServerStats`).  This collector sums those at scrape time, so
relaying a packet never touches a prometheus object, and a closed allocation's bytes stay in
the totals.  Labels are bounded sets (transport, direction, error code, region, ledger backend):
never a username or an account, whose number has no bound.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from relay.core.server import TurnServer
from relay.ledger.writer import Ledger
from relay.net.listeners import StreamLimits

TRANSPORTS = ("udp", "tcp", "tls", "dtls")
# Prometheus's classic text format, which `generate_latest` writes; every Prometheus reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RelayCollector:
    """A prometheus_client custom collector over a `TurnServer`, its `Ledger` and the stream
    listeners' `StreamLimits`."""

    def __init__(self, server: TurnServer, ledger: Ledger, stream_limits: StreamLimits,
                 region: str, dataplane: Callable[[], Dict[str, int]] = dict):
        self.server = server
        # The native data plane's counters (relay.net.dataplane.STATS), none on the Python one.
        self.dataplane = dataplane
        self.ledger = ledger
        self.stream_limits = stream_limits
        self.region = region

    def collect(self) -> Iterator[Metric]:
        region = self.region
        server, stats = self.server, self.server.stats
        server.refresh_counters()
        active = dict.fromkeys(TRANSPORTS, 0)
        # transport -> bytes, packets from the client, bytes, packets to the client
        usage: Dict[str, List[int]] = {t: list(stats.closed_usage.get(t, (0, 0, 0, 0)))
                                       for t in TRANSPORTS}
        peer_connections = 0
        for allocation in list(server.allocations.values()):
            transport = allocation.transport
            active[transport] = active.get(transport, 0) + 1
            peer_connections += len(allocation.connections)
            counts = usage.setdefault(transport, [0, 0, 0, 0])
            counts[0] += allocation.bytes_from_client
            counts[1] += allocation.packets_from_client
            counts[2] += allocation.bytes_to_client
            counts[3] += allocation.packets_to_client

        gauge = GaugeMetricFamily("turnrelay_allocations", "TURN allocations open now",
                                  labels=["transport", "region"])
        for transport, count in active.items():
            gauge.add_metric([transport, region], count)
        yield gauge
        yield GaugeMetricFamily("turnrelay_tcp_peer_connections", "Peer connections of TCP "
                                "allocations (RFC 6062) open now", peer_connections)
        for unit, first in (("bytes", 0), ("packets", 1)):
            relayed = CounterMetricFamily(
                f"turnrelay_relayed_{unit}", f"Payload {unit} relayed (ChannelData or DATA "
                "contents, as the usage ledger counts them); from_client: client to peers, "
                "to_client: peers to client", labels=["direction", "transport", "region"])
            for transport, counts in usage.items():
                relayed.add_metric(["from_client", transport, region], counts[first])
                relayed.add_metric(["to_client", transport, region], counts[first + 2])
            yield relayed
        created = CounterMetricFamily("turnrelay_allocations_created", "Allocations made",
                                      labels=["transport", "region"])
        for transport in usage:
            created.add_metric([transport, region], stats.created.get(transport, 0))
        yield created
        closed = CounterMetricFamily("turnrelay_allocations_closed", "Allocations ended, by "
                                     "reason (expired, deleted, disconnected, revoked, quota, "
                                     "shutdown)", labels=["reason", "region"])
        for reason, count in sorted(stats.closed.items()):
            closed.add_metric([reason, region], count)
        yield closed
        failed = CounterMetricFamily("turnrelay_allocations_failed", "Allocate requests "
                                     "answered with an error (the login challenge aside), by "
                                     "STUN error code",
                                     labels=["code", "region"])
        for code, count in sorted(stats.allocate_errors.items()):
            failed.add_metric([str(code), region], count)
        yield failed
        redirected = CounterMetricFamily("turnrelay_allocations_redirected", "Allocate requests "
                                         "sent to another relay (300 Try Alternate), by reason "
                                         "(draining, full: at --total-quota)",
                                         labels=["reason", "region"])
        for reason, count in sorted(stats.redirected.items()):
            redirected.add_metric([reason, region], count)
        yield redirected
        yield CounterMetricFamily("turnrelay_auth_failures", "Requests with a wrong user, "
                                  "password or realm", stats.auth_failures)
        limited_packets, limited_bytes = server.limited_totals()
        yield CounterMetricFamily("turnrelay_rate_limited_packets", "Packets dropped by "
                                  "--max-bps/--max-pps and the account limits", limited_packets)
        yield CounterMetricFamily("turnrelay_rate_limited_bytes", "Payload bytes dropped by "
                                  "--max-bps/--max-pps and the account limits", limited_bytes)
        yield GaugeMetricFamily("turnrelay_draining", "1 while draining for a shutdown: new "
                                "allocations are redirected or refused", int(server.draining))
        yield from self._ledger_metrics(self.ledger)
        yield from self._stream_metrics(self.stream_limits)
        native = self.dataplane()
        if native:
            datagrams = CounterMetricFamily(
                "turnrelay_dataplane_datagrams", "UDP datagrams through the native data plane: "
                "received, forwarded, queued (handed to Python), queue_dropped (the queue was "
                "full), dropped (no allocation, channel or permission), send_errors; "
                "gso_sends counts groups sent as one UDP GSO superpacket, gso_refused those the "
                "kernel refused (sent again one by one)",
                labels=["what"])
            for what, count in native.items():
                datagrams.add_metric([what], count)
            yield datagrams

    @staticmethod
    def _ledger_metrics(ledger: Ledger) -> Iterator[Metric]:
        depth = GaugeMetricFamily("turnrelay_ledger_queue_depth", "Usage records waiting to "
                                  "be written, per backend", labels=["backend"])
        errors = CounterMetricFamily("turnrelay_ledger_write_errors", "Failed usage writes "
                                     "(each retried), per backend", labels=["backend"])
        failing = GaugeMetricFamily("turnrelay_ledger_backend_failing", "1 while a backend's "
                                    "last write failed", labels=["backend"])
        for queue in ledger.queues:
            depth.add_metric([queue.name], len(queue.pending))
            errors.add_metric([queue.name], queue.write_errors)
            failing.add_metric([queue.name], int(queue.failures > 0))
        yield depth
        yield errors
        yield failing
        yield CounterMetricFamily("turnrelay_ledger_unrecorded_sessions", "Sessions relayed "
                                  "without usage records while the queue was full "
                                  "(--accounting-full drop)", ledger.unrecorded)

    @staticmethod
    def _stream_metrics(limits: StreamLimits) -> Iterator[Metric]:
        """The TCP/TLS connection limits (`relay.net.listeners.StreamLimits`)."""
        yield GaugeMetricFamily("turnrelay_stream_connections", "TCP and TLS client connections "
                                "open now", sum(limits.open.values()))
        yield CounterMetricFamily("turnrelay_stream_connections_refused", "Connections reset "
                                  "at once: their address had --source-connection-quota open",
                                  limits.refused)
        yield CounterMetricFamily("turnrelay_stream_connections_timed_out", "Connections closed "
                                  "without an allocation by --tls-handshake-timeout or "
                                  "--connection-idle-timeout", limits.timed_out)
        handed = CounterMetricFamily("turnrelay_stream_connections_handed_over", "Connections "
                                     "whose ConnectionBind named another worker process's "
                                     "CONNECTION-ID: out, handed to it; in, taken from one",
                                     labels=["direction"])
        handed.add_metric(["out"], limits.handed_out)
        handed.add_metric(["in"], limits.handed_in)
        yield handed


def registry(collector: RelayCollector) -> CollectorRegistry:
    """The relay's own registry: its collector and the process's (memory, descriptors, CPU)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry
