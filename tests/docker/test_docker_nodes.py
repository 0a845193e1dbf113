"""Docker nodes through a real `cellnode serve` and a real engine: created by the API, their instances run as
containers on loopback, requests pass through by header (node and alias), health checks move instances in and out
of rotation, a killed container is replaced, the endpoint timeout answers 504, registry credentials come from a
secret."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cellnode.client import Client
from tests.docker_engine import Engine
from tests.docker_images import add_file_layer
from tests.docker_registry import Registry, push_image
from tests.helpers import ServerProcess, notebook

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(900)]

EXAMPLE = Path(__file__).parents[2] / "examples" / "docker-node" / "app.py"
EXAMPLE_IMAGE = "cellnode-test/example:1"
TOOLS_IMAGE = "cellnode-test/tools:1"
RUN_EXAMPLE = ["python3", "/app/app.py"]
RUN_TOOLS = ["sh", "-c", 'exec python3 -m uvicorn tools:app --app-dir /app --host "$CELLNODE_HOST" --port "$PORT"']
RUN_TOOLS_H2 = ["sh", "-c", 'cd /app && exec python3 -m hypercorn --bind "$CELLNODE_HOST:$PORT" tools:app']

# An ASGI service with the switches the tests need: a health check that can be made to fail, a slow path, echo.
TOOLS = """\
import asyncio, json, os

state = {"healthy": True}


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    path, status, answer = scope["path"], 200, b""
    if path == "/health-check":
        status = 200 if state["healthy"] else 503
    elif path == "/unhealthy":
        state["healthy"] = False
        answer = json.dumps({"instance": os.environ["CELLNODE_INSTANCE_ID"]}).encode()
    elif path == "/sleep":
        await asyncio.sleep(float(scope["query_string"].decode().partition("=")[2] or 1))
    elif path.startswith("/echo"):
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        answer = json.dumps({
            "method": scope["method"], "path": path, "query": scope["query_string"].decode(), "headers": headers,
            "body": body.decode(), "http_version": scope["http_version"],
            "instance": os.environ["CELLNODE_INSTANCE_ID"],
        }).encode()
    else:
        status = 404
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})
"""


# A gRPC service of its own: grpc.health.v1, and /demo.Echo/Say (unary) and /demo.Echo/Count (server streaming)
# over raw bytes.
GRPC_SERVICE = """\
import os
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def say(request, context):
    context.set_trailing_metadata((("x-said-by", os.environ["CELLNODE_INSTANCE_ID"]),))
    return request[::-1]


def count(request, context):
    for number in range(int(request)):
        yield str(number).encode()


handlers = {"Say": grpc.unary_unary_rpc_method_handler(say), "Count": grpc.unary_stream_rpc_method_handler(count)}
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Echo", handlers),))
checks = health.HealthServicer()
checks.set("", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(checks, server)
server.add_insecure_port(f"{os.environ['CELLNODE_HOST']}:{os.environ['PORT']}")
server.start()
server.wait_for_termination()
"""
GRPC_IMAGE = "cellnode-test/grpc-service:1"


@pytest.fixture(scope="module")
def images(docker_engine: Engine, service_image: str) -> dict[str, str]:
    add_file_layer(docker_engine, service_image, "/app/app.py", EXAMPLE.read_bytes(), EXAMPLE_IMAGE)
    add_file_layer(docker_engine, service_image, "/app/tools.py", TOOLS.encode(), TOOLS_IMAGE)
    add_file_layer(docker_engine, service_image, "/app/grpc_service.py", GRPC_SERVICE.encode(), GRPC_IMAGE)
    return {"example": EXAMPLE_IMAGE, "tools": TOOLS_IMAGE}


@pytest.fixture(scope="module")
def server(docker_engine: Engine, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    env = {"DOCKER_HOST": docker_engine.host, "CELLNODE_TELEMETRY_INTERVAL": "0.5"}
    process = ServerProcess(tmp_path_factory.mktemp("server"), env=env, args=("--grpc-port", "0")).start()
    yield process
    process.stop()
    left = docker_engine.client.containers.list(all=True, filters={"label": "cellnode.owner"})
    assert not left, f"containers left after the server stopped: {[c.name for c in left]}"


class Api:
    """The management API and the header-routed requests, as a user's HTTP client makes them."""

    def __init__(self, server: ServerProcess) -> None:
        self.url = server.url
        self.docker_host = server.env["DOCKER_HOST"]
        self.http = httpx.Client(base_url=server.url, headers={"authorization": f"Api-Key {server.key}"}, timeout=60)
        self.folder = self.http.get("/cellnode/v1/folders").json()["folders"][0]["id"]

    def create(self, name: str, container: dict[str, Any], **fields: Any) -> dict[str, Any]:
        answer = self.http.post("/cellnode/v1/nodes", json={"name": name, "container": container, **fields})
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def node(self, ref: str) -> dict[str, Any]:
        return dict(self.http.get(f"/cellnode/v1/nodes/{ref}").json())

    def wait(self, ref: str, status: str = "HEALTHY", timeout: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (node := self.node(ref))["status"] != status:
            assert time.monotonic() < deadline, f"node still {node['status']}: {node}"
            assert node["status"] != "FAILED" or status == "FAILED", node["status_message"]
            time.sleep(0.2)
        return node

    def call(self, node_id: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"x-node-id": node_id, "x-folder-id": self.folder, **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def delete(self, ref: str) -> None:
        self.http.delete(f"/cellnode/v1/nodes/{ref}")
        deadline = time.monotonic() + 60
        while self.http.get(f"/cellnode/v1/nodes/{ref}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.2)


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> Iterator[Api]:
    client = Api(server)
    yield client
    client.http.close()


def _samples(text: str, name: str, node_id: str) -> dict[str, float]:
    """The values of a metric's samples of one node, by instance."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("node_id") == node_id:
                found[sample.labels["instance_id"]] = sample.value
    return found


def _example(**extra: Any) -> dict[str, Any]:
    return {
        "image": EXAMPLE_IMAGE,
        "port": 9875,
        "command": RUN_EXAMPLE,
        "healthcheck": {"type": "http", "path": "/health-check", "interval": 1, "timeout": 1},
        "telemetry": {"path": "/metrics"},
        **extra,
    }


def _tools(**extra: Any) -> dict[str, Any]:
    return {"image": TOOLS_IMAGE, "port": 8080, "command": RUN_TOOLS, **extra}


def test_the_example_node_serves_through_the_header_form_on_two_instances(api: Api, docker_engine: Engine) -> None:
    created = api.create("example", _example(), instance_count=2)
    assert created["type"] == "docker" and created["timeout"] == 15.0 and created["state"] is None
    assert created["container"]["healthcheck"]["port"] == 9875  # the endpoint's, by default
    node = api.wait(created["id"])
    assert [i["status"] for i in node["instances"]] == ["HEALTHY", "HEALTHY"]

    seen = set()
    for _ in range(8):
        answer = api.call(node["id"], "POST", "/predict", json={"values": [1, 2, 3]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["sum"] == 6 and answer.headers["x-request-id"]
        seen.add(answer.json()["instance"])
    assert seen == {i["id"] for i in node["instances"]}  # both instances took requests
    assert api.call(node["id"], "GET", "/health-check").json() == {"status": "ok"}
    # The service's own errors come back as they are.
    assert api.call(node["id"], "POST", "/predict", json={"values": []}).status_code == 422

    # Each instance's own metrics, scraped onto cellnode's /metrics with the node's and the instance's IDs.
    deadline = time.monotonic() + 10
    counts: dict[str, float] = {}
    while sum(counts.values()) < 8:
        assert time.monotonic() < deadline, counts
        time.sleep(0.3)
        counts = _samples(api.http.get("/metrics").text, "predictions_total", node["id"])
    assert set(counts) == seen
    containers = docker_engine.client.containers.list(filters={"label": f"cellnode.node_id={node['id']}"})
    assert len(containers) == 2
    assert {c.attrs["HostConfig"]["NetworkMode"] for c in containers} == {"host"}


def test_requests_are_authenticated_and_checked_against_the_acl(api: Api) -> None:
    node = api.wait("example")
    anonymous = httpx.post(api.url + "/predict", headers={"x-node-id": node["id"], "x-folder-id": api.folder})
    assert anonymous.status_code == 401
    stranger = api.call(node["id"], "POST", "/predict", json={"values": [1]}, headers={"x-folder-id": "nope"})
    assert stranger.status_code == 403 and "not in the ACL" in stranger.json()["message"]
    unknown = api.call("nosuchnode", "GET", "/")
    assert unknown.status_code == 404
    both = api.call(node["id"], "GET", "/health-check", headers={"x-node-alias": "datasphere.user.any"})
    assert both.status_code == 400 and "send one of the two" in both.json()["message"]
    # The execute API is for cell nodes, and says where a docker node's requests go.
    execute = api.http.post(f"/datasphere/v1/nodes/{node['id']}:execute", json={"folder_id": api.folder, "input": {}})
    assert execute.status_code == 409 and "x-node-id" in execute.json()["message"]


def test_a_passed_through_request_keeps_method_path_query_headers_and_body(api: Api) -> None:
    node = api.wait(api.create("tools", _tools(), instance_count=1)["id"])
    answer = api.call(
        node["id"], "PUT", "/echo/a%2Fb", params={"q": "1", "r": "x y"}, content=b"payload", headers={"x-mine": "v"}
    )
    assert answer.status_code == 200, answer.text
    echoed = answer.json()
    assert echoed["method"] == "PUT" and echoed["path"] == "/echo/a/b" and echoed["query"] == "q=1&r=x+y"
    assert echoed["body"] == "payload" and echoed["headers"]["x-mine"] == "v"
    assert "authorization" not in echoed["headers"]  # the caller's credential is cellnode's, not the service's
    assert echoed["headers"]["x-request-id"] == answer.headers["x-request-id"]


def test_past_the_endpoint_timeout_the_answer_is_504(api: Api) -> None:
    node = api.wait(api.create("slow", _tools(), timeout=1)["id"])
    started = time.monotonic()
    answer = api.call(node["id"], "GET", "/sleep", params={"s": "5"})
    assert answer.status_code == 504 and time.monotonic() - started < 4
    assert "timeout of 1 s" in answer.json()["message"]
    assert api.call(node["id"], "GET", "/sleep", params={"s": "0.1"}).status_code == 200
    api.delete(node["id"])


def test_a_failing_health_check_takes_an_instance_out_of_rotation(api: Api) -> None:
    check = {"type": "http", "path": "/health-check", "interval": 0.5, "timeout": 0.4, "fails_threshold": 2}
    node = api.wait(api.create("checked", _tools(healthcheck=check), instance_count=2)["id"])
    sick = api.call(node["id"], "POST", "/unhealthy").json()["instance"]  # its check fails from now on
    deadline = time.monotonic() + 30
    while {i["id"]: i["status"] for i in api.node(node["id"])["instances"]}.get(sick) != "UNHEALTHY":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    found = api.node(node["id"])
    states = {i["id"]: i for i in found["instances"]}
    assert states[sick]["status"] == "UNHEALTHY" and "health check" in states[sick]["last_error"]
    assert found["status"] == "UNHEALTHY"  # fewer healthy instances than its minimum (2)
    # Every request now goes to the healthy one.
    assert {api.call(node["id"], "GET", "/echo").json()["instance"] for _ in range(6)} == set(states) - {sick}


def test_a_killed_container_is_replaced(api: Api, docker_engine: Engine) -> None:
    node = api.wait("tools")
    victim = node["instances"][0]["id"]
    docker_engine.client.containers.get(f"cellnode-{victim}").kill()
    deadline = time.monotonic() + 60
    while True:
        found = api.node(node["id"])
        ids = [i["id"] for i in found["instances"] if i["status"] == "HEALTHY"]
        if found["status"] == "HEALTHY" and ids and victim not in ids:
            break
        assert time.monotonic() < deadline, found
        time.sleep(0.3)
    assert found["instances"][0]["restarts"] == 1 and "exited with code 137" in found["instances"][0]["last_error"]
    assert api.call(node["id"], "GET", "/echo").status_code == 200


def test_an_alias_routes_by_header_and_names_the_node(api: Api) -> None:
    node = api.wait("tools")
    created = api.http.post(
        "/cellnode/v1/aliases", json={"name": "tools-alias", "nodes": [{"node": "tools", "percent": 100}]}
    )
    assert created.status_code == 200, created.text
    answer = api.http.get("/echo/x", headers={"x-node-alias": "datasphere.user.tools-alias", "x-folder-id": api.folder})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-node-id"] == node["id"] and answer.json()["path"] == "/echo/x"
    metrics = api.http.get("/metrics").text
    assert 'alias_requests_total{alias_name="datasphere.user.tools-alias"' in metrics
    # One kind of node per alias, and no mirrors for docker nodes.
    api.create("grpc-kind", _tools(endpoint="grpc", port=50051), instance_count=1)
    mixed = api.http.patch(
        "/cellnode/v1/aliases/tools-alias",
        json={"nodes": [{"node": "tools", "percent": 50}, {"node": "grpc-kind", "percent": 50}]},
    )
    assert mixed.status_code == 400 and "of one kind" in mixed.json()["message"], mixed.text
    mirrored = api.http.patch(
        "/cellnode/v1/aliases/tools-alias", json={"mirrors": [{"node": "example", "percent": 10}]}
    )
    assert mirrored.status_code == 400 and "no --mirror" in mirrored.json()["message"], mirrored.text
    api.delete("grpc-kind")


def test_http2_endpoints_are_spoken_to_in_h2c(api: Api) -> None:
    node = api.wait(api.create("tools-h2", _tools(endpoint="http2", command=RUN_TOOLS_H2))["id"])
    echoed = api.call(node["id"], "POST", "/echo", content=b"over h2").json()
    assert echoed["http_version"] == "2" and echoed["body"] == "over h2"


def test_an_image_from_a_registry_is_pulled_with_the_secrets_password(
    api: Api, docker_engine: Engine, registry: Registry
) -> None:
    repository = f"{registry.address}/team/tools"
    docker_engine.client.images.get(TOOLS_IMAGE).tag(repository, "1")
    push_image(docker_engine, repository, "1", registry.auth_config)
    docker_engine.client.images.remove(f"{repository}:1")  # the node must pull it
    secret = api.http.post("/cellnode/v1/secrets", json={"name": "REGISTRY_PASSWORD", "value": registry.password})
    assert secret.status_code == 200, secret.text
    wrong = api.http.post("/cellnode/v1/secrets", json={"name": "WRONG_PASSWORD", "value": "not-it"})
    assert wrong.status_code == 200, wrong.text
    registry_fields = {"registry_username": registry.user, "registry_password_secret": "REGISTRY_PASSWORD"}

    wrong_fields = {**registry_fields, "registry_password_secret": "WRONG_PASSWORD"}
    refused = api.create("pulled-wrong", _tools(image=f"{repository}:1", **wrong_fields))
    failed = api.wait(refused["id"], "FAILED", timeout=60)
    assert "refused the credentials" in failed["status_message"] and "not-it" not in failed["status_message"]

    pulled = api.create("pulled", _tools(image=f"{repository}:1", **registry_fields))
    assert pulled["container"]["registry_password_secret"] == "REGISTRY_PASSWORD"
    assert registry.password not in str(pulled)
    node = api.wait(pulled["id"])
    assert api.call(node["id"], "GET", "/echo").status_code == 200
    # A secret a node pulls with cannot be deleted.
    assert api.http.delete("/cellnode/v1/secrets/REGISTRY_PASSWORD").status_code == 409


def test_a_missing_image_fails_the_node_at_once(api: Api, registry: Registry) -> None:
    # From the local registry: an image name without a registry would be looked up on Docker Hub (the tests'
    # engine refuses that, through a proxy that answers nothing).
    image = f"{registry.address}/team/does-not-exist:1"
    secret = api.http.post("/cellnode/v1/secrets", json={"name": "MISSING_PASSWORD", "value": registry.password})
    assert secret.status_code == 200, secret.text
    credentials = {"registry_username": registry.user, "registry_password_secret": "MISSING_PASSWORD"}
    node = api.create("missing", _tools(image=image, **credentials))
    failed = api.wait(node["id"], "FAILED", timeout=60)
    assert f"Image {image!r} does not exist" in failed["status_message"]
    assert len(failed["instances"]) == 1 and failed["instances"][0]["restarts"] == 0
    assert "has failed" in api.call(node["id"], "GET", "/echo").json()["message"]
    # An update is the owner's way to try again.
    api.http.patch(f"/cellnode/v1/nodes/{node['id']}", json={"container": {"image": TOOLS_IMAGE}})
    api.wait(node["id"])
    assert api.call(node["id"], "GET", "/echo").status_code == 200
    api.delete(node["id"])


def test_suspend_resume_and_delete_stop_the_containers(api: Api, docker_engine: Engine) -> None:
    node = api.wait("tools-h2")
    label: dict[str, str | list[str] | bool] = {"label": f"cellnode.node_id={node['id']}"}
    api.http.post(f"/cellnode/v1/nodes/{node['id']}:suspend")
    api.wait(node["id"], "SUSPENDED")
    assert docker_engine.client.containers.list(all=True, filters=label) == []
    assert api.call(node["id"], "GET", "/echo").status_code == 503
    api.http.post(f"/cellnode/v1/nodes/{node['id']}:resume")
    api.wait(node["id"])
    assert api.call(node["id"], "GET", "/echo").status_code == 200
    api.delete(node["id"])
    assert docker_engine.client.containers.list(all=True, filters=label) == []


def test_a_cell_node_runs_in_its_kernel_image(
    api: Api, server: ServerProcess, python_image: str, tmp_path: Path
) -> None:
    """The image has python3 and nothing else: no cellnode, no cloudpickle; the checkpoint is served from it."""
    with server.client() as client:
        _kernel_image_node(api, client, python_image, tmp_path)


def _kernel_image_node(api: Api, client: Client, python_image: str, tmp_path: Path) -> None:
    path = notebook(
        tmp_path,
        "x = 1\nscale = 3\ndef triple(x):\n    return x * scale",
        "import sys\nprint('running on', sys.executable)\ny = triple(x)",
    )
    client.create_checkpoint(path, name="kernel-checkpoint")
    created = api.http.post(
        "/cellnode/v1/nodes",
        json={
            "name": "in-kernel-image",
            "checkpoint": "kernel-checkpoint",
            "inputs": [{"name": "x", "type": "int"}],
            "outputs": [{"name": "y", "type": "int"}],
            "kernel_image": {"image": python_image},
        },
    )
    assert created.status_code == 200, created.text
    assert created.json()["kernel_image"] == {
        "image": python_image,
        "registry_username": None,
        "registry_password_secret": None,
    }
    node = api.wait(created.json()["id"])
    assert client.execute(node["id"], {"x": 14}) == {"y": 42}
    instance = node["instances"][0]["id"]
    container = server_container(api, instance)
    assert python_image in container.image.tags
    # The cell's print, with its request ID, in the node's log.
    lines = api.http.get(f"/cellnode/v1/nodes/{node['id']}/logs").json()["lines"]
    assert any(line["text"].startswith("running on") and line["request_id"] != "-" for line in lines), lines
    api.delete(node["id"])


def server_container(api: Api, instance_id: str) -> Any:
    import docker

    engine = docker.DockerClient(base_url=api.docker_host)
    try:
        return engine.containers.get(f"cellnode-{instance_id}")
    finally:
        engine.close()


def test_a_grpc_node_is_called_on_the_grpc_port_with_any_method(api: Api, server: ServerProcess) -> None:
    check = {"type": "grpc", "interval": 1, "timeout": 1}
    container = {"image": GRPC_IMAGE, "port": 50051, "endpoint": "grpc", "healthcheck": check}
    container["command"] = ["python3", "/app/grpc_service.py"]
    node = api.wait(api.create("grpc-node", container, instance_count=2)["id"])
    metadata = (("authorization", f"Api-Key {server.key}"), ("x-node-id", node["id"]), ("x-folder-id", api.folder))
    with grpc.insecure_channel(server.grpc_address) as channel:
        say = channel.unary_unary("/demo.Echo/Say")
        answer, call = say.with_call(b"olleh", metadata=metadata, timeout=10)
        assert answer == b"hello"
        trailers = dict(call.trailing_metadata() or ())
        assert trailers["x-said-by"] in {i["id"] for i in node["instances"]} and trailers["x-request-id"]
        count = channel.unary_stream("/demo.Echo/Count")
        assert list(count(b"5", metadata=metadata, timeout=10)) == [b"0", b"1", b"2", b"3", b"4"]
        with pytest.raises(grpc.RpcError) as refused:
            say(b"x", metadata=metadata[1:], timeout=10)  # no credential
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as unknown:
            channel.unary_unary("/demo.Echo/Nope")(b"x", metadata=metadata, timeout=10)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the service's own answer
    # Over HTTP, the node says where its calls go.
    answer = api.call(node["id"], "POST", "/demo.Echo/Say")
    assert answer.status_code == 503 and "gRPC port" in answer.json()["message"]
    api.delete(node["id"])
