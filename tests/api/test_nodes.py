"""Node management against a real server: the create-time checks, list, get, delete, the per-node OpenAPI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cellnode.client import Client
from cellnode.exceptions import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scoring(client: Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A checkpoint with numpy state, a helper reading a global, and an unserializable file handle."""
    path = notebook(
        tmp_path_factory.mktemp("scoring"),
        "import numpy as np\nweights = np.array([0.5, 1.5, 2.0])\nbias = np.float64(0.25)\n"
        "log = open('run.log', 'w')\nfeatures = [1.0, 1.0, 1.0]\n",
        "def score(features):\n    return float(np.dot(weights, features) + bias)\n\n"
        "result = score(features)\nscaled = weights * factor\ncount = len(features)\n",
        name="scoring.ipynb",
    )
    with pytest.raises(InvalidArgument, match="Cell 2 raised NameError"):
        client.create_checkpoint(path, name="scoring-checkpoint")
    path = notebook(
        path.parent,
        "import numpy as np\nweights = np.array([0.5, 1.5, 2.0])\nbias = np.float64(0.25)\n"
        "log = open('run.log', 'w')\nfactor = 2\nfeatures = [1.0, 1.0, 1.0]\n",
        "def score(features):\n    return float(np.dot(weights, features) + bias)\n\n"
        "result = score(features)\nscaled = weights * factor\ncount = len(features)\n",
        name="scoring.ipynb",
    )
    return client.create_checkpoint(path, name="scoring-checkpoint")


def test_checkpoint_records_state(scoring: dict[str, Any]) -> None:
    names = {v["name"] for v in scoring["variables"]}
    assert {"weights", "bias", "score", "features", "result", "scaled", "factor"} <= names
    assert scoring["imports"] == {"np": "numpy"}
    assert [u["name"] for u in scoring["unserializable"]] == ["log"]
    assert "TextIOWrapper" in scoring["unserializable"][0]["reason"]
    assert scoring["cell"] == 2 and "def score" in scoring["cell_source"]
    assert "features = " not in scoring["cell_source"]
    assert any(p.startswith("numpy==") for p in scoring["packages"])
    assert all(len(v["sha256"]) == 64 and v["size"] > 0 for v in scoring["variables"])


def test_numpy_node(client: Client, scoring: dict[str, Any]) -> None:
    """A function reading globals, numpy arrays and scalars in the outputs."""
    node = client.create_node(
        "scoring-node",
        checkpoint="scoring-checkpoint",
        inputs={"features": "list", "factor": "float"},
        outputs={"result": "float", "scaled": "list", "count": "int"},
    )
    output = client.execute(node["id"], {"features": [2.0, 0.0, 1.0], "factor": 0.5})
    assert output["result"] == pytest.approx(float(np.dot([0.5, 1.5, 2.0], [2.0, 0.0, 1.0]) + 0.25))
    assert output["scaled"] == [0.25, 0.75, 1.0]
    assert output["count"] == 3
    client.delete_node("scoring-node")


@pytest.mark.parametrize(
    ("inputs", "outputs", "error", "fragment"),
    [
        ({"features": "list"}, {"features": "list"}, InvalidArgument, "both an input and an output"),
        ({"features": "list"}, {"weights": "list"}, InvalidArgument, "'weights' is never assigned"),
        ({"features": "list", "result": "float"}, {"count": "int"}, InvalidArgument, "assigns input variable 'result'"),
        ({"features": "list", "Bad-Name": "int"}, {"result": "float"}, InvalidArgument, "not a Python identifier"),
        (
            {"features": "tensor"},
            {"result": "float"},
            InvalidArgument,
            "variable 'features' has type 'tensor'; use one of",
        ),
        ({"features": "list", "features ": "list"}, {"result": "float"}, InvalidArgument, "identifier"),
    ],
)
def test_create_refuses_broken_declarations(
    client: Client,
    scoring: dict[str, Any],
    inputs: dict[str, str],
    outputs: dict[str, str],
    error: type[Exception],
    fragment: str,
) -> None:
    with pytest.raises(error, match=fragment):
        client.create_node("broken-node", checkpoint="scoring-checkpoint", inputs=inputs, outputs=outputs)
    with pytest.raises(NotFound):
        client.get_node("broken-node")


def test_create_names_an_unresolved_global(client: Client, tmp_path: Path) -> None:
    """A global read only inside a function that capture never called: neither an input nor in the checkpoint."""
    path = notebook(tmp_path, "x = 1", "def check():\n    return threshold\n\ny = x + 1", name="later.ipynb")
    checkpoint = client.create_checkpoint(path, name="later-checkpoint")
    with pytest.raises(InvalidArgument, match=r"reads 'threshold', which is neither an input .*--input threshold:TYPE"):
        client.create_node("later-node", checkpoint=checkpoint["id"], inputs={"x": "int"}, outputs={"y": "int"})
    client.delete_checkpoint(checkpoint["id"])


def test_create_names_an_unserializable_global(client: Client, tmp_path: Path) -> None:
    path = notebook(tmp_path, "handle = open('x.txt', 'w')", "size = handle.write('abc')", name="files.ipynb")
    checkpoint = client.create_checkpoint(path, name="files-checkpoint")
    with pytest.raises(InvalidArgument, match=r"reads 'handle', which could not be serialized .*TextIOWrapper"):
        client.create_node("files-node", checkpoint=checkpoint["id"], inputs={}, outputs={"size": "int"})
    client.delete_checkpoint(checkpoint["id"])


def test_only_pinned_checkpoints_back_nodes(client: Client, tmp_path: Path) -> None:
    path = notebook(tmp_path, "x = 1", "y = x + 1", name="unpinned.ipynb")
    checkpoint = client.create_checkpoint(path)
    assert checkpoint["pinned"] is False and checkpoint["name"] is None
    with pytest.raises(FailedPrecondition, match="not pinned"):
        client.create_node("unpinned-node", checkpoint=checkpoint["id"], inputs={"x": "int"}, outputs={"y": "int"})
    pinned = client.pin_checkpoint(checkpoint["id"], "pinned-later")
    assert pinned["pinned"] and pinned["name"] == "pinned-later"
    node = client.create_node("pinned-node", checkpoint="pinned-later", inputs={"x": "int"}, outputs={"y": "int"})
    assert client.execute("pinned-node", {"x": 41}) == {"y": 42}
    with pytest.raises(FailedPrecondition, match=r"backs node\(s\) pinned-node"):
        client.unpin_checkpoint("pinned-later")
    with pytest.raises(FailedPrecondition, match=r"backs node\(s\) pinned-node"):
        client.delete_checkpoint("pinned-later")
    with pytest.raises(AlreadyExists, match="already has a node named 'pinned-node'"):
        client.create_node("pinned-node", checkpoint="pinned-later", inputs={"x": "int"}, outputs={"y": "int"})
    deleted = client.delete_node(node["id"])
    assert deleted["status"] == "DELETING"
    with pytest.raises(NotFound):
        client.get_node(node["id"])
    client.delete_checkpoint("pinned-later")


def test_list_get_and_ids(client: Client, randomizer: dict[str, Any]) -> None:
    assert len(randomizer["id"]) == 20 and randomizer["id"].isalnum() and randomizer["id"].islower()
    assert randomizer["id"] in {n["id"] for n in client.list_nodes()}
    assert client.get_node("randomizer-node")["id"] == randomizer["id"]
    assert client.get_node(randomizer["id"])["status"] == "HEALTHY"
    assert randomizer["acl"] == [randomizer["folder_id"]]
    with pytest.raises(NotFound, match="Node 'nope' not found"):
        client.get_node("nope")


def test_node_openapi_has_typed_variables(client: Client, randomizer: dict[str, Any]) -> None:
    document = client.node_openapi("randomizer-node")
    schemas = document["components"]["schemas"]
    assert schemas["RandomizerNodeInput"]["properties"] == {"input_data": {"type": "object", "x-cellnode-type": "dict"}}
    assert schemas["RandomizerNodeInput"]["required"] == ["input_data"]
    assert schemas["RandomizerNodeOutput"]["properties"]["output_data"]["type"] == "object"
    assert f"/datasphere/v1/nodes/{randomizer['id']}:execute" in document["paths"]


def test_management_openapi_and_docs(server: ServerProcess) -> None:
    document = httpx.get(server.url + "/openapi.json").json()
    assert "/cellnode/v1/nodes" in document["paths"]
    assert "swagger-ui" in httpx.get(server.url + "/docs").text


def test_management_routes_need_a_credential(server: ServerProcess) -> None:
    for path in ("/cellnode/v1/nodes", "/cellnode/v1/checkpoints", "/cellnode/v1/folders"):
        response = httpx.get(server.url + path)
        assert response.status_code == 401
        assert response.json()["code"] == 16
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def _raw_post(server: ServerProcess, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """POST with a declared body that never comes: the answer must not wait for it."""
    import json
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n{{".encode())
        reader = sock.makefile("rb")
        status = int(reader.readline().split()[1])
        length = 0
        while (line := reader.readline().strip()) != b"":
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, json.loads(reader.read(length))


def test_management_checks_credential_and_size_before_reading(server: ServerProcess) -> None:
    big = {"Content-Type": "application/json", "Content-Length": str(100 * 1024 * 1024)}
    code, body = _raw_post(server, "/cellnode/v1/checkpoints", big)
    assert code == 401 and body["code"] == 16
    code, body = _raw_post(server, "/cellnode/v1/checkpoints", {**big, "Authorization": f"Api-Key {server.key}"})
    assert code == 413 and "64 MB limit" in body["message"]
    assert httpx.get(server.url + "/redoc").status_code == 404
