"""The HTTP proxy to an HTTP/2 container endpoint: hypercorn in the services image serves h2c, and the proxy speaks it
with prior knowledge, many requests multiplexed on one kept-alive connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cellnode.backends.base import InstanceSpec
from cellnode.backends.container import ContainerBackend
from cellnode.exceptions import DeadlineExceeded
from cellnode.router.proxy import ProxyInstance
from tests.docker_engine import Engine
from tests.router.proxy_helpers import CHUNK, MB, Call

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(900)]

H2_APP = """\
import asyncio, json

CHUNK = b"x" * 65536


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = "startup" if message["type"] == "lifespan.startup" else "shutdown"
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    path, query = scope["path"], scope["query_string"].decode()
    if path == "/large":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x")]})
        for _ in range(int(query) * 16):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/slow":
        await asyncio.sleep(float(query))
    body = json.dumps({
        "http_version": scope["http_version"],
        "client_port": scope["client"][1],
        "body_size": size,
        "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
    }).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
"""

HYPERCORN = ["sh", "-c", 'exec python3 -m hypercorn app:app --bind "$CELLNODE_HOST:$PORT"']


def h2_node(tmp_path: Path, image: str) -> InstanceSpec:
    code = tmp_path / "app"
    code.mkdir(mode=0o755)
    code.chmod(0o755)  # pytest's temporary directories are 0700: the container's user must read the mount
    (code / "app.py").write_text(H2_APP)
    (code / "app.py").chmod(0o644)
    container = {
        "image": image,
        "endpoint": "http2",
        "port": 8080,
        "command": HYPERCORN,
        "working_dir": "/app",
        "mounts": [{"source": str(code), "target": "/app"}],
    }
    return InstanceSpec("n1", "h2", {"container": container}, log_path=tmp_path / "logs" / "n1")


def test_http2_endpoint_over_h2c(docker_engine: Engine, service_image: str, tmp_path: Path) -> None:
    async def call(
        instance: ProxyInstance,
        method: str,
        path: str,
        query: bytes = b"",
        *,
        body: list[bytes] | None = None,
        keep_body_up_to: int = MB,
    ) -> Call:
        exchange = Call(method, path, query=query, body=body, keep_body_up_to=keep_body_up_to)
        deadline = asyncio.get_running_loop().time() + instance.timeout
        await instance.forward(exchange.scope, exchange.receive, exchange.send, deadline=deadline, request_id="r1")
        return exchange

    async def scenario() -> None:
        async with ContainerBackend(base_url=docker_engine.host) as backend:
            handle = await backend.start(h2_node(tmp_path, service_image))
            try:
                await handle.wait_ready(60)
                assert handle.endpoint == "http2"
                instance = ProxyInstance(handle.instance_id, handle.node_id, handle.address, handle.endpoint, 2.0)
                try:
                    first = (await call(instance, "GET", "/echo")).json()
                    assert first["http_version"] == "2", "h2c with prior knowledge"
                    assert first["headers"] == [["host", handle.address], ["x-request-id", "r1"]]  # :authority

                    # Concurrent requests share the one connection, a slow one timing out among them.
                    slow = asyncio.create_task(call(instance, "GET", "/slow", b"5"))
                    answers = await asyncio.gather(*(call(instance, "GET", "/echo") for _ in range(20)))
                    ports = {answer.json()["client_port"] for answer in answers}
                    assert ports == {first["client_port"]}
                    with pytest.raises(DeadlineExceeded, match="within its timeout of 2 s"):
                        await slow
                    after = (await call(instance, "GET", "/echo")).json()
                    assert after["client_port"] == first["client_port"], "a timed-out stream leaves the connection"

                    # A streamed request body, and a large response, in chunks.
                    upload = await call(instance, "POST", "/echo", body=[CHUNK] * 48)
                    assert upload.json()["body_size"] == 48 * len(CHUNK) == 3 * MB
                    download = await call(instance, "GET", "/large", b"20", keep_body_up_to=0)
                    assert download.body_size == 20 * MB and download.body_messages > 20 and download.is_complete
                    assert download.start is not None and download.start["status"] == 200
                finally:
                    await instance.aclose()
            finally:
                await handle.stop()

    asyncio.run(scenario())
