"""The harness of the HTTP proxy tests: an upstream Starlette app (the instance) served by uvicorn on loopback, and
the front's side of one call (`Call`), built by hand."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Scope

from cellnode.router.proxy import ProxyInstance

MB = 1024 * 1024
CHUNK = b"x" * 65536
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


# The instance: a small Starlette app.


async def echo(request: Request) -> Response:
    body = await request.body()
    scope = request.scope
    return JSONResponse(
        {
            "method": request.method,
            "raw_path": scope["raw_path"].decode(),
            "query": scope["query_string"].decode(),
            "headers": [[name.decode(), value.decode()] for name, value in scope["headers"]],
            "body_size": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "http_version": scope["http_version"],
            "client_port": scope["client"][1],
        }
    )


async def count_body(request: Request) -> Response:
    size = chunks = 0
    async for chunk in request.stream():
        size += len(chunk)
        chunks += 1
    return JSONResponse({"size": size, "chunks": chunks})


async def slow(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params["seconds"]))
    return JSONResponse({"slept": True})


async def custom_headers(request: Request) -> Response:
    response = Response(b"created", status_code=201, media_type="text/plain")
    response.headers.append("x-custom", "1")
    response.headers.append("set-cookie", "a=1")
    response.headers.append("set-cookie", "b=2")
    response.headers.append("keep-alive", "timeout=5")
    response.headers.append("connection", "X-Secret-Hop")
    response.headers.append("x-secret-hop", "1")
    response.headers.append("x-request-id", "the-instance's-own")
    response.headers.append("x-cellnode-error", "NOT_FOUND")  # only cellnode's own errors carry it
    return response


def streamed(chunks: int, pause: float = 0.0, *, chunk: bytes = CHUNK, then_fail: bool = False) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            yield chunk
            if pause:
                await asyncio.sleep(pause)
        if then_fail:
            raise RuntimeError("the instance failed mid-body")

    return StreamingResponse(body(), media_type="application/octet-stream")


async def large(request: Request) -> Response:
    return streamed(int(request.query_params["mb"]) * 16)  # 16 chunks of 64 KiB a MiB


async def drip(request: Request) -> Response:
    return streamed(2, pause=float(request.query_params["pause"]), chunk=b"drop")


async def forever(request: Request) -> Response:
    return streamed(10**9, pause=0.001)


async def abort(request: Request) -> Response:
    return streamed(3, then_fail=True)


UPSTREAM = Starlette(
    routes=[
        Route("/echo/{rest:path}", echo, methods=ALL_METHODS),
        Route("/count-body", count_body, methods=["POST"]),
        Route("/slow", slow),
        Route("/headers", custom_headers),
        Route("/large", large),
        Route("/drip", drip),
        Route("/forever", forever),
        Route("/abort", abort),
    ]
)


# The front's side of one call, built by hand: a scope, a receive that gives the body in the chunks given and then
# waits for `leave` (a client disconnect), and a send that records what the client would get.


class Call:
    def __init__(
        self,
        method: str = "GET",
        path: str = "/echo/x",
        *,
        raw_path: bytes | None = None,
        query: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: list[bytes] | None = None,
        keep_body_up_to: int = MB,
    ) -> None:
        self.scope: Scope = {
            "type": "http",
            "http_version": "1.1",
            "method": method,
            "path": path,
            "raw_path": raw_path if raw_path is not None else path.encode(),
            "query_string": query,
            "headers": headers or [],
        }
        self.chunks = list(body or [b""])
        self.received = 0  # body messages taken by the proxy
        self.leave = asyncio.Event()
        self.start: Message | None = None
        self.body = bytearray()
        self.body_size = self.body_messages = self.largest_message = 0
        self.is_complete = False
        self.sent_at: list[float] = []
        self.keep_body_up_to = keep_body_up_to
        self.on_body: Any = None  # called with the body size after each body message

    async def receive(self) -> Message:
        if self.received < len(self.chunks):
            self.received += 1
            more = self.received < len(self.chunks)
            return {"type": "http.request", "body": self.chunks[self.received - 1], "more_body": more}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            assert self.start is None
            self.start = message
            return
        assert self.start is not None and not self.is_complete
        chunk = message["body"]
        self.body_size += len(chunk)
        self.body_messages += 1
        self.largest_message = max(self.largest_message, len(chunk))
        self.sent_at.append(time.monotonic())
        if self.body_size <= self.keep_body_up_to:
            self.body += chunk
        self.is_complete = not message["more_body"]
        if self.on_body is not None:
            self.on_body(self.body_size)

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        assert self.start is not None
        return list(self.start["headers"])

    def json(self) -> Any:
        assert self.is_complete
        return orjson.loads(self.body)


def deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def forward(instance: ProxyInstance, call: Call, *, seconds: float = 5.0, **extra: Any) -> int:
    return await instance.forward(
        call.scope, call.receive, call.send, deadline=deadline(seconds), request_id="r1", **extra
    )


def proxy(address: str, timeout: float = 5.0) -> ProxyInstance:
    return ProxyInstance("i1", "n1", address, "http", timeout)
