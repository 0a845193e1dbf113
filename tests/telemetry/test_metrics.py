"""`/metrics` against a real server: the reference's node metrics and the instance gauges."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow


def scrape(server: ServerProcess) -> dict[str, list[Any]]:
    response = httpx.get(server.url + "/metrics", headers={"Authorization": f"Api-Key {server.key}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def test_requests_codes_and_durations_per_node(server: ServerProcess, randomizer: dict[str, Any]) -> None:
    url = f"{server.url}/datasphere/v1/nodes/{randomizer['id']}:execute"
    headers = {"Authorization": f"Api-Key {server.key}"}
    body = {"folder_id": randomizer["folder_id"], "input": {"input_data": {"left_bound": 1, "right_bound": 2}}}
    before = scrape(server)

    def count(families: dict[str, list[Any]], name: str, **labels: str) -> float:
        return sum(s.value for s in families.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))

    for _ in range(3):
        assert httpx.post(url, json=body, headers=headers).status_code == 200
    assert httpx.post(url, json={"folder_id": randomizer["folder_id"], "input": {}}, headers=headers).status_code == 400
    httpx.post(f"{server.url}/datasphere/v1/nodes/nosuchnodexxxxxxxxxx:execute", json={}, headers=headers)
    after = scrape(server)
    path = f"/datasphere/v1/nodes/{randomizer['id']}:execute"
    node = {"node_id": randomizer["id"], "node_path": path}
    assert count(after, "node_requests", **node) - count(before, "node_requests", **node) == 4
    assert (
        count(after, "node_http_codes", **node, code="200") - count(before, "node_http_codes", **node, code="200") == 3
    )
    assert (
        count(after, "node_http_codes", **node, code="400") - count(before, "node_http_codes", **node, code="400") == 1
    )
    durations = [s for s in after["node_request_durations"] if s.name.endswith("_count") and s.labels == node]
    assert durations and durations[0].value >= 4
    assert not any(s.labels.get("node_id") == "nosuchnodexxxxxxxxxx" for s in after["node_requests"])


def test_instance_gauges(server: ServerProcess, randomizer: dict[str, Any]) -> None:
    families = scrape(server)
    ready = {s.labels["node_id"]: s.value for s in families["cellnode_instances_ready"]}
    assert ready[randomizer["id"]] == 1
    memory = [s for s in families["cellnode_instance_memory_bytes"] if s.labels["node_id"] == randomizer["id"]]
    assert len(memory) == 1 and memory[0].value > 1_000_000
    assert {s.labels["node_id"]: s.value for s in families["cellnode_queue_depth"]}[randomizer["id"]] == 0


def test_metrics_need_a_credential(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/metrics").status_code == 401


def test_only_visible_reads_labels_as_written_so_a_scraped_label_cannot_pass_for_ours() -> None:
    from cellnode.api.telemetry import only_visible

    text = (
        b"# HELP m a metric\n"
        b'm{exported_node_id="mine",instance_id="i1",node_id="theirs"} 1\n'  # an instance's own label, sorted first
        b'm{node_id="theirs",path="x,node_id=\\"mine\\""} 2\n'  # a value that looks like a label
        b'm{exported_alias_name="a.mine",node_id="mine"} 3\n'
        b'm{node_id="mine"} 4\n'
        b'm{node_id="mine} 5\n'  # not well formed: shown to nobody but an admin
        b"plain 6\n"
    )
    assert only_visible(text, {"mine"}, set()).split(b"\n") == [
        b"# HELP m a metric",
        b'm{exported_alias_name="a.mine",node_id="mine"} 3',
        b'm{node_id="mine"} 4',
        b"plain 6",
        b"",
    ]
