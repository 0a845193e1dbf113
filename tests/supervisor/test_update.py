"""Node updates against a real server: a roll under load with zero failed requests; in-place changes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow


async def _load(server: ServerProcess, node: dict[str, Any], stop: asyncio.Event, workers: int = 4) -> list[Any]:
    """Requests from `workers` callers until `stop` is set; each result is a status code or an answer."""
    url = f"{server.url}/datasphere/v1/nodes/{node['id']}:execute"
    results: list[Any] = []

    async def worker(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            response = await http.post(url, json={"folder_id": node["folder_id"], "input": {"x": 3}})
            results.append(response.json()["output"]["answer"] if response.status_code == 200 else response.text)

    async with httpx.AsyncClient(headers={"Authorization": f"Api-Key {server.key}"}, timeout=30) as http:
        await asyncio.gather(*(worker(http) for _ in range(workers)))
    return results


def test_rolling_update_under_load_loses_nothing(server: ServerProcess, client: Client, tmp_path: Path) -> None:
    client.create_checkpoint(
        notebook(tmp_path, "version = 1\nx = 1", "answer = version * x", name="v1.ipynb"), name="roll-v1"
    )
    client.create_checkpoint(
        notebook(tmp_path, "version = 2\nx = 1", "answer = version * x", name="v2.ipynb"), name="roll-v2"
    )
    node = client.create_node(
        "roll-node", checkpoint="roll-v1", inputs={"x": "int"}, outputs={"answer": "int"}, instances=2
    )
    old_pids = {i["pid"] for i in node["instances"]}

    async def scenario() -> list[Any]:
        stop = asyncio.Event()
        load = asyncio.create_task(_load(server, node, stop))
        await asyncio.sleep(0.5)
        updated = await asyncio.to_thread(client.update_node, "roll-node", checkpoint="roll-v2")
        assert updated["generation"] == 2
        await asyncio.sleep(0.5)
        stop.set()
        return await load

    results = asyncio.run(scenario())
    tally = Counter(results)
    assert set(tally) <= {3, 6}, f"every request answered, by one version or the other: {tally}"
    assert tally[3] > 0 and tally[6] > 0
    assert results[-1] == 6
    found = client.get_node("roll-node")
    assert {i["generation"] for i in found["instances"]} == {2}
    assert not old_pids & {i["pid"] for i in found["instances"]}
    client.delete_node("roll-node")
    client.delete_checkpoint("roll-v1")
    client.delete_checkpoint("roll-v2")


def test_in_place_changes_keep_the_instances(client: Client, randomizer: dict[str, Any]) -> None:
    before = client.get_node("randomizer-node")
    updated = client.update_node(
        "randomizer-node", description="random numbers", timeout=30, acl=[randomizer["folder_id"]]
    )
    assert updated["description"] == "random numbers" and updated["timeout"] == 30
    assert updated["generation"] == before["generation"]
    assert [i["pid"] for i in updated["instances"]] == [i["pid"] for i in before["instances"]]
    client.update_node("randomizer-node", timeout=60, description="")


def test_scaling_up_and_down(client: Client, randomizer: dict[str, Any]) -> None:
    grown = client.update_node("randomizer-node", instances=3)
    assert len(grown["instances"]) == 3
    shrunk = client.update_node("randomizer-node", instances=1)
    deadline = time.monotonic() + 30
    while len(shrunk["instances"]) != 1:
        assert time.monotonic() < deadline, shrunk
        time.sleep(0.1)
        shrunk = client.get_node("randomizer-node")
    assert shrunk["instances"][0]["slot"] == 0


def test_a_failed_roll_keeps_the_previous_version(server: ServerProcess, client: Client, tmp_path: Path) -> None:
    from cellnode.exceptions import InternalError

    client.create_checkpoint(
        notebook(tmp_path, "version = 1\nx = 1", "answer = version * x", name="a.ipynb"), name="ok-v1"
    )
    bad = client.create_checkpoint(
        notebook(tmp_path, f"version = '{tmp_path.name}'\nx = 1", "answer = 0", name="b.ipynb"), name="bad-v2"
    )
    sha = next(v["sha256"] for v in bad["variables"] if v["name"] == "version")
    (server.data_dir / "blobs" / "sha256" / sha[:2] / sha).write_bytes(b"corrupt")
    client.create_node("failroll-node", checkpoint="ok-v1", inputs={"x": "int"}, outputs={"answer": "int"})
    started = time.monotonic()
    with pytest.raises(InternalError, match="Update to generation 2 failed: .*corrupt"):
        client.update_node("failroll-node", checkpoint="bad-v2")
    assert time.monotonic() - started < 60, "a failed roll is reported, not waited out"
    found = client.get_node("failroll-node")
    assert "version" in found["rollout_error"] and found["generation"] == 2
    assert client.execute("failroll-node", {"x": 5}) == {"answer": 5}, "the previous version keeps serving"
    client.delete_node("failroll-node")
    client.delete_checkpoint("ok-v1")
    client.delete_checkpoint("bad-v2")
