"""SIGTERM drains both fronts at once: from the moment HTTP stops taking connections, the gRPC port refuses new
calls too, and the calls under way on either finish."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.grpc.reflection_client import ReflectionClient
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow

EXECUTE = "yandex.cloud.datasphere.v1.NodeService/Execute"


def health_check(address: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
            return code
    return grpc.StatusCode.OK


def test_sigterm_stops_new_grpc_calls_while_http_drains(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    server = ServerProcess(tmp_path / "data", env={"CELLNODE_PROFILE": "none"}, args=("--grpc-port", "0")).start()
    request.addfinalizer(lambda: server.stop(signal.SIGKILL))
    with server.client() as admin:
        admin.create_checkpoint(notebook(tmp_path, "import time\ns = 0.0", "time.sleep(s)\ndone = True"), name="nap")
        node = admin.create_node(
            "napper", checkpoint="nap", inputs={"s": "float"}, outputs={"done": "bool"}, timeout=30, instances=2
        )
        admin.wait_node("napper")
    assert health_check(server.grpc_address) is grpc.StatusCode.OK
    grpc_client = ReflectionClient(server.grpc_address, f"Api-Key {server.key}")
    grpc_client.services()  # reflection's answers are cached before the stop
    body = {"folder_id": node["folder_id"], "input": {"s": 4.0}}

    def http_call() -> httpx.Response:
        return httpx.post(
            f"{server.url}/datasphere/v1/nodes/{node['id']}:execute",
            json=body,
            headers={"Authorization": f"Api-Key {server.key}"},
            timeout=30,
        )

    def grpc_call() -> dict[str, object]:
        output, _ = grpc_client.call(EXECUTE, {**body, "node_id": node["id"], "input": {"s": 2.0}}, timeout=30)
        return output

    with ThreadPoolExecutor(2) as pool:
        in_http, in_grpc = pool.submit(http_call), pool.submit(grpc_call)
        time.sleep(1.0)  # both are under way
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert not in_http.done(), "HTTP is still draining its call"
        assert health_check(server.grpc_address) is grpc.StatusCode.UNAVAILABLE, "a new gRPC call is refused"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=2)
        answer = in_http.result(timeout=30)
        assert answer.status_code == 200 and answer.json() == {"output": {"done": True}}
        assert in_grpc.result(timeout=30) == {"output": {"done": True}}
    grpc_client.close()
    assert server.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log()
