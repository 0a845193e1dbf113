"""The scraper of instances' metrics, against a real uvicorn server on loopback that plays the instances: each page
is Prometheus text that prometheus_client wrote, or a way to fail (an HTTP error, garbage, too much, too late). The
checks read what a Prometheus server would: the registry's exposition, parsed back."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cellnode.router.table import RoutingTable
from cellnode.telemetry.metrics import Metrics
from cellnode.telemetry.scrape import Scraper
from tests.helpers import serve_asgi

# Page name -> what it answers: a body, an HTTP status, or one of the behaviours in `page`.
PAGES: dict[str, bytes | int | str] = {}
# Page name -> the client port of each request, to tell whether the scraper reused its connection.
PORTS: dict[str, list[int]] = {}
HANG_SECONDS = 3.0


async def page(request: Request) -> Response:
    name = request.path_params["name"]
    assert request.client is not None
    PORTS.setdefault(name, []).append(request.client.port)
    answer = PAGES[name]
    if answer == "hang":
        await asyncio.sleep(HANG_SECONDS)
        return Response(b"late 1\n")
    if answer == "oversized":
        return StreamingResponse(_oversized(), media_type="text/plain")
    if answer == "gzip":
        return Response(b"\x1f\x8b not really", headers={"content-encoding": "gzip"})
    if isinstance(answer, int):
        return Response(b"oops", status_code=answer)
    assert isinstance(answer, bytes)
    return Response(answer, media_type="text/plain; version=0.0.4")


async def _oversized() -> AsyncIterator[bytes]:
    chunk = (b"x" * 1023 + b"\n") * 64
    for _ in range(16):  # 1 MiB in all, slowly enough for the scraper to stop reading halfway
        await asyncio.sleep(0.01)
        yield chunk


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve_asgi(Starlette(routes=[Route("/{name}", page)])) as address:
        yield f"http://{address}"


def app_page(requests: int, temperature: float) -> bytes:
    """What an instance instrumented with prometheus_client serves: one family of each type."""
    registry = CollectorRegistry()
    Counter("app_requests", "Requests served.", ["path"], registry=registry).labels("/a").inc(requests)
    Gauge("app_temperature", "Degrees.", registry=registry).set(temperature)
    latency = Histogram("app_latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=registry)
    latency.observe(0.05)
    latency.observe(requests)
    Summary("app_payload_bytes", "Payload sizes.", registry=registry).observe(100 * requests)
    return generate_latest(registry) + b'app_untyped{kind="raw"} 7\n'


@asynccontextmanager
async def scraping(registry: CollectorRegistry, **options: Any) -> AsyncIterator[Scraper]:
    """A scraper without its background task: the tests scrape with `scrape_once()`, when they choose."""
    scraper = Scraper(registry, **options)
    try:
        yield scraper
    finally:
        await scraper.aclose()


def exposition(registry: CollectorRegistry) -> dict[str, Metric]:
    """The registry's text, parsed back; each family must come once, as Prometheus requires."""
    text = generate_latest(registry).decode()
    typed = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(typed) == len(set(typed)), f"a family comes twice: {sorted(typed)}"
    families = list(text_string_to_metric_families(text))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), f"a family's samples are not in one block: {sorted(names)}"
    return {family.name: family for family in families}


def value(families: dict[str, Metric], name: str, **labels: str) -> float | None:
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def of_instance(families: dict[str, Metric], instance_id: str) -> set[str]:
    """The names of the scraped (not cellnode_telemetry_*) samples an instance has in the exposition."""
    return {
        sample.name
        for family in families.values()
        for sample in family.samples
        if sample.labels.get("instance_id") == instance_id and not sample.name.startswith("cellnode_telemetry_")
    }


def test_instances_of_a_node_merge_into_one_family_per_name_and_every_type_round_trips(base: str) -> None:
    served = {"inst-a": app_page(3, 20.5), "inst-b": app_page(5, 30.0)}
    PAGES["merge-a"], PAGES["merge-b"] = served["inst-a"], served["inst-b"]
    registry = CollectorRegistry()

    async def scenario() -> dict[str, Metric]:
        scraper = Scraper(registry)
        scraper.add("node-1", "inst-a", f"{base}/merge-a")
        scraper.add("node-1", "inst-b", f"{base}/merge-b")
        await scraper.scrape_once()
        families = exposition(registry)
        await scraper.aclose()
        assert "app_temperature" not in exposition(registry), "a closed scraper leaves the registry"
        return families

    families = asyncio.run(scenario())
    expected_types = {
        "app_requests": "counter",
        "app_temperature": "gauge",
        "app_latency_seconds": "histogram",
        "app_payload_bytes": "summary",
        "app_untyped": "unknown",
    }
    assert {name: families[name].type for name in expected_types} == expected_types
    assert value(families, "app_requests_total", path="/a", node_id="node-1", instance_id="inst-b") == 5
    assert value(families, "app_temperature", node_id="node-1", instance_id="inst-a") == 20.5
    # Every sample of each instance comes back with the same name, labels (plus ours) and value, and nothing else.
    for instance_id, text in served.items():
        theirs = list(text_string_to_metric_families(text.decode()))
        labels = {"node_id": "node-1", "instance_id": instance_id}
        for family in theirs:
            ours = [
                (s.name, s.labels, s.value)
                for s in families[family.name].samples
                if s.labels["instance_id"] == instance_id
            ]
            assert ours == [(s.name, {**s.labels, **labels}, s.value) for s in family.samples], family.name
        assert of_instance(families, instance_id) == {s.name for family in theirs for s in family.samples}
        assert value(families, "cellnode_telemetry_up", **labels) == 1
        assert value(families, "cellnode_telemetry_dropped_families", **labels) == 0
        assert value(families, "cellnode_telemetry_samples", **labels) == sum(len(family.samples) for family in theirs)


def test_sample_labels_named_like_ours_are_exported_utf8_names_escaped_and_repeats_dropped(base: str) -> None:
    PAGES["labels"] = (
        b'jobs{node_id="theirs",instance_id="i-9",exported_node_id="older",alias_name="a"} 1\n'
        b'{"queue.depth","a.b"="x"} 2\n'
        b"twice 1\ntwice 2\n"
    )
    registry = CollectorRegistry()

    async def scenario() -> dict[str, Metric]:
        async with scraping(registry) as scraper:
            scraper.add("node-1", "inst-a", f"{base}/labels")
            await scraper.scrape_once()
            return exposition(registry)

    families = asyncio.run(scenario())
    # As Prometheus resolves it: the sample's own `exported_node_id` stays, its `node_id` moves one prefix further.
    assert families["jobs"].samples[0].labels == {
        "node_id": "node-1",
        "instance_id": "inst-a",
        "exported_node_id": "older",
        "exported_exported_node_id": "theirs",
        "exported_instance_id": "i-9",
        "exported_alias_name": "a",  # `/metrics` shows a sample with `alias_name` to the alias's readers
    }
    assert value(families, "queue_depth", a_b="x", node_id="node-1", instance_id="inst-a") == 2
    assert [sample.value for sample in families["twice"].samples] == [1], "a repeated series is kept once, the first"


def test_a_family_that_clashes_with_an_earlier_instances_is_left_out_and_reported_once(
    base: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    first = CollectorRegistry()
    Gauge("shared", "A gauge here.", registry=first).set(1)
    Histogram("lat", "Latency.", buckets=(1.0,), registry=first).observe(0.5)
    PAGES["clash-a"] = generate_latest(first)
    PAGES["clash-b"] = b"# TYPE shared_total counter\nshared_total 2\n# TYPE lat_count gauge\nlat_count 4\nfine 5\n"
    caplog.set_level(logging.INFO, "cellnode.telemetry")

    async def scenario() -> dict[str, Metric]:
        async with scraping(registry) as scraper:
            scraper.add("node-1", "inst-a", f"{base}/clash-a")
            scraper.add("node-2", "inst-b", f"{base}/clash-b")
            await scraper.scrape_once()
            reported = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(reported) == 2, reported
            assert "'shared' of instance 'inst-b': it is a counter here but a gauge in instance 'inst-a'" in reported[0]
            assert "'lat_count' of instance 'inst-b': its series 'lat_count' belongs to family 'lat'" in reported[1]
            caplog.clear()
            await scraper.scrape_once()
            assert not caplog.records, "a clash is reported when it starts, not on every scrape"
            return exposition(registry)

    families = asyncio.run(scenario())
    assert families["shared"].type == "gauge"
    assert [s.labels["instance_id"] for s in families["shared"].samples] == ["inst-a"]
    assert {s.labels["instance_id"] for s in families["lat"].samples} == {"inst-a"}
    assert value(families, "fine", node_id="node-2", instance_id="inst-b") == 5
    assert value(families, "cellnode_telemetry_dropped_families", node_id="node-2", instance_id="inst-b") == 2
    assert value(families, "cellnode_telemetry_dropped_families", node_id="node-1", instance_id="inst-a") == 0
    assert value(families, "cellnode_telemetry_up", node_id="node-2", instance_id="inst-b") == 1


def test_families_named_like_cellnodes_own_metrics_are_left_out(base: str) -> None:
    metrics = Metrics(RoutingTable())  # the server's real registry
    metrics.observe("node-1", "/run", 200, 5.0)
    PAGES["reserved"] = (
        b"# TYPE node_requests counter\nnode_requests_total 9\n"
        b"# TYPE node_requests_created gauge\nnode_requests_created 1\n"
        b"cellnode_instances_ready 3\ncellnode_telemetry_up 1\nalias_node_percent 50\nown_metric 1\n"
    )

    async def scenario() -> dict[str, Metric]:
        async with scraping(metrics.registry) as scraper:
            scraper.add("node-1", "inst-a", f"{base}/reserved")
            await scraper.scrape_once()
            return exposition(metrics.registry)

    families = asyncio.run(scenario())
    assert of_instance(families, "inst-a") == {"own_metric"}
    assert value(families, "node_requests_total", node_id="node-1", node_path="/run") == 1
    assert value(families, "cellnode_telemetry_up", node_id="node-1", instance_id="inst-a") == 1
    assert value(families, "cellnode_telemetry_dropped_families", node_id="node-1", instance_id="inst-a") == 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_broken_endpoints_are_reported_and_the_others_still_scraped(
    base: str, caplog: pytest.LogCaptureFixture
) -> None:
    PAGES.update(
        {
            "good": b"good_metric 1\n",
            "status": 500,
            "garbage": b"# TYPE ok gauge\nok 1\nnot a metric line at all\n",
            "oversized": "oversized",
            "many": b"".join(b'many{n="%d"} 1\n' % n for n in range(11)),
            "hang": "hang",
            "hang-too": "hang",
            "gzip": "gzip",
            "escaped-twice": b'clash{"a.b"="x",a_b="y"} 1\n',
        }
    )
    broken = {
        "refused": ("error", "connection refused", f"http://127.0.0.1:{free_port()}/metrics"),
        "status": ("error", "HTTP 500 Internal Server Error", f"{base}/status"),
        "garbage": ("bad_format", "near line 3 'not a metric line at all'", f"{base}/garbage"),
        "oversized": ("too_large", "the body is over the limit of 65536 bytes", f"{base}/oversized"),
        "many": ("too_large", "more than the limit of 10 samples", f"{base}/many"),
        "hang": ("timeout", "no complete answer within 1 s", f"{base}/hang"),
        "hang-too": ("timeout", "no complete answer within 1 s", f"{base}/hang-too"),
        "gzip": ("bad_format", "the body is encoded as 'gzip'", f"{base}/gzip"),
        "escaped-twice": ("bad_format", "repeat a name once escaped", f"{base}/escaped-twice"),
    }
    registry = CollectorRegistry()
    caplog.set_level(logging.INFO, "cellnode.telemetry")

    async def scenario() -> tuple[float, dict[str, Metric]]:
        async with scraping(registry, timeout=1.0, max_bytes=65536, max_series=10) as scraper:
            scraper.add("node-1", "good", f"{base}/good")
            for instance_id, (_, _, url) in broken.items():
                scraper.add("node-1", instance_id, url)
            started = time.monotonic()
            await scraper.scrape_once()
            took = time.monotonic() - started
            warned = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
            for instance_id, (_, reason, _) in broken.items():
                assert any(f"instance {instance_id!r}" in line and reason in line for line in warned), instance_id
            assert len(warned) == len(broken)
            caplog.clear()
            await scraper.scrape_once()
            assert not caplog.records, "a broken endpoint is reported when it breaks, not on every scrape"
            return took, exposition(registry)

    took, families = asyncio.run(scenario())
    # Two targets hang: one after the other, they would take 2 s.
    assert took < 1.8, f"the scrapes ran one after another or past their timeout ({took:.2f} s)"
    assert value(families, "good_metric", node_id="node-1", instance_id="good") == 1
    assert value(families, "cellnode_telemetry_up", node_id="node-1", instance_id="good") == 1
    for instance_id, (result, _, _) in broken.items():
        labels = {"node_id": "node-1", "instance_id": instance_id}
        assert value(families, "cellnode_telemetry_up", **labels) == 0, instance_id
        assert value(families, "cellnode_telemetry_scrapes_total", **labels, result=result) == 2, instance_id
        assert value(families, "cellnode_telemetry_scrapes_total", **labels, result="ok") == 0, instance_id
        assert of_instance(families, instance_id) == set(), instance_id
    assert (
        value(families, "cellnode_telemetry_scrape_duration_seconds", node_id="node-1", instance_id="hang") or 0
    ) > 0.9


def test_a_failed_scrape_drops_the_samples_until_the_endpoint_recovers(
    base: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    caplog.set_level(logging.INFO, "cellnode.telemetry")
    labels = {"node_id": "node-1", "instance_id": "inst-a"}

    async def scenario() -> dict[str, Metric]:
        async with scraping(registry) as scraper:
            scraper.add("node-1", "inst-a", f"{base}/flaky")
            PAGES["flaky"] = b"flaky_metric 1\n"
            await scraper.scrape_once()
            assert value(exposition(registry), "flaky_metric", **labels) == 1
            PAGES["flaky"] = 503
            await scraper.scrape_once()
            families = exposition(registry)
            assert of_instance(families, "inst-a") == set()
            assert value(families, "cellnode_telemetry_up", **labels) == 0
            assert [r.levelname for r in caplog.records] == ["WARNING"]
            await scraper.scrape_once()
            assert [r.levelname for r in caplog.records] == ["WARNING"]
            PAGES["flaky"] = b"flaky_metric 2\n"
            await scraper.scrape_once()
            assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
            assert "'inst-a' (node 'node-1') are available again" in caplog.records[1].getMessage()
            return exposition(registry)

    families = asyncio.run(scenario())
    assert value(families, "flaky_metric", **labels) == 2
    assert value(families, "cellnode_telemetry_up", **labels) == 1
    assert value(families, "cellnode_telemetry_scrapes_total", **labels, result="ok") == 2
    assert value(families, "cellnode_telemetry_scrapes_total", **labels, result="error") == 2


@pytest.mark.slow
def test_remove_drops_an_instances_samples_and_status_even_mid_scrape(
    base: str, caplog: pytest.LogCaptureFixture
) -> None:
    PAGES["stays"], PAGES["goes"], PAGES["slow-goes"] = b"kept 1\n", b"kept 2\n", "hang"
    registry = CollectorRegistry()
    caplog.set_level(logging.INFO, "cellnode.telemetry")

    async def scenario() -> dict[str, Metric]:
        async with scraping(registry, timeout=1.0) as scraper:
            scraper.add("node-1", "stays", f"{base}/stays")
            scraper.add("node-1", "goes", f"{base}/goes")
            scraper.add("node-1", "slow-goes", f"{base}/slow-goes")
            round_ = asyncio.create_task(scraper.scrape_once())
            await asyncio.sleep(0.2)
            scraper.remove("slow-goes")
            await round_
            assert "goes" in str(exposition(registry)["kept"].samples)
            scraper.remove("goes")
            scraper.remove("never-added")
            return exposition(registry)

    families = asyncio.run(scenario())
    assert [s.labels["instance_id"] for s in families["kept"].samples] == ["stays"]
    status = [s.labels["instance_id"] for f in families.values() for s in f.samples if s.name.startswith("cellnode_")]
    assert set(status) == {"stays"}
    assert not caplog.records, "an instance removed mid-scrape is not reported as timed out"


def test_only_loopback_http_urls_are_taken() -> None:
    async def scenario() -> None:
        async with scraping(CollectorRegistry()) as scraper:
            for url in (
                "http://10.0.0.1:9875/metrics",
                "http://example.com/metrics",
                "http://0.0.0.0:9875/metrics",
                "file:///etc/passwd",
                "http://[::1",
            ):
                with pytest.raises(ValueError, match="not an HTTP URL on a loopback address"):
                    scraper.add("node-1", "inst-a", url)
            scraper.add("node-1", "inst-a", "http://127.0.0.2:9/metrics")
            scraper.add("node-1", "inst-b", "http://[::1]:9/metrics")

    asyncio.run(scenario())


@pytest.mark.slow
def test_the_background_task_scrapes_every_interval_over_one_connection(base: str) -> None:
    registry = CollectorRegistry()
    labels = {"node_id": "node-1", "instance_id": "inst-a"}
    PAGES["ticking"], PAGES["elsewhere"] = b"tick 1\n", b"other 1\n"

    async def until(expected: float) -> None:
        deadline = time.monotonic() + 5
        while value(exposition(registry), "tick", **labels) != expected:
            assert time.monotonic() < deadline, f"tick never became {expected}"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        scraper = Scraper(registry, interval=0.2)
        scraper.add("node-1", "inst-a", f"{base}/ticking")
        await scraper.start()
        await until(1)
        PAGES["ticking"] = b"tick 2\n"
        await until(2)
        # A new instance is scraped at once on demand, and alone.
        before = len(PORTS["ticking"])
        scraper.add("node-1", "inst-b", f"{base}/elsewhere")
        await scraper.scrape_once("inst-b")
        assert value(exposition(registry), "other", node_id="node-1", instance_id="inst-b") == 1
        assert len(PORTS["ticking"]) - before <= 1  # at most one round of the background task ran meanwhile
        await scraper.aclose()
        await scraper.aclose()
        stopped = len(PORTS["ticking"])
        await asyncio.sleep(0.5)
        assert len(PORTS["ticking"]) == stopped, "scrapes went on after aclose()"

    asyncio.run(scenario())
    assert len(PORTS["ticking"]) >= 2
    assert len(set(PORTS["ticking"])) == 1, "each scrape opened a new connection"
