"""The execute API against a real server, a real kernel and a real instance: the reference call and every error."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from cellnode.exceptions import EXECUTION_ERROR_TYPE
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow

# The body of the documented curl call, byte for byte but for the folder ID.
REFERENCE_BODY = """{
           "folder_id": "<folder ID>",
           "input": {
             "input_data": {
               "left_bound": 1,
               "right_bound": 10
             }
           }
         }"""
INPUT = {"input_data": {"left_bound": 1, "right_bound": 10}}


@pytest.fixture(scope="module")
def http(server: ServerProcess, client: Client) -> Iterator[httpx.Client]:
    token = client.create_token()["iam_token"]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as session:
        yield session


def status(response: httpx.Response, code: int, grpc_code: int, *fragments: str) -> dict[str, Any]:
    """Assert a google.rpc.Status error body with these codes and a message holding each fragment."""
    assert response.status_code == code, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == grpc_code
    assert response.headers["x-cellnode-error"] == body["details"][0]["reason"], "cellnode's own error, marked"
    for fragment in fragments:
        assert fragment in body["message"], body["message"]
    return body


def still_serves(http: httpx.Client, node: dict[str, Any]) -> None:
    response = http.post(
        f"/datasphere/v1/nodes/{node['id']}:execute", json={"folder_id": node["folder_id"], **{"input": INPUT}}
    )
    assert response.status_code == 200, response.text
    assert 1 <= response.json()["output"]["output_data"]["generated_value"] <= 10


def test_reference_curl_call(http: httpx.Client, randomizer: dict[str, Any]) -> None:
    """The documented call: Bearer token, folder_id and input in the body; numbers from 1 to 10."""
    seen = set()
    for _ in range(40):
        response = http.post(
            f"/datasphere/v1/nodes/{randomizer['id']}:execute",
            content=REFERENCE_BODY.replace("<folder ID>", randomizer["folder_id"]),
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert list(body) == ["output"]
        value = body["output"]["output_data"]["generated_value"]
        assert 1 <= value <= 10
        seen.add(value)
    assert len(seen) > 1, "the seed() in the cell should give different numbers"


def test_bounds_are_honoured_and_camel_case_accepted(http: httpx.Client, randomizer: dict[str, Any]) -> None:
    response = http.post(
        f"/datasphere/v1/nodes/{randomizer['id']}:execute",
        json={
            "folderId": randomizer["folder_id"],
            "node_id": randomizer["id"],
            "input": {"input_data": {"left_bound": 7, "right_bound": 7}},
        },
    )
    assert response.json() == {"output": {"output_data": {"generated_value": 7}}}


def test_header_form(http: httpx.Client, randomizer: dict[str, Any]) -> None:
    response = http.post(
        "/", headers={"x-node-id": randomizer["id"], "x-folder-id": randomizer["folder_id"]}, json=INPUT
    )
    assert response.status_code == 200, response.text
    assert 1 <= response.json()["output"]["output_data"]["generated_value"] <= 10


def test_api_key_authorization(server: ServerProcess, randomizer: dict[str, Any]) -> None:
    response = httpx.post(
        f"{server.url}/datasphere/v1/nodes/{randomizer['id']}:execute",
        headers={"Authorization": f"Api-Key {server.key}"},
        json={"folder_id": randomizer["folder_id"], "input": INPUT},
    )
    assert response.status_code == 200, response.text


def test_malformed_json(http: httpx.Client, randomizer: dict[str, Any]) -> None:
    url = f"/datasphere/v1/nodes/{randomizer['id']}:execute"
    status(http.post(url, content=b'{"folder_id": '), 400, 3, "not valid JSON")
    status(http.post(url, json=[1, 2]), 400, 3, "must be a JSON object", "got list")
    status(http.post(url, json={"folder_id": randomizer["folder_id"], "input": 5}), 400, 3, "'input' must be")
    status(http.post(url, json={"folder": "x", "input": INPUT}), 400, 3, "Unknown field 'folder'")
    status(http.post(url, json={"node_id": "other", "input": INPUT}), 400, 3, "node_id 'other'")
    still_serves(http, randomizer)


@pytest.mark.parametrize(
    ("inputs", "fragments"),
    [
        ({}, ["Input variable 'input_data' is missing", "input_data (dict)"]),
        ({**INPUT, "extra": 1}, ["Unknown input variable 'extra'", "input_data (dict)"]),
        ({"input_data": [1, 10]}, ["Input variable 'input_data' must be a dict; got list [1, 10]"]),
    ],
)
def test_bad_input_variables(
    http: httpx.Client, randomizer: dict[str, Any], inputs: dict[str, Any], fragments: list[str]
) -> None:
    response = http.post(
        f"/datasphere/v1/nodes/{randomizer['id']}:execute", json={"folder_id": randomizer["folder_id"], "input": inputs}
    )
    status(response, 400, 3, *fragments)
    still_serves(http, randomizer)


def test_unknown_node(http: httpx.Client, randomizer: dict[str, Any]) -> None:
    response = http.post("/datasphere/v1/nodes/aaaaaaaaaaaaaaaaaaaa:execute", json={"folder_id": "f", "input": {}})
    status(response, 404, 5, "Node 'aaaaaaaaaaaaaaaaaaaa' not found")
    status(http.post("/", json={}), 400, 3, "x-node-id")


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "no credential"),
        ("Bearer t1.not-a-real-token", "IAM token is not valid"),
        ("Api-Key cnk_wrong", "API key is not valid"),
        ("Basic dXNlcjpwYXNz", "must be 'Bearer <IAM token>' or 'Api-Key <key>'"),
        ("Bearer", "no single credential"),
    ],
)
def test_bad_credentials(server: ServerProcess, randomizer: dict[str, Any], header: str | None, fragment: str) -> None:
    headers = {"Authorization": header} if header else {}
    response = httpx.post(
        f"{server.url}/datasphere/v1/nodes/{randomizer['id']}:execute",
        headers=headers,
        json={"folder_id": randomizer["folder_id"], "input": INPUT},
    )
    status(response, 401, 16, fragment)


def test_folder_not_in_acl(http: httpx.Client, randomizer: dict[str, Any]) -> None:
    url = f"/datasphere/v1/nodes/{randomizer['id']}:execute"
    status(http.post(url, json={"folder_id": "bbbbbbbbbbbbbbbbbbbb", "input": INPUT}), 403, 7, "'bbbbbbbbbbbbbbbbbbbb'")
    status(http.post(url, json={"input": INPUT}), 400, 3, "names no folder")
    response = http.post(
        "/", headers={"x-node-id": randomizer["id"], "x-folder-id": "cccccccccccccccccccc"}, json=INPUT
    )
    status(response, 403, 7, "not in the ACL")
    still_serves(http, randomizer)


def test_body_over_16_mb(http: httpx.Client, randomizer: dict[str, Any]) -> None:
    big = b'{"folder_id": "x", "input": {"input_data": "' + b"a" * (16 * 1024 * 1024) + b'"}}'
    status(http.post(f"/datasphere/v1/nodes/{randomizer['id']}:execute", content=big), 413, 8, "16 MB")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        yield big[: len(big) // 2]
        yield big[len(big) // 2 :]

    status(http.post(f"/datasphere/v1/nodes/{randomizer['id']}:execute", content=chunks()), 413, 8, "16 MB")
    still_serves(http, randomizer)


@pytest.fixture(scope="module")
def tricky(client: Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A node whose input picks a failure: raise, leave a bad output, or sleep past the timeout."""
    path = notebook(
        tmp_path_factory.mktemp("tricky"),
        "import time\nmode = 'ok'",
        "if mode == 'raise':\n    1 / 0\n"
        "elif mode == 'sleep':\n    time.sleep(30)\n"
        "result = {'ok': 1, 'raise': 0, 'sleep': 0, 'bad': {1, 2}}.get(mode, 'text')\n"
        "if mode == 'missing':\n    del result\n",
    )
    client.create_checkpoint(path, name="tricky-checkpoint")
    return client.create_node(
        "tricky-node", checkpoint="tricky-checkpoint", inputs={"mode": "str"}, outputs={"result": "int"}, timeout=1.5
    )


def call(http: httpx.Client, node: dict[str, Any], mode: str) -> httpx.Response:
    return http.post(
        f"/datasphere/v1/nodes/{node['id']}:execute", json={"folder_id": node["folder_id"], "input": {"mode": mode}}
    )


def test_exception_in_cell(http: httpx.Client, tricky: dict[str, Any]) -> None:
    body = status(call(http, tricky, "raise"), 500, 2, "ZeroDivisionError", "division by zero")
    details = [d for d in body["details"] if d["@type"] == EXECUTION_ERROR_TYPE]
    assert details[0]["error_name"] == "ZeroDivisionError"
    assert details[0]["error_message"] == "division by zero"
    assert any("<cell>" in line for line in details[0]["traceback"])
    assert call(http, tricky, "ok").json() == {"output": {"result": 1}}


@pytest.mark.parametrize(
    ("mode", "fragment"),
    [
        ("missing", "Output variable 'result' was not assigned"),
        ("other", "Output variable 'result' must be an int"),
        ("bad", "cannot be returned as JSON"),
    ],
)
def test_bad_output(http: httpx.Client, tricky: dict[str, Any], mode: str, fragment: str) -> None:
    status(call(http, tricky, mode), 500, 13, fragment)
    assert call(http, tricky, "ok").json() == {"output": {"result": 1}}


def test_timeout(http: httpx.Client, tricky: dict[str, Any]) -> None:
    status(call(http, tricky, "sleep"), 504, 4, "timeout of 1.5 s")
    assert call(http, tricky, "ok").json() == {"output": {"result": 1}}


def test_no_ready_instance(http: httpx.Client, client: Client, server: ServerProcess, tmp_path: Path) -> None:
    """A node whose checkpoint blob is corrupt FAILS with the reason; calling it gives 503, and nothing else breaks."""
    path = notebook(tmp_path, f"payload = 'unique-{tmp_path.name}'", "answer = payload.upper()")
    checkpoint = client.create_checkpoint(path, name="corrupt-checkpoint")
    sha = next(v["sha256"] for v in checkpoint["variables"] if v["name"] == "payload")
    blob = server.data_dir / "blobs" / "sha256" / sha[:2] / sha
    blob.write_bytes(b"garbage")
    node = client.create_node(
        "corrupt-node", checkpoint="corrupt-checkpoint", inputs={}, outputs={"answer": "str"}, wait=False
    )
    with pytest.raises(Exception, match="corrupt"):
        client.wait_node(node["id"], timeout=60)
    found = client.get_node(node["id"])
    assert found["status"] == "FAILED"
    assert "payload" in found["status_message"]
    response = http.post(
        f"/datasphere/v1/nodes/{node['id']}:execute", json={"folder_id": node["folder_id"], "input": {}}
    )
    body = status(response, 503, 14, "has failed", "retrying will not help")
    assert "payload" not in body["message"], "the reason (which can quote the node's log) is for the owner only"
    client.delete_node(node["id"])
    client.delete_checkpoint("corrupt-checkpoint")


def test_cell_output_goes_to_the_node_log(
    http: httpx.Client, server: ServerProcess, randomizer: dict[str, Any]
) -> None:
    """The randomizer prints its result: the print lands in the node's log, never in the response."""
    response = http.post(
        f"/datasphere/v1/nodes/{randomizer['id']}:execute",
        json={"folder_id": randomizer["folder_id"], "input": {"input_data": {"left_bound": 4242, "right_bound": 4242}}},
    )
    assert response.json() == {"output": {"output_data": {"generated_value": 4242}}}
    assert "4242" not in response.text.replace('"generated_value":4242', "")
    logs = server.data_dir / "logs" / randomizer["id"]
    deadline = time.monotonic() + 10  # a request's lines are written just after its answer
    while not any("{'generated_value': 4242}" in path.read_text() for path in logs.glob("*.log*")):
        assert time.monotonic() < deadline, "the cell's print reaches the node's log"
        time.sleep(0.05)


def test_ipython_syntax_in_the_deployed_cell(http: httpx.Client, client: Client, tmp_path: Path) -> None:
    path = notebook(tmp_path, "base = 10\nx = 2", "%time total = base + x\nsquares = [i * i for i in range(x)]")
    client.create_checkpoint(path, name="magic-checkpoint")
    node = client.create_node(
        "magic-node", checkpoint="magic-checkpoint", inputs={"x": "int"}, outputs={"total": "int", "squares": "list"}
    )
    response = http.post(
        f"/datasphere/v1/nodes/{node['id']}:execute", json={"folder_id": node["folder_id"], "input": {"x": 3}}
    )
    assert response.json() == {"output": {"total": 13, "squares": [0, 1, 4]}}
    client.delete_node(node["id"])
    client.delete_checkpoint("magic-checkpoint")


def test_other_methods_and_paths_fall_through_to_the_api(http: httpx.Client, randomizer: dict[str, Any]) -> None:
    status(http.get(f"/datasphere/v1/nodes/{randomizer['id']}:execute"), 405, 12, "Method GET is not allowed")
    status(http.post("/datasphere/v1/nodes/a/b:execute", json={}), 404, 5, "No route POST")
    assert http.get("/health").json()["status"] == "ok"
