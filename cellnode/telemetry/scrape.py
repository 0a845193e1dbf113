"""Instances' own Prometheus metrics, scraped over loopback HTTP and re-exposed on cellnode's `/metrics`.

Every `interval` the `Scraper` fetches each instance's metrics page (Prometheus text) at once, each fetch bounded by
`timeout`, `max_bytes` and `max_series`, and adds the labels `node_id` and `instance_id` to every sample. A sample's
own `node_id`, `instance_id` or `alias_name` is kept as `exported_node_id` and so on, as Prometheus does.

The exposition stays valid whatever instances serve: a family name that several instances use comes out once, with
all their samples. A family is left out, logged once and counted in `cellnode_telemetry_dropped_families`, when its
name is one of cellnode's own (the server registry's, or any `cellnode_*`), or clashes with a family an earlier
instance exposes under another type. A failed scrape drops the instance's samples until a scrape succeeds again (as
Prometheus marks such series stale); `cellnode_telemetry_up` says 0 and `cellnode_telemetry_scrapes_total` counts
the result (ok, error, timeout, too_large, bad_format).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import escape_label_name, escape_metric_name
from prometheus_client.parser import text_fd_to_metric_families

from cellnode.config import is_loopback

logger = logging.getLogger("cellnode.telemetry")

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_SERIES = 10_000
RESULTS = ("ok", "error", "timeout", "too_large", "bad_format")
TARGET_LABELS = ("node_id", "instance_id")
# A sample's own labels of these names are renamed `exported_<name>`: we set the first two, and `/metrics` decides by
# them (and by `alias_name`) who may read a sample, so an instance must not choose them.
EXPORTED_LABELS = (*TARGET_LABELS, "alias_name")
RESERVED_PREFIX = "cellnode_"
# The types of the Prometheus text format; the parser also takes OpenMetrics ones, which Prometheus would refuse.
TEXT_TYPES = ("counter", "gauge", "summary", "histogram", "unknown")
# Series names a family of each type is exposed under, besides its own name and its samples' names.
SUFFIXES = {"counter": ("_total",), "summary": ("_sum", "_count"), "histogram": ("_bucket", "_sum", "_count")}
HEADERS = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "identity"}
NOT_LOOPBACK = (
    "Telemetry URL {url!r} is not an HTTP URL on a loopback address; cellnode scrapes only 127.0.0.0/8 and ::1 (for "
    "example 'http://127.0.0.1:9875/metrics')."
)
TURNED_BAD = (
    "Metrics of instance %r (node %r) at %s are unavailable (%s): %s; its samples are left out until it recovers."
)


class _ScrapeFailed(Exception):
    """One scrape's failure, by result; it never leaves this module."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


@dataclass
class _Target:
    node_id: str
    instance_id: str
    url: str
    families: list[Metric] = field(default_factory=list)  # the last scrape's, when it succeeded
    is_up: bool | None = None  # None until the first scrape
    scrapes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    seconds: float = 0.0
    dropped: dict[str, str] = field(default_factory=dict)  # family name -> why it is left out


class Scraper:
    """Scrapes instances' metrics pages and exposes their samples on `registry` (cellnode's server registry).

    Parameters:
        registry: The server's registry; the scraper registers itself there, and never exposes a family whose name
            one of the registry's other collectors uses.
        interval: Seconds between the starts of two scrape rounds.
        timeout: Seconds one scrape (connect, answer, whole body) may take.
        max_bytes: Largest body taken; a larger one fails the scrape as too_large.
        max_series: Most samples taken from one instance; more fail the scrape as too_large.

    Example:
        scraper = Scraper(metrics.registry, interval=15.0)
        await scraper.start()
        scraper.add("node-1", "instance-1", "http://127.0.0.1:9875/metrics")
        await scraper.scrape_once("instance-1")  # at once, rather than at the next round
        scraper.remove("instance-1")
        await scraper.aclose()
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        interval: float = 15.0,
        timeout: float = 5.0,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        assert interval > 0 and timeout > 0 and max_bytes > 0 and max_series > 0, "limits must be positive"
        self.interval = interval
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_series = max_series
        self._registry = registry
        self._targets: dict[str, _Target] = {}
        self._reserved: set[str] = set()
        self._snapshot: list[Metric] = []  # replaced whole, so a `/metrics` thread reads it without a lock
        self._local = threading.local()
        self._task: asyncio.Task[None] | None = None
        # Keep-alive outlives the interval, so each instance keeps one connection across rounds.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=2 * interval)
        self._client = httpx.AsyncClient(trust_env=False, timeout=timeout, limits=limits)
        registry.register(self)
        self._is_registered = True

    def add(self, node_id: str, instance_id: str, url: str) -> None:
        """Scrape `url` from the next round on; adding an instance again with another node or URL starts it afresh."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ValueError(NOT_LOOPBACK.format(url=url)) from exc
        if parsed.scheme not in ("http", "https") or not is_loopback(parsed.host):
            raise ValueError(NOT_LOOPBACK.format(url=url))
        known = self._targets.get(instance_id)
        if known is None or (known.node_id, known.url) != (node_id, url):
            self._targets[instance_id] = _Target(node_id, instance_id, url)
            if known is not None:
                self._rebuild()  # the old target's samples go; a new one shows nothing until it is scraped

    def remove(self, instance_id: str) -> None:
        """Forget an instance: its samples and its `cellnode_telemetry_*` series go (an unknown ID is ignored)."""
        if self._targets.pop(instance_id, None) is not None:
            self._rebuild()

    async def start(self) -> None:
        """Scrape all instances now and then every `interval` seconds, in a background task."""
        assert self._task is None, "the scraper is already started"
        self._task = asyncio.create_task(self._run(), name="cellnode-telemetry-scraper")

    async def aclose(self) -> None:
        """Stop scraping, close the connections and leave the registry; safe to call twice."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.aclose()
        if self._is_registered:
            self._registry.unregister(self)
            self._is_registered = False

    async def scrape_once(self, instance_id: str | None = None) -> None:
        """Scrape every instance (or only `instance_id`, when it is known) now and update the exposition."""
        if instance_id is None:
            targets = list(self._targets.values())
        else:
            targets = [self._targets[instance_id]] if instance_id in self._targets else []
        self._reserved = await asyncio.to_thread(self._reserved_names)
        await asyncio.gather(*(self._scrape(target) for target in targets))
        self._rebuild()

    def collect(self) -> Iterator[Metric]:
        """The merged families and the scrape status, as of the last scrape (prometheus_client's Collector)."""
        if not getattr(self._local, "is_reading_registry", False):
            yield from self._snapshot

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.scrape_once()
            except Exception:
                # A bug here must not end scraping for the server's lifetime; it is logged and the next round runs.
                logger.exception("A round of instance metrics scrapes failed.")
            await asyncio.sleep(max(0.0, started + self.interval - time.monotonic()))

    def _reserved_names(self) -> set[str]:
        """Series names the registry's other collectors expose (ours hides itself while we read)."""
        self._local.is_reading_registry = True
        try:
            return {name for family in self._registry.collect() for name in _series_names(family, created=True)}
        finally:
            self._local.is_reading_registry = False

    async def _scrape(self, target: _Target) -> None:
        started = time.monotonic()
        try:
            body = await self._fetch(target.url)
            families = await asyncio.to_thread(_parse, body, target.node_id, target.instance_id, self.max_series)
        except _ScrapeFailed as failure:
            result, reason, families = failure.result, failure.reason, []
        else:
            result, reason = "ok", ""
        if self._targets.get(target.instance_id) is not target:
            return  # removed or replaced while we scraped
        target.seconds = time.monotonic() - started
        target.scrapes[result] += 1
        target.families = families
        if result != "ok" and target.is_up is not False:
            logger.warning(TURNED_BAD, target.instance_id, target.node_id, target.url, result, reason)
        elif result == "ok" and target.is_up is False:
            logger.info("Metrics of instance %r (node %r) are available again.", target.instance_id, target.node_id)
        target.is_up = result == "ok"

    async def _fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout), self._client.stream("GET", url, headers=HEADERS) as response:
                if response.status_code != 200:
                    raise _ScrapeFailed("error", f"HTTP {response.status_code} {response.reason_phrase}")
                encoding = response.headers.get("content-encoding", "identity").lower()
                if encoding != "identity":
                    raise _ScrapeFailed("bad_format", f"the body is encoded as {encoding!r}; serve plain text")
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise _ScrapeFailed("too_large", f"the body is over the limit of {self.max_bytes} bytes")
                return bytes(body)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise _ScrapeFailed("timeout", f"no complete answer within {self.timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise _ScrapeFailed("error", _describe(exc)) from exc

    def _rebuild(self) -> None:
        families, dropped = _merge(self._targets.values(), self._reserved)
        for target in self._targets.values():
            for name, reason in dropped.get(target.instance_id, {}).items():
                if name not in target.dropped:
                    logger.warning("Left out family %r of instance %r: %s.", name, target.instance_id, reason)
            target.dropped = dropped.get(target.instance_id, {})
        self._snapshot = families + self._status()

    def _status(self) -> list[Metric]:
        labels = list(TARGET_LABELS)
        up = GaugeMetricFamily(
            "cellnode_telemetry_up", "1 when the instance's last metrics scrape succeeded.", labels=labels
        )
        scrapes = CounterMetricFamily(
            "cellnode_telemetry_scrapes",
            "Scrapes of the instance's metrics, by result: ok, error, timeout, too_large or bad_format.",
            labels=[*labels, "result"],
        )
        seconds = GaugeMetricFamily(
            "cellnode_telemetry_scrape_duration_seconds", "Seconds the instance's last scrape took.", labels=labels
        )
        samples = GaugeMetricFamily(
            "cellnode_telemetry_samples",
            "Samples taken from the instance's last scrape (0 after a failed one).",
            labels=labels,
        )
        dropped = GaugeMetricFamily(
            "cellnode_telemetry_dropped_families",
            "Families of the instance left out: their name is cellnode's own, or clashes with another instance's.",
            labels=labels,
        )
        for target in self._targets.values():
            if target.is_up is None:
                continue
            values = [target.node_id, target.instance_id]
            up.add_metric(values, 1 if target.is_up else 0)
            for result, count in target.scrapes.items():
                scrapes.add_metric([*values, result], count)
            seconds.add_metric(values, target.seconds)
            samples.add_metric(values, sum(len(family.samples) for family in target.families))
            dropped.add_metric(values, len(target.dropped))
        return [up, scrapes, seconds, samples, dropped]


def _parse(body: bytes, node_id: str, instance_id: str, max_series: int) -> list[Metric]:
    """An instance's families, with names escaped as the exposition will write them and the target labels added."""
    try:
        lines = _NumberedLines(body.decode())
    except UnicodeDecodeError as exc:
        raise _ScrapeFailed("bad_format", f"the body is not UTF-8 (byte {exc.start})") from exc
    families: list[Metric] = []
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    count = 0
    try:
        for parsed in text_fd_to_metric_families(lines):
            if parsed.type not in TEXT_TYPES:
                raise ValueError(f"type {parsed.type!r} is not one of the Prometheus text format")
            if not parsed.samples:
                continue  # a HELP or TYPE line whose samples the parser filed under another family
            count += len(parsed.samples)
            if count > max_series:
                raise _ScrapeFailed("too_large", f"more than the limit of {max_series} samples")
            family = Metric(escape_metric_name(parsed.name), parsed.documentation, parsed.type)
            for sample in parsed.samples:
                labels = _with_target(sample.labels, node_id, instance_id)
                name = escape_metric_name(sample.name)
                key = (name, tuple(sorted(labels.items())))
                if key not in seen:  # Prometheus keeps the first of duplicate series, too
                    seen.add(key)
                    family.samples.append(sample._replace(name=name, labels=labels))
            families.append(family)
    except ValueError as exc:
        text = lines.line.strip()[:80]
        raise _ScrapeFailed("bad_format", f"near line {lines.number} {text!r}: {exc or 'not Prometheus text'}") from exc
    return families


def _merge(targets: Iterable[_Target], reserved: set[str]) -> tuple[list[Metric], dict[str, dict[str, str]]]:
    """One family per name over all targets (first come, first served), and per instance the families left out."""
    merged: dict[str, Metric] = {}
    owners: dict[str, tuple[str, str]] = {}  # series name -> (family name, instance that first exposed it)
    dropped: dict[str, dict[str, str]] = {}
    for target in targets:
        for family in target.families:
            names = _series_names(family)
            reason = _clash(family, names, merged, owners, reserved)
            if reason:
                dropped.setdefault(target.instance_id, {})[family.name] = reason
                continue
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
            for name in names:
                owners.setdefault(name, (family.name, target.instance_id))
            merged[family.name].samples.extend(family.samples)
    return list(merged.values()), dropped


def _clash(
    family: Metric, names: set[str], merged: dict[str, Metric], owners: dict[str, tuple[str, str]], reserved: set[str]
) -> str:
    for name in sorted(names):
        if name in reserved or name.startswith(RESERVED_PREFIX):
            return f"{name!r} is one of cellnode's own metrics"
    kept = merged.get(family.name)
    if kept is not None and kept.type != family.type:
        other = owners[family.name][1]
        return f"it is a {family.type} here but a {kept.type} in instance {other!r}"
    for name in sorted(names):
        owner, other = owners.get(name, (family.name, ""))
        if owner != family.name:
            return f"its series {name!r} belongs to family {owner!r} of instance {other!r}"
    return ""


def _series_names(family: Metric, *, created: bool = False) -> set[str]:
    """The names a family's lines may carry in the exposition. `created` adds the `_created` series a
    prometheus_client metric exposes as soon as it has a child; a scraped one comes as a family of its own."""
    suffixes = SUFFIXES.get(family.type, ())
    if created and family.type in SUFFIXES:
        suffixes = (*suffixes, "_created")
    return {family.name, *(family.name + suffix for suffix in suffixes), *(sample.name for sample in family.samples)}


def _with_target(labels: dict[str, str], node_id: str, instance_id: str) -> dict[str, str]:
    escaped = {escape_label_name(name): value for name, value in labels.items()}
    if len(escaped) != len(labels):
        raise ValueError(f"labels {sorted(labels)} repeat a name once escaped to {sorted(escaped)}")
    for name in EXPORTED_LABELS:
        if name in escaped:
            exported = "exported_" + name
            while exported in escaped:
                exported = "exported_" + exported
            escaped[exported] = escaped.pop(name)
    return {"node_id": node_id, "instance_id": instance_id, **escaped}


def _describe(exc: httpx.HTTPError) -> str:
    """The operating system's words ('connection refused') when a socket error is the cause, else httpx's."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


class _NumberedLines(io.StringIO):
    """Text whose reader knows the line it is at, so that a parse error can name it."""

    number = 0
    line = ""

    def __next__(self) -> str:  # type: ignore[override]  # typeshed's _IOBase says bytes; StringIO gives str
        self.line = super().__next__()
        self.number += 1
        return self.line
