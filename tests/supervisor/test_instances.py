"""Several instances per node against a real server: balancing, a kill under load, a full queue."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sleeper(client: Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A node of two instances whose cell sleeps `delay` seconds and answers with its process ID."""
    path = notebook(
        tmp_path_factory.mktemp("sleeper"), "import os, time\ndelay = 0.0", "time.sleep(delay)\npid = os.getpid()"
    )
    client.create_checkpoint(path, name="sleeper-checkpoint")
    node = client.create_node(
        "sleeper-node", checkpoint="sleeper-checkpoint", inputs={"delay": "float"}, outputs={"pid": "int"}, instances=2
    )
    yield node
    client.delete_node(node["id"])
    client.delete_checkpoint("sleeper-checkpoint")


async def _calls(
    server: ServerProcess, node: dict[str, Any], delays: list[float], kill_after: float | None = None
) -> list[httpx.Response]:
    headers = {"Authorization": f"Api-Key {server.key}"}
    url = f"{server.url}/datasphere/v1/nodes/{node['id']}:execute"
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        tasks = []
        for delay in delays:
            tasks.append(
                asyncio.create_task(http.post(url, json={"folder_id": node["folder_id"], "input": {"delay": delay}}))
            )
            await asyncio.sleep(0.02)  # in order, so that each instance's queue is known
        if kill_after is not None:
            await asyncio.sleep(kill_after)
            os.kill(node["victim"], signal.SIGKILL)
        return list(await asyncio.gather(*tasks))


def test_instances_are_listed_and_both_serve(server: ServerProcess, client: Client, sleeper: dict[str, Any]) -> None:
    found = client.get_node(sleeper["id"])
    assert found["instance_count"] == 2
    assert [i["slot"] for i in found["instances"]] == [0, 1]
    assert all(i["status"] == "HEALTHY" and i["pid"] and i["restarts"] == 0 for i in found["instances"])
    responses = asyncio.run(_calls(server, sleeper, [0.3] * 4))
    pids = {r.json()["output"]["pid"] for r in responses}
    assert pids == {i["pid"] for i in found["instances"]}, "least-outstanding balancing uses both instances"


def test_kill_under_load_costs_only_the_running_request(
    server: ServerProcess, client: Client, sleeper: dict[str, Any]
) -> None:
    """Six requests, three per instance; kill -9 one instance while it runs its first: only that one fails."""
    instances = client.get_node(sleeper["id"])["instances"]
    victim = instances[0]["pid"]
    responses = asyncio.run(_calls(server, {**sleeper, "victim": victim}, [1.0] * 6, kill_after=0.3))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 5 + [503], [r.text for r in responses]
    failed = next(r for r in responses if r.status_code == 503)
    assert "exited with code -9" in failed.json()["message"]
    assert {r.json()["output"]["pid"] for r in responses if r.status_code == 200} >= {instances[1]["pid"]}

    def replaced() -> bool:
        now = client.get_node(sleeper["id"])
        return (
            now["status"] == "HEALTHY"
            and len(now["instances"]) == 2
            and victim not in {i["pid"] for i in now["instances"]}
        )

    deadline = time.monotonic() + 30
    while not replaced():
        assert time.monotonic() < deadline, client.get_node(sleeper["id"])
        time.sleep(0.1)
    slot0 = client.get_node(sleeper["id"])["instances"][0]
    assert slot0["restarts"] == 1 and "-9" in slot0["last_error"]


def test_a_full_queue_answers_429(server: ServerProcess, client: Client, tmp_path: Path) -> None:
    path = notebook(tmp_path, "import time\ndelay = 0.0", "time.sleep(delay)\ndone = True")
    client.create_checkpoint(path, name="queue-checkpoint")
    node = client.create_node(
        "queue-node", checkpoint="queue-checkpoint", inputs={"delay": "float"}, outputs={"done": "bool"}, max_queue=1
    )
    responses = asyncio.run(_calls(server, node, [1.0, 1.0, 1.0]))
    assert [r.status_code for r in responses] == [200, 200, 429]
    refused = responses[2]
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["code"] == 8 and "queue holds at most 1" in refused.json()["message"]
    client.delete_node(node["id"])
    client.delete_checkpoint("queue-checkpoint")
