"""Prometheus metrics: the reference platform's node metrics, plus what the runtime knows about its instances.

Request metrics are counted on the execute path, per node that exists (an unknown node ID never becomes a label).
The supervisor counts restarts, instance starts, checkpoint loads and usage units. Instance gauges are read from the
routing table and the supervisor's view when `/metrics` is scraped, so the hot path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cellnode.router.table import RoutingTable

# Milliseconds, as the reference's node_request_durations.
DURATION_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
START_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# node_id -> {status: instances}, and node_id -> (wanted, min, max): the supervisor's view, read at scrape time.
InstanceView = Callable[[], tuple[dict[str, dict[str, int]], dict[str, tuple[int, int, int]]]]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """One registry per server (tests run several), with the execute path's counters."""

    def __init__(self, table: RoutingTable) -> None:
        self.registry = CollectorRegistry()
        self.view: InstanceView = lambda: ({}, {})
        labels = ["node_id", "node_path"]
        self.requests = Counter("node_requests", "Execute requests per node.", labels, registry=self.registry)
        self.http_codes = Counter(
            "node_http_codes",
            "Execute responses per node and HTTP status code.",
            [*labels, "code"],
            registry=self.registry,
        )
        self.grpc_codes = Counter(
            "node_grpc_codes",
            "Execute responses over gRPC per node and status code name (node_path is the gRPC method).",
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
        self.restarts = Counter(
            "cellnode_instance_restarts",
            "Instances replaced after a crash, a hang, a timeout kill or a memory cap, per node.",
            ["node_id", "reason"],
            registry=self.registry,
        )
        self.instance_starts = Histogram(
            "cellnode_instance_start_seconds",
            "Seconds from asking the backend for an instance to its first answer, per node.",
            ["node_id"],
            buckets=START_BUCKETS_S,
            registry=self.registry,
        )
        self.checkpoint_loads = Histogram(
            "cellnode_checkpoint_load_seconds",
            "Seconds a node's checkpoint took to load (once per zygote, or per standalone instance).",
            ["node_id"],
            buckets=START_BUCKETS_S,
            registry=self.registry,
        )
        self.usage_units = Counter(
            "cellnode_usage_units",
            "Usage units accrued by running instances (uptime x the spec's units per second), per node and spec.",
            ["node_id", "spec"],
            registry=self.registry,
        )
        self.scaling = Counter(
            "cellnode_autoscale_changes",
            "Changes of a node's instance count by the autoscaler, per direction.",
            ["node_id", "direction"],
            registry=self.registry,
        )
        alias_labels = ["alias_name", "node_id"]
        self.alias_requests = Counter(
            "alias_requests", "Requests to an alias, per node that took them.", alias_labels, registry=self.registry
        )
        self.alias_http_codes = Counter(
            "alias_http_codes",
            "Responses of an alias per node that answered and HTTP status code (node_id is empty when none did).",
            [*alias_labels, "code"],
            registry=self.registry,
        )
        self.alias_grpc_codes = Counter(
            "alias_grpc_codes",
            "gRPC responses of an alias per node that answered and status code name (node_id is empty when none did).",
            [*alias_labels, "code"],
            registry=self.registry,
        )
        self.alias_durations = Histogram(
            "alias_request_durations",
            "Request durations of an alias per node that answered, in milliseconds.",
            alias_labels,
            buckets=DURATION_BUCKETS_MS,
            registry=self.registry,
        )
        self.mirror_results = Counter(
            "alias_mirror_requests",
            "Requests copied to an alias's shadow node, by result: agree, differ, or error (no answer from the cell).",
            [*alias_labels, "result"],
            registry=self.registry,
        )
        self.mirror_durations = Histogram(
            "alias_mirror_durations",
            "Durations of mirrored requests in milliseconds, on the primary and on the shadow node (role).",
            [*alias_labels, "role"],
            buckets=DURATION_BUCKETS_MS,
            registry=self.registry,
        )
        self.rollbacks = Counter(
            "alias_rollbacks",
            "Nodes taken out of an alias because their error rate passed the alias's limit.",
            alias_labels,
            registry=self.registry,
        )
        self.registry.register(_InstanceCollector(table, lambda: self.view()))

    def observe(
        self, node_id: str, node_path: str, code: int | str, milliseconds: float, *, grpc: bool = False
    ) -> None:
        """Count one execute request of a known node: `code` is the HTTP status, or the gRPC code's name."""
        self.requests.labels(node_id, node_path).inc()
        (self.grpc_codes if grpc else self.http_codes).labels(node_id, node_path, str(code)).inc()
        self.durations.labels(node_id, node_path).observe(milliseconds)

    def observe_alias(
        self, alias_name: str, node_id: str, code: int | str, milliseconds: float, *, grpc: bool = False
    ) -> None:
        """Count one request to an alias; `node_id` is the node that answered, or empty."""
        self.alias_requests.labels(alias_name, node_id).inc()
        (self.alias_grpc_codes if grpc else self.alias_http_codes).labels(alias_name, node_id, str(code)).inc()
        self.alias_durations.labels(alias_name, node_id).observe(milliseconds)

    def forget_alias(self, alias_name: str) -> None:
        """Drop a deleted alias's series: whoever creates an alias of the same name must not see its traffic."""
        for metric in (
            self.alias_requests,
            self.alias_http_codes,
            self.alias_grpc_codes,
            self.alias_durations,
            self.mirror_results,
            self.mirror_durations,
            self.rollbacks,
        ):
            # prometheus_client offers remove() by label values but no listing; its children dict is the listing.
            for labels in [key for key in list(metric._metrics) if key[0] == alias_name]:
                metric.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _InstanceCollector(Collector):
    """Gauges read at scrape time: instances, queue, in-flight requests, memory."""

    def __init__(self, table: RoutingTable, view: InstanceView) -> None:
        self._table = table
        self._view = view

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
                pss = _pss_bytes(instance.pid)
                if pss is not None:
                    memory.add_metric([route.node_id, instance.instance_id], pss)
        by_status = GaugeMetricFamily(
            "cellnode_instances", "Instances per node and status.", labels=["node_id", "status"]
        )
        wanted = GaugeMetricFamily(
            "cellnode_instances_wanted",
            "Instances a node should run now, and its range.",
            labels=["node_id", "bound"],
        )
        statuses, counts = self._view()
        for node_id, per_status in statuses.items():
            for status, number in per_status.items():
                by_status.add_metric([node_id, status], number)
        for node_id, (count, low, high) in counts.items():
            wanted.add_metric([node_id, "current"], count)
            wanted.add_metric([node_id, "min"], low)
            wanted.add_metric([node_id, "max"], high)
        weights = GaugeMetricFamily(
            "alias_node_percent",
            "Each node's configured percentage of an alias's requests (role primary), or of copies (role mirror).",
            labels=["alias_name", "node_id", "role"],
        )
        for alias in self._table.aliases():
            for role, shares in (("primary", alias.shares), ("mirror", alias.mirrors)):
                for share in shares:
                    weights.add_metric([alias.name, share.node_id, role], share.percent)
        yield from (alive, in_flight, queued, healthy, memory, by_status, wanted, weights)


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
