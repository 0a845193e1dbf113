"""Docker nodes and kernel images from the CLI and the SDK, against a real server whose Docker engine cannot be
reached (DOCKER_HOST names a socket that does not exist): docker nodes FAIL with that reason, and everything that
does not need a running container (the flags, what `node get` shows, update patches, the API's refusals, the
pass-through's own errors) is checked for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from cellnode.exceptions import InternalError, InvalidArgument, NotFound, Unavailable
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow

IMAGE = "127.0.0.1:5000/team/model:1"
PASSWORD = "hunter2-registry-password"
ENGINE_UNREACHABLE = "Cannot reach the Docker engine at unix://"


@pytest.fixture(scope="module")
def engineless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose Docker engine is a socket path that does not exist, with a registry password secret."""
    home = tmp_path_factory.mktemp("engineless")
    env = {"DOCKER_HOST": f"unix://{home}/none.sock", "CELLNODE_PROFILE": str(home / "profile.json")}
    process = ServerProcess(home / "data", env=env).start()
    with process.client() as api:
        api.create_secret("REGISTRY_PASSWORD", PASSWORD)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def api(engineless: ServerProcess) -> Iterator[Client]:
    with engineless.client() as client:
        yield client


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CELLNODE_")}
    return subprocess.run(
        [sys.executable, "-m", "cellnode", *args],
        # Wide enough that no message or table row is wrapped.
        env={**base, "CELLNODE_URL": server.url, "CELLNODE_TOKEN": server.key, "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def run(server: ServerProcess, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    result = cli(server, *args)
    assert result.returncode == code, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


def wait_failed(api: Client, ref: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (node := api.get_node(ref))["status"] != "FAILED":
        assert time.monotonic() < deadline, node
        time.sleep(0.1)
    return node


def test_create_waits_and_says_why_the_node_failed(engineless: ServerProcess, api: Client) -> None:
    failed = run(engineless, "node", "create", "--name", "waits", "--image", IMAGE, "--port", "8080", code=1)
    assert failed.stderr.startswith("InternalError: Node 'waits' ("), failed.stderr
    assert "failed to start: " + ENGINE_UNREACHABLE in failed.stderr
    created = run(engineless, "node", "create", "--name", "no-wait", "--image", IMAGE, "--port", "8080", "--no-wait")
    assert "Type" in created.stdout and "docker" in created.stdout
    wait_failed(api, "no-wait")
    shown = run(engineless, "node", "get", "no-wait").stdout
    assert "FAILED" in shown and "Reason" in shown and ENGINE_UNREACHABLE in shown
    listed = run(engineless, "node", "list").stdout
    row = next(line for line in listed.splitlines() if " no-wait " in line)
    assert "docker" in row and IMAGE in row and "http:8080" in row


FULL = (
    *("--image", IMAGE, "--registry-username", "json_key", "--registry-password-secret", "REGISTRY_PASSWORD"),
    *("--endpoint", "http2", "--port", "8080", "--idle-timeout", "60", "--fixed-ports"),
    *("--memory", "1.5GiB", "--disk", "2g", "--command", "python3 app.py --name 'a b'"),
    *("--telemetry-path", "/stats"),
    *("--healthcheck", "http", "--healthcheck-path", "/health", "--healthcheck-interval", "5"),
    *("--healthcheck-timeout", "2", "--fails-threshold", "2", "--passes-threshold", "1"),
)


def test_get_shows_the_container_and_the_secret_by_name_only(engineless: ServerProcess) -> None:
    answer = run(engineless, "node", "create", "--name", "full", *FULL, "--no-wait", "--json").stdout
    created = json.loads(answer)
    assert created["container"] == {
        "image": IMAGE,
        "registry_username": "json_key",
        "registry_password_secret": "REGISTRY_PASSWORD",
        "endpoint": "http2",
        "port": 8080,
        "idle_timeout": 60.0,
        "memory_bytes": 1610612736,
        "disk_bytes": 2 * 2**30,
        "command": ["python3", "app.py", "--name", "a b"],
        "fixed_ports": True,
        "telemetry": {"type": "prometheus", "path": "/stats", "port": 8080},  # a path alone implies prometheus
        "healthcheck": {
            "type": "http",
            "port": 8080,
            "path": "/health",
            "timeout": 2.0,
            "interval": 5.0,
            "fails_threshold": 2,
            "passes_threshold": 1,
        },
    }
    shown = run(engineless, "node", "get", "full").stdout
    for line in (
        f"Image            {IMAGE}",
        "Registry         user json_key, password in secret REGISTRY_PASSWORD",
        "Endpoint         http2 on port 8080, fixed ports (one instance per machine)",
        "Command          python3 app.py --name 'a b'",
        "Memory           1.5 GiB",
        "Disk             2 GiB",
        "Health check     http GET /health on port 8080, every 5 s, timeout 2 s; out after 2 failures, in after 1 pass",
        "Telemetry        prometheus /stats on port 8080",
    ):
        assert line in shown, shown
    assert "Checkpoint" not in shown and "Kernel image" not in shown
    as_json = run(engineless, "node", "get", "full", "--json").stdout
    assert PASSWORD not in answer + shown + as_json


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (("--memory", "12X"), ("--memory", "'12X' is not a size", "512M")),
        (("--disk", "0.1K"), ("--disk", "'0.1K' comes to 102.4 bytes, not a whole number")),
        (("--memory", "5iB"), ("--memory", "'5iB' is not a size")),
        (
            ("--healthcheck-path", "/h", "--fails-threshold", "2"),
            ("--healthcheck-path, --fails-threshold", "--healthcheck http|grpc"),
        ),
        (("--registry-username", "bob"), ("--registry-username 'bob' needs --registry-password-secret SECRET",)),
        (("--output", "x:int", "--state", "fork"), ("--output, --state are settings of a cell node (--checkpoint)",)),
        (("--command", "a 'b"), ("--command", "No closing quotation")),
    ],
)
def test_usage_errors_of_docker_flags(
    engineless: ServerProcess, flags: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    result = run(engineless, "node", "create", "--name", "refused", "--image", IMAGE, "--port", "80", *flags, code=2)
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--checkpoint", "c", "--output", "x:int", "--port", "80"), "--port is a setting of a docker node (--image)"),
        (("--checkpoint", "c"), "A cell node needs at least one --output NAME:TYPE"),
        (("--image", IMAGE), "A docker node needs --port"),
        ((), "Give --checkpoint NAME (a cell node) or --image REF --port P (a docker node)."),
        (
            ("--image", IMAGE, "--port", "80", "--checkpoint", "c"),
            "--image makes a docker node and --checkpoint a cell",
        ),
    ],
)
def test_a_node_is_of_one_kind(engineless: ServerProcess, args: tuple[str, ...], fragment: str) -> None:
    result = run(engineless, "node", "create", "--name", "refused", *args, code=2)
    assert fragment in result.stderr, result.stderr


def test_the_api_refuses_more_memory_than_the_spec(engineless: ServerProcess) -> None:
    result = run(
        engineless, "node", "create", "--name", "greedy", "--image", IMAGE, "--port", "80", "--memory", "33G", code=1
    )
    assert result.stderr.startswith("InvalidArgument: container.memory_bytes is 35433480192 bytes, more than the 32")
    assert "of spec 'c1.4'" in result.stderr and "--memory" in result.stderr


def test_update_patches_the_container(engineless: ServerProcess, api: Client) -> None:
    api.create_docker_node(
        "patched", image=IMAGE, port=8080, telemetry=True, healthcheck={"type": "http", "path": "/ok"}, wait=False
    )

    def update(*flags: str, code: int = 0) -> Any:
        result = run(engineless, "node", "update", "patched", *flags, "--no-wait", "--json", code=code)
        return json.loads(result.stdout)["container"] if code == 0 else result.stderr

    container = update("--port", "9000", "--memory", "512M")
    assert container["port"] == 9000 and container["memory_bytes"] == 512 * 2**20
    assert container["healthcheck"]["port"] == container["telemetry"]["port"] == 9000  # they followed the port
    container = update("--healthcheck-interval", "30", "--passes-threshold", "1")  # the current check, changed
    assert container["healthcheck"] == {
        "type": "http",
        "port": 9000,
        "path": "/ok",
        "timeout": 1.0,
        "interval": 30.0,
        "fails_threshold": 3,
        "passes_threshold": 1,
    }
    container = update("--no-healthcheck", "--no-memory", "--no-telemetry")
    assert container["healthcheck"] is container["memory_bytes"] is container["telemetry"] is None
    assert "has no health check to change; give its type too: --healthcheck http|grpc" in update(
        "--healthcheck-port", "9001", code=2
    )
    assert "Give --memory or --no-memory, not both" in update("--memory", "1G", "--no-memory", code=2)
    shown = run(engineless, "node", "get", "patched").stdout
    assert "http on port 9000" in shown and "Health check     - (in rotation once" in shown


def test_kernel_image_of_a_cell_node(engineless: ServerProcess, api: Client, tmp_path: Path) -> None:
    api.create_checkpoint(notebook(tmp_path, "x = 1"), name="kernel-checkpoint")
    image = "127.0.0.1:5000/team/python:3.12"
    flags = ("--checkpoint", "kernel-checkpoint", "--output", "x:int", "--kernel-image", image, "--no-wait")
    run(engineless, "node", "create", "--name", "in-image", *flags, "--registry-password-secret", "REGISTRY_PASSWORD")
    shown = run(engineless, "node", "get", "in-image").stdout
    assert f"Kernel image   {image} (user json_key, password in secret REGISTRY_PASSWORD)" in shown
    assert "Checkpoint" in shown and "x:int" in shown and "Image  " not in shown
    assert PASSWORD not in shown
    run(engineless, "node", "update", "in-image", "--no-kernel-image", "--no-wait")
    assert "Kernel image   - (the server's Python)" in run(engineless, "node", "get", "in-image").stdout
    run(engineless, "node", "update", "in-image", "--kernel-image", "python:3.12-slim", "--no-wait")
    assert api.get_node("in-image")["kernel_image"] == {
        "image": "python:3.12-slim",
        "registry_username": None,
        "registry_password_secret": None,
    }
    refused = run(engineless, "node", "update", "in-image", "--port", "80", "--no-wait", code=1)
    assert "is a cell node; 'container' is a docker node's setting" in refused.stderr


def test_sdk_create_update_and_request(api: Client) -> None:
    node = api.create_docker_node(
        "sdk-node",
        image=IMAGE,
        port=8080,
        memory="1G",
        command="serve --fast",
        healthcheck={"type": "grpc"},
        telemetry={"path": "/m"},
        wait=False,
    )
    assert node["container"]["memory_bytes"] == 2**30 and node["container"]["command"] == ["serve", "--fast"]
    assert node["container"]["healthcheck"]["path"] == "" and node["container"]["telemetry"]["port"] == 8080
    assert node["timeout"] == 15.0 and node["type"] == "docker"
    with pytest.raises(InternalError, match="failed to start: " + ENGINE_UNREACHABLE):
        api.wait_node(node["id"])
    updated = api.update_node(
        "sdk-node", container={"port": 9100, "disk_bytes": "10G", "healthcheck": None}, wait=False
    )
    assert updated["container"]["port"] == 9100 and updated["container"]["disk_bytes"] == 10 * 2**30
    assert updated["container"]["healthcheck"] is None and updated["container"]["telemetry"]["port"] == 9100
    with pytest.raises(InvalidArgument, match="'2 GBB' is not a size"):
        api.update_node("sdk-node", container={"memory_bytes": "2 GBB"}, wait=False)
    with pytest.raises(Unavailable, match="has failed|has no ready instance"):  # cellnode's answer, not the service's
        api.request("sdk-node", "POST", "/predict", json={"x": 1})
    with pytest.raises(NotFound, match="Alias 'datasphere.user.no-such-alias' not found"):
        api.request("datasphere.user.no-such-alias", "GET", "/", alias=True)  # answered by the header route
    with pytest.raises(NotFound, match="Node 'no-such-node' not found"):
        api.request("no-such-node", "GET", "/")
    with pytest.raises(InvalidArgument, match="under cellnode's own API"):
        api.request("sdk-node", "GET", "/cellnode/v1/nodes")


def test_an_object_check_names_the_value_without_echoing_the_object(engineless: ServerProcess) -> None:
    container = {"image": "127.0.0.1:5000/team/model:1", "port": 8080, "registry_username": "json_key"}
    answer = httpx.post(
        engineless.url + "/cellnode/v1/nodes",
        json={"name": "half-credentials", "container": container},
        headers={"authorization": f"Api-Key {engineless.key}"},
    )
    assert answer.status_code == 400, answer.text
    message = answer.json()["message"]
    assert "registry_username 'json_key' is given without registry_password_secret" in message
    assert "127.0.0.1:5000/team/model:1" not in message  # the object is not repeated back
