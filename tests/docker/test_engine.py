"""The Docker test infrastructure works for real: containers on loopback, locally built images, a registry with
basic auth, logs, kills and limits seen through the Engine API."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from pathlib import Path

import docker.errors
import grpc
import httpx
import pytest
import requests
from docker.models.containers import Container
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.docker_engine import Engine, free_port, running
from tests.docker_images import add_file_layer, write_app
from tests.docker_registry import Registry, push_image

# A cold cache builds the images inside the first test's setup (a minute or two); a warm one takes seconds.
pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(900)]

NOBODY = "65534:65534"
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z ")

FASTAPI_APP = """\
import os

from fastapi import FastAPI

app = FastAPI()


@app.get("/hello/{name}")
def hello(name: str) -> dict[str, object]:
    return {"hello": name, "uid": os.getuid()}


@app.post("/write")
def write() -> dict[str, object]:
    try:
        with open("/app/written", "w") as file:
            file.write("no")
    except OSError as exc:
        return {"errno": exc.errno}
    return {"errno": 0}
"""

ASGI_HTTP_VERSION = """\
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": scope["http_version"].encode()})
"""

GRPC_HEALTH_SERVER = """\
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
servicer = health.HealthServicer()
servicer.set("model", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
print("serving", flush=True)
server.wait_for_termination()
"""


def wait_http(container: Container, url: str, timeout: float = 30.0) -> httpx.Response:
    """GET `url` until it answers; fail with the container's logs if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            container.reload()
            if container.status not in ("created", "running"):
                break
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer; container {container.status}:\n{container.logs().decode()}")


def test_engine_is_private_and_host_networked(docker_engine: Engine) -> None:
    info = docker_engine.client.info()
    assert info["DockerRootDir"] == str(docker_engine.data_root)
    assert "bridge" not in {network.name for network in docker_engine.client.networks.list()}
    # Loopback registries count as insecure by default, so plain-HTTP pushes to 127.0.0.1 need no flag.
    assert "127.0.0.0/8" in info["RegistryConfig"]["InsecureRegistryCIDRs"]
    assert docker_engine.host == f"unix://{docker_engine.socket}"


def test_a_public_registry_is_never_reached(docker_engine: Engine) -> None:
    """A pull from Docker Hub (or any registry off loopback) stops at the engine's refusing proxy on 127.0.0.1."""
    with pytest.raises(docker.errors.APIError) as caught:
        docker_engine.client.images.pull("cellnode-tests-never-pulled", tag="1")
    assert f"proxyconnect tcp: dial tcp {docker_engine.proxy}: connect: connection refused" in str(caught.value)


def test_python_image_serves_http_on_loopback(docker_engine: Engine, python_image: str) -> None:
    port = free_port()
    command = ["python3", "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    with running(docker_engine, python_image, command, working_dir="/etc") as container:
        response = wait_http(container, f"http://127.0.0.1:{port}/os-release")
        assert response.status_code == 200
        assert "VERSION_CODENAME=bookworm" in response.text
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"


def test_python_image_is_python_311_and_its_standard_library_only(docker_engine: Engine, python_image: str) -> None:
    probe = (
        "import importlib.util, json, ssl, sqlite3, sys;"
        "print(json.dumps({'version': sys.version_info[:2], 'modules': {m: bool(importlib.util.find_spec(m))"
        " for m in ('pip', 'cellnode', 'fastapi')}}))"
    )
    output = docker_engine.client.containers.run(
        python_image, ["python3", "-c", probe], network_mode="none", remove=True
    )
    assert json.loads(output) == {"version": [3, 11], "modules": {"pip": False, "cellnode": False, "fastapi": False}}


def test_service_image_has_its_packages(docker_engine: Engine, service_image: str) -> None:
    probe = "import fastapi, uvicorn, hypercorn, h2, grpc, grpc_health.v1.health, prometheus_client;"
    probe += "print(grpc.__version__)"
    output = docker_engine.client.containers.run(
        service_image, ["python3", "-c", probe], network_mode="none", remove=True
    )
    assert output.decode().strip() == grpc.__version__  # the host's grpcio, the same wheel for the image's Python


def test_fastapi_app_from_a_read_only_mount_as_nobody(
    docker_engine: Engine, service_image: str, tmp_path: Path
) -> None:
    code = write_app(tmp_path / "app", "app.py", FASTAPI_APP)
    port = free_port()
    command = ["python3", "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)]
    with running(
        docker_engine,
        service_image,
        command,
        volumes={str(code): {"bind": "/app", "mode": "ro"}},
        working_dir="/app",
        user=NOBODY,
        read_only=True,
        environment={"PYTHONDONTWRITEBYTECODE": "1"},
    ) as container:
        response = wait_http(container, f"http://127.0.0.1:{port}/hello/cellnode")
        assert response.json() == {"hello": "cellnode", "uid": 65534}
        assert httpx.post(f"http://127.0.0.1:{port}/write").json() == {"errno": 30}  # EROFS: the mount is read-only
    assert not (code / "written").exists()


def test_hypercorn_serves_h2c_from_the_service_image(docker_engine: Engine, service_image: str, tmp_path: Path) -> None:
    code = write_app(tmp_path / "h2", "app.py", ASGI_HTTP_VERSION)
    port = free_port()
    command = ["python3", "-m", "hypercorn", "app:app", "--bind", f"127.0.0.1:{port}"]
    volumes = {str(code): {"bind": "/app", "mode": "ro"}}
    with running(docker_engine, service_image, command, volumes=volumes, working_dir="/app", user=NOBODY) as container:
        wait_http(container, f"http://127.0.0.1:{port}/")
        for flag, version in (("--http2-prior-knowledge", "2"), ("--http1.1", "1.1")):
            answer = subprocess.run(
                ["curl", "-sS", flag, "-w", " %{http_version}", f"http://127.0.0.1:{port}/"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert answer.stdout == f"{version} {version}", answer.stderr


def test_grpc_health_from_the_service_image(docker_engine: Engine, service_image: str, tmp_path: Path) -> None:
    code = write_app(tmp_path / "grpc", "server.py", GRPC_HEALTH_SERVER)
    port = free_port()
    volumes = {str(code): {"bind": "/app", "mode": "ro"}}
    with running(docker_engine, service_image, ["python3", "/app/server.py", str(port)], volumes=volumes) as container:
        deadline = time.monotonic() + 30
        while b"serving" not in container.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service="model"), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as missing:
                stub.Check(health_pb2.HealthCheckRequest(service="other"), timeout=10)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_logs_keep_stdout_and_stderr_apart(docker_engine: Engine, python_image: str) -> None:
    # Without flush=True (or PYTHONUNBUFFERED=1) python3 holds stdout back until exit when it is not a terminal.
    script = "import sys; print('to stdout', flush=True); print('to stderr', file=sys.stderr); sys.exit(3)"
    with running(docker_engine, python_image, ["python3", "-c", script]) as container:
        assert container.wait(timeout=30) == {"StatusCode": 3, "Error": None}
        assert container.logs(stdout=True, stderr=False) == b"to stdout\n"
        assert container.logs(stdout=False, stderr=True) == b"to stderr\n"
        # The engine stamps each stream's lines as it reads them: the order across the two streams is not kept.
        stamped = container.logs(timestamps=True).decode().splitlines()
        assert sorted(line.split(" ", 1)[1] for line in stamped) == ["to stderr", "to stdout"]
        assert all(STAMP.match(line) for line in stamped), stamped


def test_kill_is_seen_through_wait(docker_engine: Engine, python_image: str) -> None:
    port = free_port()
    command = ["python3", "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    with running(docker_engine, python_image, command) as container:
        wait_http(container, f"http://127.0.0.1:{port}/")
        container.kill()
        assert container.wait(timeout=30) == {"StatusCode": 137, "Error": None}
        container.reload()
        assert (container.status, container.attrs["State"]["OOMKilled"]) == ("exited", False)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)


def test_sigterm_reaches_python_only_through_an_init(docker_engine: Engine, python_image: str) -> None:
    # A process that is PID 1 in its namespace ignores signals it has no handler for, as python3 has for SIGTERM.
    sleeper = ["python3", "-c", "import time; print('up', flush=True); time.sleep(600)"]
    with (
        running(docker_engine, python_image, sleeper) as bare,
        running(docker_engine, python_image, sleeper, init=True) as with_init,
    ):
        for container in (bare, with_init):
            while b"up" not in container.logs():
                time.sleep(0.05)
            container.kill(signal="SIGTERM")
        assert with_init.wait(timeout=30)["StatusCode"] == 143  # docker-init passed SIGTERM on
        with pytest.raises(requests.exceptions.RequestException, match="timed out"):
            bare.wait(timeout=1)
        bare.reload()
        assert bare.status == "running"


def test_memory_limit_kills_and_is_reported(docker_engine: Engine, python_image: str) -> None:
    script = "x = bytearray(256 * 1024 * 1024)"
    limits = {"mem_limit": "64m", "memswap_limit": "64m"}
    with running(docker_engine, python_image, ["python3", "-c", script], **limits) as container:
        assert container.wait(timeout=60)["StatusCode"] == 137
        container.reload()
        assert container.attrs["State"]["OOMKilled"] is True
        assert container.attrs["HostConfig"]["Memory"] == 64 * 1024 * 1024


def test_registry_push_and_pull_with_basic_auth(docker_engine: Engine, python_image: str, registry: Registry) -> None:
    images = docker_engine.client.images
    repository = f"{registry.address}/team/python"
    images.get(python_image).tag(repository, "1")
    push_image(docker_engine, repository, "1", registry.auth_config)
    images.remove(f"{repository}:1")
    pulled = images.pull(repository, tag="1", auth_config=registry.auth_config)
    assert pulled.id == images.get(python_image).id

    # An image whose top layer exists nowhere but in the registry once removed here: the pull must fetch it.
    token = secrets.token_hex(8)
    reference = f"{registry.address}/team/token:1"
    add_file_layer(docker_engine, python_image, "/token", token.encode(), reference)
    push_image(docker_engine, reference.rsplit(":", 1)[0], "1", registry.auth_config)
    images.remove(reference)
    with pytest.raises(docker.errors.ImageNotFound):
        images.get(reference)
    images.pull(reference.rsplit(":", 1)[0], tag="1", auth_config=registry.auth_config)
    output = docker_engine.client.containers.run(
        reference, ["python3", "-c", "print(open('/token').read())"], network_mode="none", remove=True
    )
    assert output.decode().strip() == token


def test_registry_refuses_wrong_or_missing_credentials(
    docker_engine: Engine, python_image: str, registry: Registry
) -> None:
    images = docker_engine.client.images
    repository = f"{registry.address}/team/refused"
    images.get(python_image).tag(repository, "1")
    wrong = {"username": registry.user, "password": "not-" + registry.password}
    with pytest.raises(docker.errors.APIError, match="unauthorized|no basic auth credentials"):
        push_image(docker_engine, repository, "1", wrong)
    push_image(docker_engine, repository, "1", registry.auth_config)
    images.remove(f"{repository}:1")
    with pytest.raises(docker.errors.APIError, match="unauthorized|no basic auth credentials") as refused:
        images.pull(repository, tag="1", auth_config=wrong)
    assert registry.password not in str(refused.value)
    with pytest.raises(docker.errors.APIError, match="no basic auth credentials|unauthorized"):
        images.pull(repository, tag="1", auth_config={})
    assert httpx.get(f"http://{registry.address}/v2/", auth=(registry.user, registry.password)).status_code == 200
