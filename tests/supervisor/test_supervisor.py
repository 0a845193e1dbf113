"""The supervisor against a real server: a killed instance is replaced; a crash loop ends in FAILED with a reason."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from cellnode.client import Client
from cellnode.exceptions import InternalError, Unavailable
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_killed_instance_is_replaced(server: ServerProcess, client: Client, tmp_path: Path) -> None:
    client.create_checkpoint(notebook(tmp_path, "k = 3", "z = k * k"), name="respawn-checkpoint")
    node = client.create_node(
        "respawn-node", checkpoint="respawn-checkpoint", inputs={"k": "int"}, outputs={"z": "int"}
    )
    (instance,) = node["instances"]
    assert client.execute("respawn-node", {"k": 4}) == {"z": 16}
    os.kill(instance["pid"], signal.SIGKILL)

    def healthy_again() -> bool:
        try:
            return client.execute("respawn-node", {"k": 5}) == {"z": 25}
        except Unavailable:
            return False

    wait_for(healthy_again)
    (replacement,) = client.get_node("respawn-node")["instances"]
    assert replacement["pid"] != instance["pid"] and replacement["restarts"] == 1
    assert replacement["slot"] == instance["slot"] and "-9" in replacement["last_error"]
    client.delete_node("respawn-node")
    client.delete_checkpoint("respawn-checkpoint")


def test_crash_loop_ends_in_failed(server: ServerProcess, client: Client, tmp_path: Path) -> None:
    """A cell whose request kills the instance: after three crashes in a minute the node is FAILED, not looping."""
    path = notebook(tmp_path, "import os\nmode = 'ok'", "if mode == 'die':\n    os._exit(17)\nanswer = mode")
    client.create_checkpoint(path, name="crashy-checkpoint")
    node = client.create_node(
        "crashy-node", checkpoint="crashy-checkpoint", inputs={"mode": "str"}, outputs={"answer": "str"}
    )

    def answers_or_failed() -> bool:
        if client.get_node(node["id"])["status"] == "FAILED":
            return True
        try:
            return client.execute(node["id"], {"mode": "ok"}) == {"answer": "ok"}
        except Unavailable:
            return False  # the supervisor is replacing the instance

    for _ in range(3):
        wait_for(answers_or_failed)
        if client.get_node(node["id"])["status"] == "FAILED":
            break
        with pytest.raises(Unavailable, match="exited with code 17"):
            client.execute(node["id"], {"mode": "die"})
    wait_for(lambda: client.get_node(node["id"])["status"] == "FAILED")
    found = client.get_node(node["id"])
    assert "exited with code 17" in found["status_message"]
    with pytest.raises(InternalError, match="failed to start"):
        client.wait_node(node["id"], timeout=5)
    client.delete_node(node["id"])
    client.delete_checkpoint("crashy-checkpoint")


def test_a_frozen_idle_instance_is_replaced(tmp_path: Path) -> None:
    env = {
        "CELLNODE_PROFILE": str(tmp_path / "p.json"),
        "CELLNODE_LIVENESS_INTERVAL": "0.3",
        "CELLNODE_LIVENESS_TIMEOUT": "1",
    }
    server = ServerProcess(tmp_path / "data", env=env).start()
    try:
        with server.client() as api:
            api.create_checkpoint(notebook(tmp_path, "a = 1", "b = a * 2"), name="frozen")
            node = api.create_node("frozen-node", checkpoint="frozen", inputs={"a": "int"}, outputs={"b": "int"})
            (instance,) = node["instances"]
            os.kill(instance["pid"], signal.SIGSTOP)

            def replaced() -> bool:
                found = api.get_node("frozen-node")["instances"]
                return len(found) == 1 and found[0]["pid"] != instance["pid"] and found[0]["status"] == "HEALTHY"

            wait_for(replaced, timeout=30)
            (replacement,) = api.get_node("frozen-node")["instances"]
            assert replacement["restarts"] == 1 and "liveness check within 1 s" in replacement["last_error"]
            assert api.execute("frozen-node", {"a": 21}) == {"b": 42}
    finally:
        server.stop()
