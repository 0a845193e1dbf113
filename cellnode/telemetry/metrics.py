"""Prometheus metrics: the reference platform's node metrics, plus what the runtime knows about its instances.

Request metrics are counted on the execute path, per node that exists (an unknown node ID never becomes a label).
Instance gauges are read from the routing table when `/metrics` is scraped, so the hot path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cellnode.router.table import RoutingTable

# Milliseconds, as the reference's node_request_durations.
DURATION_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """One registry per server (tests run several), with the execute path's counters."""

    def __init__(self, table: RoutingTable) -> None:
        self.registry = CollectorRegistry()
        labels = ["node_id", "node_path"]
        self.requests = Counter("node_requests", "Execute requests per node.", labels, registry=self.registry)
        self.http_codes = Counter(
            "node_http_codes",
            "Execute responses per node and HTTP status code.",
            [*labels, "code"],
            registry=self.registry,
        )
        self.durations = Histogram(
            "node_request_durations",
            "Execute request durations per node, in milliseconds.",
            labels,
            buckets=DURATION_BUCKETS_MS,
            registry=self.registry,
        )
        self.registry.register(_InstanceCollector(table))

    def observe(self, node_id: str, node_path: str, code: int, milliseconds: float) -> None:
        """Count one execute request of a known node."""
        self.requests.labels(node_id, node_path).inc()
        self.http_codes.labels(node_id, node_path, str(code)).inc()
        self.durations.labels(node_id, node_path).observe(milliseconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _InstanceCollector(Collector):
    """Gauges read at scrape time: instances, queue, in-flight requests, memory."""

    def __init__(self, table: RoutingTable) -> None:
        self._table = table

    def collect(self) -> Iterator[Metric]:
        alive = GaugeMetricFamily(
            "cellnode_instances_ready", "Instances taking requests, per node.", labels=["node_id"]
        )
        in_flight = GaugeMetricFamily(
            "cellnode_requests_in_flight", "Requests running or waiting, per node.", labels=["node_id"]
        )
        queued = GaugeMetricFamily(
            "cellnode_queue_depth", "Requests waiting for a busy instance, per node.", labels=["node_id"]
        )
        healthy = GaugeMetricFamily(
            "cellnode_node_healthy", "1 when the node's status is HEALTHY, else 0.", labels=["node_id", "status"]
        )
        memory = GaugeMetricFamily(
            "cellnode_instance_memory_bytes",
            "Proportional set size (PSS) of each instance process: shared pages are split among their users.",
            labels=["node_id", "instance_id"],
        )
        for route in self._table.routes():
            live = [instance for instance in route.instances if instance.is_alive]
            outstanding = sum(instance.outstanding for instance in live)
            alive.add_metric([route.node_id], len(live))
            in_flight.add_metric([route.node_id], outstanding)
            queued.add_metric([route.node_id], max(0, outstanding - len(live)))
            healthy.add_metric([route.node_id, route.status], 1 if route.status == "HEALTHY" else 0)
            for instance in live:
                pss = _pss_bytes(instance.handle.pid)
                if pss is not None:
                    memory.add_metric([route.node_id, instance.instance_id], pss)
        yield from (alive, in_flight, queued, healthy, memory)


def _pss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
