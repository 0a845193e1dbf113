"""The autoscaler: its policy on recorded samples, and a real node that grows under load and shrinks after it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from cellnode.exceptions import InvalidArgument
from cellnode.supervisor.autoscale import AutoscalePolicy, Scaler
from tests.helpers import ServerProcess, notebook

POLICY = AutoscalePolicy(target=0.8, up_cooldown=6, down_cooldown=60)


def feed(scaler: Scaler, start: float, seconds: int, load: float) -> float:
    for t in range(seconds):
        scaler.sample(start + t, load)
    return start + seconds - 1


def test_scales_up_to_the_load_over_the_target_once_the_up_cooldown_has_passed() -> None:
    scaler = Scaler(POLICY, started=0)
    now = feed(scaler, 0, 5, load=4)
    assert scaler.decide(now, count=1, low=1, high=10) == 1  # 4 s after the start: still cooling down
    now = feed(scaler, 5, 2, load=4)
    assert scaler.decide(now, count=1, low=1, high=10) == 5  # ceil(4 / 0.8)
    assert scaler.decide(now + 1, count=5, low=1, high=10) == 5  # a change starts a new cooldown


def test_the_count_stays_within_the_range() -> None:
    scaler = Scaler(POLICY, started=0)
    now = feed(scaler, 0, 10, load=40)
    assert scaler.decide(now, count=1, low=1, high=3) == 3
    idle = Scaler(POLICY, started=0)
    now = feed(idle, 0, 70, load=0)
    assert idle.decide(now, count=3, low=2, high=3) == 2


def test_scales_down_only_on_a_long_lull() -> None:
    scaler = Scaler(POLICY, started=0)
    now = feed(scaler, 0, 50, load=3)
    now = feed(scaler, 50, 20, load=0)
    # The mean over the last 60 s is 1.0 (20 s idle after 40 s of 3... ): enough for 2 instances, not 4.
    assert scaler.mean_load(now - 60) == pytest.approx(3 * 40 / 61, rel=0.05)
    assert scaler.decide(now, count=4, low=1, high=4) == 3
    # A second step waits for a whole down cooldown at the new count.
    assert scaler.decide(now + 30, count=3, low=1, high=4) == 3


def test_a_steady_load_at_the_target_changes_nothing() -> None:
    scaler = Scaler(POLICY, started=0)
    now = feed(scaler, 0, 120, load=1.6)  # 2 instances at 0.8 each
    assert scaler.decide(now, count=2, low=1, high=8) == 2


@pytest.fixture(scope="module")
def scaling_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("autoscale")
    process = ServerProcess(
        home / "data",
        env={
            "CELLNODE_PROFILE": str(home / "profile.json"),
            "CELLNODE_SCALE_UP_COOLDOWN": "1",
            "CELLNODE_SCALE_DOWN_COOLDOWN": "3",
        },
    ).start()
    yield process
    process.stop()


@pytest.mark.slow
def test_a_node_grows_under_load_and_shrinks_after(scaling_server: ServerProcess, tmp_path: Path) -> None:
    path = notebook(tmp_path, "import os, time\ndelay = 0.0", "time.sleep(delay)\npid = os.getpid()")
    with scaling_server.client() as api:
        api.create_checkpoint(path, name="sleeper")
        node = api.create_node(
            "sleeper",
            checkpoint="sleeper",
            inputs={"delay": "float"},
            outputs={"pid": "int"},
            min_instances=1,
            max_instances=3,
        )
        assert (node["instance_count"], node["min_instances"], node["max_instances"]) == (1, 1, 3)
        pids: set[int] = set()
        stop = threading.Event()

        def load() -> None:
            headers = {"Authorization": f"Api-Key {scaling_server.key}"}
            url = f"{scaling_server.url}/datasphere/v1/nodes/{node['id']}:execute"
            with httpx.Client(headers=headers, timeout=30) as http:
                while not stop.is_set():
                    answer = http.post(url, json={"folder_id": node["folder_id"], "input": {"delay": 0.2}})
                    assert answer.status_code == 200, answer.text
                    pids.add(answer.json()["output"]["pid"])

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            grown = wait_for(api, node["id"], lambda n: n["instance_count"] == 3 and healthy(n) == 3, 20)
            time.sleep(1.5)  # the load goes on, over the new instances too
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert grown["status"] == "HEALTHY"
        assert len(pids) == 3, "every instance the autoscaler added served requests"
        shrunk = wait_for(api, node["id"], lambda n: n["instance_count"] == 1 and len(n["instances"]) == 1, 30)
        assert shrunk["instances"][0]["status"] == "HEALTHY"
        metrics = httpx.get(
            f"{scaling_server.url}/metrics", headers={"Authorization": f"Api-Key {scaling_server.key}"}
        ).text
        assert f'cellnode_autoscale_changes_total{{direction="up",node_id="{node["id"]}"}}' in metrics
        assert f'cellnode_autoscale_changes_total{{direction="down",node_id="{node["id"]}"}}' in metrics
        assert f'cellnode_instances_wanted{{bound="max",node_id="{node["id"]}"}} 3.0' in metrics


def test_the_range_is_checked(scaling_server: ServerProcess, tmp_path: Path) -> None:
    path = notebook(tmp_path, "x = 1", "y = x")
    with scaling_server.client() as api:
        api.create_checkpoint(path, name="ranged")
        with pytest.raises(InvalidArgument, match=r"min_instances \(3\) is greater than max_instances \(2\)"):
            api.create_node(
                "ranged", checkpoint="ranged", inputs={}, outputs={"y": "int"}, min_instances=3, max_instances=2
            )
        with pytest.raises(InvalidArgument, match="give one or the other"):
            api.create_node(
                "ranged", checkpoint="ranged", inputs={}, outputs={"y": "int"}, instances=2, max_instances=3
            )
        node = api.create_node(
            "ranged", checkpoint="ranged", inputs={}, outputs={"y": "int"}, min_instances=1, max_instances=2
        )
        with pytest.raises(InvalidArgument, match=r"min_instances \(3\) must be at most max_instances \(2\)"):
            api.update_node(node["id"], min_instances=3)
        fixed = api.update_node(node["id"], instances=2)
        assert (fixed["instance_count"], fixed["min_instances"], fixed["max_instances"]) == (2, 2, 2)
        api.delete_node(node["id"])


def healthy(node: dict[str, Any]) -> int:
    return sum(1 for instance in node["instances"] if instance["status"] == "HEALTHY")


def wait_for(api: Client, node_id: str, done: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        node = api.get_node(node_id)
        if done(node):
            return node
        assert time.monotonic() < deadline, f"timed out; the node is {node}"
        time.sleep(0.1)
