"""State policies and logs against a real server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow

CELLS = ("seen = []\ncount = 0\nx = 0", "seen.append(x)\ncount = count + 1\nlength = len(seen)\ntotal = count")


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        # The checkpoint holds the state after cell 2 ran once in the capture: seen == [0], count == 1.
        ("isolated", [(2, 2), (3, 2), (4, 2)]),  # the list's mutation stays; the rebinding of count does not
        ("persistent", [(2, 2), (3, 3), (4, 4)]),  # both stay, as on the reference platform
        ("fork", [(2, 2), (2, 2), (2, 2)]),  # neither: each request runs in a child
    ],
)
def test_state_policies(client: Client, tmp_path: Path, state: str, expected: list[tuple[int, int]]) -> None:
    client.create_checkpoint(notebook(tmp_path, *CELLS), name=f"state-{state}")
    node = client.create_node(
        f"state-{state}",
        checkpoint=f"state-{state}",
        inputs={"x": "int"},
        outputs={"length": "int", "total": "int"},
        state=state,
    )
    assert node["state"] == state
    answers = [client.execute(node["id"], {"x": i}) for i in range(3)]
    assert [(a["length"], a["total"]) for a in answers] == expected
    client.delete_node(node["id"])
    client.delete_checkpoint(f"state-{state}")


def test_logs_carry_time_instance_and_request(
    server: ServerProcess, client: Client, randomizer: dict[str, Any]
) -> None:
    response = httpx.post(
        f"{server.url}/datasphere/v1/nodes/{randomizer['id']}:execute",
        headers={"Authorization": f"Api-Key {server.key}"},
        json={"folder_id": randomizer["folder_id"], "input": {"input_data": {"left_bound": 777, "right_bound": 777}}},
    )
    request_id = response.headers["x-request-id"]
    assert response.json()["output"]["output_data"]["generated_value"] == 777
    deadline = time.monotonic() + 10
    while True:
        lines = client.node_logs("randomizer-node", tail=1000)
        mine = [line for line in lines if line["request_id"] == request_id]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [line["text"] for line in mine] == ["{'generated_value': 777}"]
    line = mine[0]
    assert line["stream"] == "out" and line["time"].endswith("Z")
    assert line["instance_id"] in {i["id"] for i in client.get_node("randomizer-node")["instances"]}
    assert client.node_logs("randomizer-node", instance="nosuchinstance") == []
    later = client.node_logs("randomizer-node", since=line["time"], tail=1000)
    assert all(other["time"] >= line["time"] for other in later) and line in later
