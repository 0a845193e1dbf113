"""Suspend and resume against a real server, and a suspended node across a server restart."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow


def test_suspend_resume_and_restart(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", env={"CELLNODE_PROFILE": str(tmp_path / "p.json")}).start()
    try:
        with server.client() as api:
            api.create_checkpoint(
                notebook(tmp_path, "import os\nbase = 1", "pid = os.getpid()\nout = base + 1"), name="s"
            )
            node = api.create_node("s-node", checkpoint="s", inputs={}, outputs={"pid": "int", "out": "int"})
            first_pid = api.execute("s-node", {})["pid"]

            suspended = api.suspend_node("s-node")
            assert suspended["status"] == "SUSPENDED" and suspended["instances"] == []
            with pytest.raises(ProcessLookupError):
                os.kill(first_pid, 0)
            response = httpx.post(
                f"{server.url}/datasphere/v1/nodes/{node['id']}:execute",
                headers={"Authorization": f"Api-Key {server.key}"},
                json={"folder_id": node["folder_id"], "input": {}},
            )
            assert response.status_code == 503
            assert "is suspended" in response.json()["message"] and "cellnode node resume" in response.json()["message"]

        server.stop()
        server.start()
        with server.client() as api:
            assert api.get_node("s-node")["status"] == "SUSPENDED", "a suspended node stays suspended across restarts"
            resumed = api.resume_node("s-node")
            assert resumed["status"] == "HEALTHY" and len(resumed["instances"]) == 1
            assert api.execute("s-node", {})["out"] == 2
    finally:
        server.stop()
