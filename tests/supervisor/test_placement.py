"""Where and how big instances are, against real servers: the memory cap, overcommit off, zones, instance
statuses, moving a node to another folder, and the supervisor's metrics."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from cellnode.exceptions import AlreadyExists, CellnodeError, FailedPrecondition, InvalidArgument, Unavailable
from cellnode.store.models import new_id
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow

SPECS = {
    "c1.4": {"vcpu": 4, "ram_gb": 32, "units_per_second": 4},
    "tiny": {"vcpu": 1, "ram_gb": 0.25, "units_per_second": 1},
}


def start_server(home: Path, **env: str) -> ServerProcess:
    (home / "specs.json").write_text(json.dumps(SPECS))
    settings = {"CELLNODE_PROFILE": str(home / "profile.json"), "CELLNODE_SPECS_FILE": str(home / "specs.json")}
    return ServerProcess(home / "data", env={**settings, **env}).start()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("placement"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def api(site: ServerProcess) -> Iterator[Client]:
    with site.client() as client:
        yield client


@pytest.fixture(scope="module")
def hog(api: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A checkpoint whose cell holds `size` bytes for `hold` seconds."""
    path = notebook(
        tmp_path_factory.mktemp("hog"),
        "import time\nsize = 0\nhold = 0.0",
        "blob = b'x' * size\ntime.sleep(hold)\nused = len(blob)",
    )
    api.create_checkpoint(path, name="hog")
    return "hog"


def metrics(site: ServerProcess) -> str:
    return httpx.get(f"{site.url}/metrics", headers={"Authorization": f"Api-Key {site.key}"}).text


def test_an_instance_past_its_memory_cap_is_replaced(site: ServerProcess, api: Client, hog: str) -> None:
    node = api.create_node(
        "hog-node", checkpoint=hog, inputs={"size": "int", "hold": "float"}, outputs={"used": "int"}, spec="tiny"
    )
    assert api.execute("hog-node", {"size": 1000, "hold": 0}) == {"used": 1000}
    with pytest.raises(Unavailable, match=r"killed for using 0\.\d\d GB of memory, over the 0\.25 GB of its spec tiny"):
        api.execute("hog-node", {"size": 400 * 2**20, "hold": 5})
    found = api.wait_node("hog-node")
    deadline = time.monotonic() + 10
    while not (
        found["instances"] and found["instances"][0]["status"] == "HEALTHY" and found["instances"][0]["restarts"]
    ):
        assert time.monotonic() < deadline, found
        time.sleep(0.1)
        found = api.get_node("hog-node")
    instance = found["instances"][0]
    assert instance["restarts"] == 1
    assert "over the 0.25 GB of spec tiny, so it was killed" in instance["last_error"]
    assert api.execute("hog-node", {"size": 1000, "hold": 0}) == {"used": 1000}, "the replacement serves"
    text = metrics(site)
    assert f'cellnode_instance_restarts_total{{node_id="{node["id"]}",reason="memory"}} 1.0' in text
    assert f'cellnode_instances{{node_id="{node["id"]}",status="HEALTHY"}} 1.0' in text
    assert f'cellnode_instance_start_seconds_count{{node_id="{node["id"]}"}} 2.0' in text
    # The first instance waited for the zygote's load; its replacement was forked from the loaded zygote.
    assert f'cellnode_checkpoint_load_seconds_count{{node_id="{node["id"]}"}} 1.0' in text
    units = next(
        line for line in text.splitlines() if line.startswith(f'cellnode_usage_units_total{{node_id="{node["id"]}"')
    )
    assert float(units.split()[-1]) > 0
    api.delete_node("hog-node")


def test_zones(api: Client, hog: str) -> None:
    kwargs: dict[str, Any] = {"checkpoint": hog, "inputs": {"size": "int", "hold": "float"}, "outputs": {"used": "int"}}
    assert api.list_specs()["zones"] == ["local"]
    with pytest.raises(
        InvalidArgument, match="Zone 'ru-central1-a' is not a zone of this server; its backend has local"
    ):
        api.create_node("zoned", zones=["ru-central1-a"], **kwargs)
    with pytest.raises(InvalidArgument, match="zone 'local' is listed more than once"):
        api.create_node("zoned", zones=["local", "local:b"], **kwargs)
    node = api.create_node("zoned", zones=["local:subnet-a"], instances=2, **kwargs)
    assert node["zones"] == [{"zone": "local", "subnet": "subnet-a"}]
    assert [i["zone"] for i in node["instances"]] == ["local", "local"]
    default = api.update_node("zoned", zones=["local"])
    assert default["zones"] == [{"zone": "local", "subnet": ""}] and default["generation"] == 2, "zones roll"
    api.delete_node("zoned")


def test_a_node_that_cannot_start_shows_a_failed_instance(site: ServerProcess, api: Client, tmp_path: Path) -> None:
    bad = api.create_checkpoint(notebook(tmp_path, f"x = '{tmp_path.name}'", "y = x"), name="broken")
    sha = bad["variables"][0]["sha256"]
    (site.data_dir / "blobs" / "sha256" / sha[:2] / sha).write_bytes(b"corrupt")
    node = api.create_node("broken", checkpoint="broken", inputs={}, outputs={"y": "str"}, wait=False)
    deadline = time.monotonic() + 30
    while (found := api.get_node(node["id"]))["status"] != "FAILED":
        assert time.monotonic() < deadline, found
        time.sleep(0.1)
    [instance] = found["instances"]
    assert instance["status"] == "FAILED" and instance["pid"] is None
    assert "corrupt" in instance["last_error"] or "sha256" in instance["last_error"]
    api.delete_node(node["id"])


def test_moving_a_node_to_another_folder(site: ServerProcess, api: Client, hog: str) -> None:
    # Folders are made through the API once IAM lands (issue 4); until then, as the server would store one.
    other = new_id()
    with sqlite3.connect(site.data_dir / "cellnode.db") as db:
        db.execute(
            "INSERT INTO folders (id, name, description, created_at) VALUES (?, 'team-b', '', '2026-11-24 00:00:00')",
            (other,),
        )
    kwargs: dict[str, Any] = {"checkpoint": hog, "inputs": {"size": "int", "hold": "float"}, "outputs": {"used": "int"}}
    node = api.create_node("mover", **kwargs)
    home = node["folder_id"]
    moved = api.update_node("mover", move_to="team-b")
    assert moved["folder_id"] == other and moved["acl"] == [other], "the default ACL follows the node"
    assert moved["generation"] == node["generation"], "a move needs no new instances"
    assert api.execute(node["id"], {"size": 3, "hold": 0}, folder_id=other) == {"used": 3}
    time.sleep(1.1)
    assert {row["folder_id"] for row in api.usage(node_id=node["id"], folder_id=other)} == {other}
    assert {row["folder_id"] for row in api.usage(node_id=node["id"], folder_id=home)} == {home}
    api.create_node("mover", **kwargs)
    with pytest.raises(AlreadyExists, match=f"Folder '{other}' already has a node named 'mover'"):
        api.update_node("mover", folder_id=home, move_to=other)
    with pytest.raises(CellnodeError, match="Folder 'nowhere' not found"):
        api.update_node("mover", folder_id=home, move_to="nowhere")
    api.delete_node("mover", folder_id=home)
    api.delete_node(node["id"])


def test_without_overcommit_a_node_must_fit(tmp_path: Path) -> None:
    strict = start_server(tmp_path, CELLNODE_OVERCOMMIT="false")
    try:
        with strict.client() as client:
            assert "not overcommitted" in client.list_specs()["policy"]
            client.create_checkpoint(notebook(tmp_path, "x = 1", "y = x"), name="fit")
            kwargs: dict[str, Any] = {"checkpoint": "fit", "inputs": {}, "outputs": {"y": "int"}, "spec": "tiny"}
            import os

            cpus = len(os.sched_getaffinity(0))
            client.create_node("first", min_instances=1, max_instances=cpus, **kwargs)
            with pytest.raises(FailedPrecondition, match=r"other running nodes reserve .* CELLNODE_OVERCOMMIT=true"):
                client.create_node("second", **kwargs)
            client.suspend_node("first")
            client.create_node("second", **kwargs)
            with pytest.raises(FailedPrecondition, match="overcommit is off"):
                client.resume_node("first")
            with pytest.raises(FailedPrecondition, match="up to 4 instance"):
                client.create_node("big", instances=4, **{**kwargs, "spec": "c1.4"})
    finally:
        strict.stop()
