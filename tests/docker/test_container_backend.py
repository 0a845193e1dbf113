"""The container backend against a real engine: ports, readiness, health checks, failures, pulls, logs, limits; and
the health monitor's state machine, which needs no engine."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.backends.base import InstanceFailed, InstanceSpec
from cellnode.backends.container import ContainerBackend, ContainerFailed, ContainerHandle
from cellnode.backends.health import HealthCheck, HealthMonitor, port_open, probe
from cellnode.telemetry.logs import read_logs
from tests.docker_engine import Engine, free_port
from tests.docker_images import write_app
from tests.docker_registry import Registry, push_image

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(900)]

RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (\S+) - (out|err) (.*)$")

ASGI_APP = """\
import json, os, sys

state = {"healthy": True}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                print("app listening on port", os.environ["PORT"], flush=True)
                print("a warning on stderr", file=sys.stderr, flush=True)
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    path, status, body = scope["path"], 200, b"ok"
    if path == "/health-check":
        status = 200 if state["healthy"] else 503
    elif path == "/toggle":
        state["healthy"] = not state["healthy"]
    elif path == "/long":
        print("x" * 20000, flush=True)
    elif path == "/hello":
        names = ("CELLNODE_INSTANCE_ID", "CELLNODE_NODE_ID", "PORT", "CELLNODE_PORT", "CELLNODE_HOST",
                 "CELLNODE_HEALTHCHECK_PORT", "CELLNODE_TELEMETRY_PORT", "PYTHONUNBUFFERED", "MY_SECRET")
        body = json.dumps({name: os.environ.get(name) for name in names}).encode()
    else:
        status = 404
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
"""

GRPC_HEALTH_SERVER = """\
import os
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
servicer = health.HealthServicer()
servicer.set("model", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port(os.environ["CELLNODE_HOST"] + ":" + os.environ["CELLNODE_HEALTHCHECK_PORT"])
server.start()
print("serving health on", os.environ["CELLNODE_HEALTHCHECK_PORT"], flush=True)
server.wait_for_termination()
"""

UVICORN = ["sh", "-c", 'exec python3 -m uvicorn app:app --host "$CELLNODE_HOST" --port "$PORT"']
HTTP_SERVER = ["sh", "-c", 'exec python3 -m http.server --bind "$CELLNODE_HOST" "$PORT"']
FAST_HEALTH = {"path": "/health-check", "timeout": 1, "interval": 0.2, "fails_threshold": 2, "passes_threshold": 3}


def instance(tmp_path: Path, instance_id: str, container: dict[str, Any], **env: str) -> InstanceSpec:
    return InstanceSpec("n1", instance_id, {"container": container}, log_path=tmp_path / "logs" / "n1", env=env)


def http_node(tmp_path: Path, image: str, **extra: Any) -> dict[str, Any]:
    code = tmp_path / "app"
    if not code.exists():
        write_app(code, "app.py", ASGI_APP)
    node = {
        "image": image,
        "endpoint": "http",
        "port": 8080,
        "command": UVICORN,
        "working_dir": "/app",
        "mounts": [{"source": str(code), "target": "/app"}],
        "healthcheck": {"kind": "http", "port": 8080, **FAST_HEALTH},
    }
    return {**node, **extra}


def log_records(handle: ContainerHandle) -> list[tuple[str, str, str]]:
    lines = handle.log.path.read_text().splitlines()
    matches = [RECORD.match(line) for line in lines]
    assert all(matches), lines
    return [(match[1], match[2], match[3]) for match in matches if match]


async def eventually(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_http_endpoint_with_health_check(docker_engine: Engine, service_image: str, tmp_path: Path) -> None:
    node = http_node(tmp_path, service_image, telemetry={"path": "/metrics", "port": 9100})

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            handle = await backend.start(instance(tmp_path, "i1", node, MY_SECRET="s3cr3t"))
            assert handle.pid is not None and handle.returncode is None
            await handle.wait_ready(30)
            host, port = handle.address.split(":")
            assert (host, int(port)) == ("127.0.0.1", handle.port) and handle.port != 8080
            assert handle.healthcheck_port == handle.port, "a check on the endpoint's port shares its port"
            assert handle.telemetry_port not in (None, handle.port, 9100) and handle.telemetry_path == "/metrics"
            async with httpx.AsyncClient(base_url=f"http://{handle.address}", trust_env=False) as client:
                env = (await client.get("/hello")).json()
                assert env == {
                    "CELLNODE_INSTANCE_ID": "i1",
                    "CELLNODE_NODE_ID": "n1",
                    "PORT": str(handle.port),
                    "CELLNODE_PORT": str(handle.port),
                    "CELLNODE_HOST": "127.0.0.1",
                    "CELLNODE_HEALTHCHECK_PORT": str(handle.port),
                    "CELLNODE_TELEMETRY_PORT": str(handle.telemetry_port),
                    "PYTHONUNBUFFERED": "1",
                    "MY_SECRET": "s3cr3t",
                }
                # Ready after passes_threshold (3) passing checks in a row.
                await eventually(lambda: "/health-check" in handle.log.path.read_text())
                await asyncio.sleep(0.3)
                checks = handle.log.path.read_text().count('"GET /health-check HTTP/1.1" 200')
                assert checks >= 3

                # In rotation, a monitor takes it out after fails_threshold failures and back after passes_threshold.
                assert handle.health_check is not None
                monitor = HealthMonitor(dataclasses.replace(handle.health_check, interval=0.05), healthy=True)
                changes: list[tuple[bool, str]] = []
                watching = asyncio.create_task(monitor.run(lambda healthy, why: changes.append((healthy, why))))
                await client.get("/toggle")
                await eventually(lambda: len(changes) == 1)
                assert changes == [(False, "HTTP 503 from /health-check")] and monitor.fails >= 2
                assert monitor.last_error == "HTTP 503 from /health-check" and not monitor.in_rotation
                await client.get("/toggle")
                await eventually(lambda: len(changes) == 2)
                assert changes[1] == (True, "HTTP 200 from /health-check") and monitor.in_rotation
                watching.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await watching

            began = time.monotonic()
            await handle.stop(grace=10)
            # The container's init passed SIGTERM on; uvicorn shut down, then re-raised it (128 + 15).
            assert handle.returncode == 143
            assert time.monotonic() - began < 10
            assert await probe(handle.health_check) == (False, "connection refused")
            assert not docker_engine.client.containers.list(all=True, filters={"label": "cellnode.instance_id=i1"})
            assert "s3cr3t" not in handle.log.path.read_text()

    asyncio.run(scenario())


def test_instances_of_one_image_run_side_by_side(docker_engine: Engine, service_image: str, tmp_path: Path) -> None:
    node = http_node(tmp_path, service_image)

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            first, second = await asyncio.gather(*(backend.start(instance(tmp_path, i, node)) for i in ("a", "b")))
            await asyncio.gather(first.wait_ready(30), second.wait_ready(30))
            assert first.port != second.port and first.pid != second.pid
            for handle in (first, second):
                response = httpx.get(f"http://{handle.address}/hello", trust_env=False)
                assert response.json()["CELLNODE_INSTANCE_ID"] == handle.instance_id
            records = read_logs(tmp_path / "logs" / "n1", tail=1000)
            assert {record.instance_id for record in records} == {"a", "b"}
            # A health check that never passes: not ready in time, so killed, and the last probe error is named.
            failing = http_node(tmp_path, service_image, healthcheck={"kind": "http", **FAST_HEALTH, "path": "/nope"})
            handle = await backend.start(instance(tmp_path, "c", failing))
            with pytest.raises(ContainerFailed, match=r"not ready within 3 s.*last check: HTTP 404 from /nope") as no:
                await handle.wait_ready(3)
            assert not no.value.permanent and handle.returncode == 137
        assert first.returncode == second.returncode == 143, "close() stops every container it started"
        assert not docker_engine.client.containers.list(all=True, filters={"label": "cellnode.node_id=n1"})

    asyncio.run(scenario())


def test_ready_without_health_check_when_the_port_opens(
    docker_engine: Engine, python_image: str, tmp_path: Path
) -> None:
    node = {"image": python_image, "port": 8000, "command": HTTP_SERVER, "working_dir": "/etc"}

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            handle = await backend.start(instance(tmp_path, "i1", node))
            assert handle.health_check is None and handle.healthcheck_port is None and handle.telemetry_port is None
            await handle.wait_ready(30)
            assert await port_open("127.0.0.1", handle.port, 1)
            assert "VERSION_CODENAME" in httpx.get(f"http://{handle.address}/os-release", trust_env=False).text
            handle.interrupt()  # nothing to interrupt in a container

            # An image on fixed ports runs one instance per machine.
            fixed = {**node, "port": free_port(), "assign_ports": False}
            one = await backend.start(instance(tmp_path, "f1", fixed))
            assert one.port == fixed["port"]
            await one.wait_ready(30)
            with pytest.raises(ContainerFailed, match="one instance per machine"):
                await backend.start(instance(tmp_path, "f2", fixed))

    asyncio.run(scenario())


def test_grpc_health_check_on_a_port_of_its_own(docker_engine: Engine, service_image: str, tmp_path: Path) -> None:
    code = write_app(tmp_path / "grpc", "server.py", GRPC_HEALTH_SERVER)
    health = {"kind": "grpc", "port": 9001, "path": "model", "interval": 0.2, "passes_threshold": 2}
    node = {
        "image": service_image,
        "endpoint": "grpc",
        "port": 9000,
        "command": ["python3", "/app/server.py"],
        "mounts": [{"source": str(code), "target": "/app"}],
        "healthcheck": health,
    }

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            handle = await backend.start(instance(tmp_path, "g1", node))
            await handle.wait_ready(30)
            assert handle.endpoint == "grpc" and handle.health_check is not None
            assert handle.healthcheck_port == handle.health_check.port
            assert handle.healthcheck_port not in (handle.port, 9001)
            assert await probe(handle.health_check) == (True, "SERVING")
            unknown = dataclasses.replace(handle.health_check, path="other")
            assert await probe(unknown) == (False, "the health server does not know service 'other' (NOT_FOUND)")
            assert f"serving health on {handle.healthcheck_port}" in handle.last_log_line()
            await handle.stop()
            assert await probe(handle.health_check) == (False, "connection refused")

    asyncio.run(scenario())


def test_container_that_exits_at_once(docker_engine: Engine, python_image: str, tmp_path: Path) -> None:
    script = "import sys, time; print('loading', flush=True); time.sleep(0.2); sys.exit('no model file: /m.bin')"
    node = {"image": python_image, "port": 8000, "command": ["python3", "-c", script]}

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            handle = await backend.start(instance(tmp_path, "i1", node))
            with pytest.raises(InstanceFailed, match="exited with code 1 before it was ready") as failed:
                await handle.wait_ready(30)
            assert "its last log line: no model file: /m.bin" in str(failed.value)
            assert isinstance(failed.value, ContainerFailed) and not failed.value.permanent
            assert handle.returncode == 1 and await handle.wait() == 1
            assert log_records(handle) == [("i1", "out", "loading"), ("i1", "err", "no model file: /m.bin")]

    asyncio.run(scenario())


def test_logs_go_to_the_node_log_directory(docker_engine: Engine, service_image: str, tmp_path: Path) -> None:
    node = http_node(tmp_path, service_image)

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            handle = await backend.start(instance(tmp_path, "i1", node))
            await handle.wait_ready(30)
            httpx.get(f"http://{handle.address}/long", trust_env=False)
            await eventually(lambda: "x" * 20000 in handle.log.path.read_text())
            await handle.stop()
        log_dir = tmp_path / "logs" / "n1"
        assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700
        assert [path.name for path in log_dir.iterdir()] == ["i1.log"]
        assert stat.S_IMODE(handle.log.path.stat().st_mode) == 0o600
        records = log_records(handle)
        assert ("i1", "out", f"app listening on port {handle.port}") in records
        assert ("i1", "err", "a warning on stderr") in records
        assert ("i1", "out", "x" * 20000) in records, "a line the engine split is one record"
        assert any(stream == "err" and "Uvicorn running" in text for _, stream, text in records)
        through_api = read_logs(log_dir, instance_id="i1", tail=1000)
        assert [(r.instance_id, r.stream, r.text) for r in through_api if r.stream == "out"][0][2].startswith("app")
        assert {r.request_id for r in through_api} == {"-"}
        assert [r.time for r in through_api] == sorted(r.time for r in through_api)

    asyncio.run(scenario())


def test_kill_and_stop(docker_engine: Engine, python_image: str, tmp_path: Path) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up'); time.sleep(600)"
    node = {"image": python_image, "port": 8000, "command": ["python3", "-c", stubborn]}

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            killed, stopped = [await backend.start(instance(tmp_path, i, node)) for i in ("k", "s")]
            await eventually(lambda: killed.last_log_line() == stopped.last_log_line() == "up")
            killed.kill()
            assert await asyncio.wait_for(killed.wait(), 30) == 137
            assert killed.returncode == 137 and not killed.oom_killed
            killed.kill()  # ended: nothing to do
            began = time.monotonic()
            await stopped.stop(grace=1)
            took = time.monotonic() - began
            assert stopped.returncode == 137, "it ignored SIGTERM, so the grace ran out"
            assert 0.9 < took < 6, took
            listed = docker_engine.client.containers.list(all=True, filters={"label": "cellnode.node_id=n1"})
            assert not listed, "ended containers are removed"

    asyncio.run(scenario())


def test_memory_limit(docker_engine: Engine, python_image: str, tmp_path: Path) -> None:
    script = "print('allocating', flush=True); x = bytearray(256 * 1024 * 1024)"
    node = {"image": python_image, "port": 8000, "command": ["python3", "-c", script], "memory_bytes": 64 * 2**20}

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            handle = await backend.start(instance(tmp_path, "i1", node))
            with pytest.raises(ContainerFailed, match=r"code 137 .*killed it for passing its memory limit of 67108864"):
                await handle.wait_ready(60)
            assert handle.oom_killed and handle.last_log_line() == "allocating"

    asyncio.run(scenario())


def test_disk_limit(docker_engine: Engine, python_image: str, tmp_path: Path) -> None:
    node = {"image": python_image, "port": 8000, "command": HTTP_SERVER, "disk_bytes": 2**30}

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            try:
                handle = await backend.start(instance(tmp_path, "i1", node))
            except ContainerFailed as exc:
                # overlay2 enforces a size only on xfs with pquota (not this machine's engine): the node fails at once.
                assert exc.permanent
                assert str(exc) == (
                    "Node 'n1' asks for a disk limit of 1073741824 bytes per instance (its --disk setting), and the "
                    "engine refused it: --storage-opt is supported only for overlay over xfs with 'pquota' mount "
                    "option. Drop --disk from the node, or run the engine's storage on xfs mounted with the pquota "
                    "option."
                )
                assert not docker_engine.client.containers.list(all=True, filters={"label": "cellnode.node_id=n1"})
            else:  # an engine that can enforce it
                storage = docker_engine.client.containers.get("cellnode-i1").attrs["HostConfig"]["StorageOpt"]
                assert storage == {"size": "1073741824"}
                await handle.stop()

    asyncio.run(scenario())


def test_pull_from_a_registry_with_credentials(
    docker_engine: Engine, python_image: str, registry: Registry, tmp_path: Path
) -> None:
    images = docker_engine.client.images
    repository = f"{registry.address}/team/server"
    images.get(python_image).tag(repository, "1")
    push_image(docker_engine, repository, "1", registry.auth_config)
    images.remove(f"{repository}:1")
    node = {"image": f"{repository}:1", "port": 8000, "command": HTTP_SERVER}
    wrong = "not-" + registry.password

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            for auth, message in (
                ({"username": registry.user, "password": wrong}, "refused the credentials of user 'cellnode'"),
                (None, "asks for credentials, and the node gives none"),
            ):
                with pytest.raises(ContainerFailed, match=message) as refused:
                    await backend.start(instance(tmp_path, "r0", {**node, "registry_auth": auth}))
                assert refused.value.permanent and repository in str(refused.value)
                assert registry.password not in str(refused.value) and wrong not in str(refused.value)

            missing = {**node, "image": f"{registry.address}/team/missing:1", "registry_auth": registry.auth_config}
            with pytest.raises(ContainerFailed, match=r"Image '127\.0\.0\.1:\d+/team/missing:1' does not exist") as no:
                await backend.start(instance(tmp_path, "r1", missing))
            assert no.value.permanent

            handle = await backend.start(instance(tmp_path, "r2", {**node, "registry_auth": registry.auth_config}))
            await handle.wait_ready(30)
            assert images.get(f"{repository}:1").id == images.get(python_image).id

    asyncio.run(scenario())


def test_start_failures(docker_engine: Engine, python_image: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ContainerBackend(base_url="unix:///nonexistent/docker.sock") as nowhere:
            with pytest.raises(ContainerFailed, match="Cannot reach the Docker engine at unix:///nonexistent") as no:
                await nowhere.start(instance(tmp_path, "i1", {"image": "x:1", "port": 80}))
            assert no.value.permanent
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            bad: list[tuple[dict[str, Any], str]] = [
                ({"port": 80}, "no 'image'"),
                ({"image": "x:1", "port": 0}, "port 0; it must be an integer in 1..65535"),
                ({"image": "x:1", "port": 80, "endpoint": "ws"}, "endpoint 'ws'"),
                ({"image": "x:1", "port": 80, "registry_auth": {"username": "u", "password": 5}}, "<hidden>"),
                ({"image": "x:1", "port": 80, "mounts": [{"source": "rel", "target": "/a"}]}, "mounts"),
                ({"image": "x:1", "port": 80, "healthcheck": {"kind": "tcp"}}, "kind 'tcp'"),
                ({"image": "x:1", "port": 80, "disk": 5}, "unknown keys \\['disk'\\]"),
                ({"image": "Bad Name", "port": 80}, "Image reference 'Bad Name' is not valid"),
            ]
            for container, message in bad:
                with pytest.raises(ContainerFailed, match=message) as refused:
                    await backend.start(instance(tmp_path, "i1", container))
                assert refused.value.permanent
            mount = {"image": python_image, "port": 80, "mounts": [{"source": "/nonexistent/code", "target": "/app"}]}
            with pytest.raises(ContainerFailed, match="could not be created: .*/nonexistent/code") as refused:
                await backend.start(instance(tmp_path, "i1", mount))
            assert refused.value.permanent
            assert not docker_engine.client.containers.list(all=True, filters={"label": "cellnode.node_id=n1"})

            # A registry that does not answer may come back: worth a retry.
            down = {"image": f"127.0.0.1:{free_port()}/team/x:1", "port": 80}
            with pytest.raises(ContainerFailed, match="could not be pulled: .*connection refused") as unreachable:
                await backend.start(instance(tmp_path, "i1", down))
            assert not unreachable.value.permanent

    asyncio.run(scenario())


def test_remove_leftovers_of_a_previous_run(docker_engine: Engine, python_image: str, tmp_path: Path) -> None:
    node = {"image": python_image, "port": 8000, "command": HTTP_SERVER}

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host, owner="test-run") as previous:
            old = await previous.start(instance(tmp_path, "old", node))
            previous.handles.clear()  # as if the server had crashed: nobody stops it
            async with ContainerBackend(base_url=docker_engine.host, owner="test-run") as backend:
                new = await backend.start(instance(tmp_path, "new", node))
                assert await backend.remove_leftovers() == ["cellnode-old"]
                assert await asyncio.wait_for(old.wait(), 30) == 137
                assert new.returncode is None

    asyncio.run(scenario())


# The health monitor's state machine, without a network.


def test_monitor_enters_rotation_after_passes_threshold() -> None:
    monitor = HealthMonitor(HealthCheck("http", 80, "/h", passes_threshold=3, fails_threshold=2))
    assert monitor.healthy is None and not monitor.in_rotation
    assert [monitor.record(True, "HTTP 200 from /h") for _ in range(2)] == [None, None]
    assert monitor.record(False, "HTTP 500 from /h") is None, "one failure while unknown flips nothing"
    assert [monitor.record(True) for _ in range(3)] == [None, None, True], "the count starts again after a failure"
    assert monitor.in_rotation and monitor.record(True) is None


def test_monitor_leaves_rotation_after_fails_threshold_and_recovers() -> None:
    monitor = HealthMonitor(HealthCheck("grpc", 80, "", passes_threshold=2, fails_threshold=3), healthy=True)
    assert monitor.record(False, "timed out after 1 s") is None
    assert monitor.record(True) is None, "a pass resets the failures"
    assert [monitor.record(False, why) for why in ("NOT_SERVING", "connection refused", "NOT_SERVING")] == [
        None,
        None,
        False,
    ]
    assert monitor.healthy is False and monitor.last_error == "NOT_SERVING" and monitor.fails == 3
    assert monitor.record(False, "NOT_SERVING") is None, "still out: no second flip"
    assert [monitor.record(True), monitor.record(True)] == [None, True]
    assert monitor.in_rotation and monitor.fails == 0


def test_monitor_unknown_goes_out_after_fails_threshold() -> None:
    monitor = HealthMonitor(HealthCheck("http", 80, "/h", fails_threshold=1))
    assert monitor.record(False, "connection refused") is False and monitor.healthy is False


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "tcp"}, "kind 'tcp'.*'http' or 'grpc'"),
        ({"port": 0}, "port 0 is out of range; it must be an integer in 1..65535"),
        ({"path": "0.0.0.0"}, "path '0.0.0.0' is not valid"),
        ({"timeout": 0}, "timeout 0 is out of range; it must be > 0 and <= 60 s"),
        ({"interval": -1}, "interval -1 is out of range"),
        ({"fails_threshold": 0}, "fails_threshold 0 is out of range; it must be an integer in 1..100"),
        ({"passes_threshold": 1.5}, "passes_threshold 1.5 is out of range"),
    ],
)
def test_health_check_validation(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HealthCheck(**{"kind": "http", "port": 80, "path": "/h", **fields})


def test_probe_that_gets_no_answer_times_out() -> None:
    async def scenario() -> None:
        connections: list[asyncio.StreamWriter] = []

        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(writer)

        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            for kind in ("http", "grpc"):
                check = HealthCheck(kind, port, "/h" if kind == "http" else "", timeout=0.2)
                assert await probe(check) == (False, "timed out after 0.2 s")
            assert await port_open("127.0.0.1", port, 1)
        for writer in connections:
            writer.close()
            await writer.wait_closed()

    asyncio.run(scenario())


def test_health_check_defaults() -> None:
    check = HealthCheck("grpc", 9000)
    assert (check.path, check.timeout, check.interval, check.fails_threshold, check.passes_threshold) == (
        "",
        1.0,
        15.0,
        3,
        3,
    )


def test_a_spec_never_prints_its_secrets(tmp_path: Path) -> None:
    auth = {"username": "json_key", "password": "pa55word"}
    spec = InstanceSpec(
        "n1",
        "i1",
        {"container": {"image": "x:1", "port": 8080, "registry_auth": auth}},
        log_path=tmp_path,
        env={"MY_SECRET": "s3cr3t"},
    )
    assert "pa55word" not in repr(spec) and "s3cr3t" not in repr(spec)


def test_a_cancelled_start_leaves_no_container(docker_engine: Engine, service_image: str, tmp_path: Path) -> None:
    """Cancelled at several points of `start()`: whatever the engine made by then is removed, not left running."""
    node = http_node(tmp_path, service_image)

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            for index, delay in enumerate((0.0, 0.01, 0.03, 0.06, 0.1, 0.2)):
                instance_id = f"cancel{index}"
                starting = asyncio.create_task(backend.start(instance(tmp_path, instance_id, node)))
                await asyncio.sleep(delay)
                if starting.done():
                    await (await starting).stop()
                    continue
                starting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await starting
                label: dict[str, str | list[str] | bool] = {"label": f"cellnode.instance_id={instance_id}"}
                assert not docker_engine.client.containers.list(all=True, filters=label), f"left after {delay} s"

    asyncio.run(scenario())
