"""The HTTP proxy to container instances, against real uvicorn servers on loopback: an upstream Starlette app (the
instance), and for the end-to-end tests an ASGI front that calls `forward`, as cellnode's execute front will."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cellnode.api.errors import error_response
from cellnode.exceptions import (
    APIError,
    DeadlineExceeded,
    InvalidArgument,
    PayloadTooLarge,
    ResponseAborted,
    Unavailable,
)
from cellnode.router.instance import NotStarted
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


@contextmanager
def serve(app: ASGIApp, lifespan: Literal["on", "off"] = "off") -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free loopback port; yields its `127.0.0.1:PORT`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan=lifespan, ws="none", log_level="critical", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve(UPSTREAM) as address:
        yield address


def rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


# Pass-through


def test_method_path_query_headers_and_body_pass_through(upstream: str) -> None:
    body = [b"a" * 1000, b"b" * 2000, b"c" * 3000]
    headers = [
        (b"host", b"cellnode.example"),
        (b"authorization", b"Bearer cellnode-secret"),
        (b"connection", b"keep-alive, X-Hop"),
        (b"x-hop", b"named by connection"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"trailer", b"x-checksum"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic c2VjcmV0"),
        (b"proxy-authenticate", b"Basic"),
        (b"expect", b"100-continue"),
        (b"x-request-id", b"chosen-by-the-client"),
        (b"x-node-id", b"n1"),
        (b"x-multi", b"one"),
        (b"x-multi", b"two"),
        (b"content-type", b"application/octet-stream"),
        (b"content-length", b"6000"),
    ]
    call = Call("PUT", "/echo/a/b c", raw_path=b"/echo/a%2Fb%20c", query=b"x=1&y=%2F&z", headers=headers, body=body)

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            assert await forward(instance, call) == 200
        finally:
            await instance.aclose()

    asyncio.run(scenario())
    echoed = call.json()
    assert echoed["method"] == "PUT"
    assert (echoed["raw_path"], echoed["query"]) == ("/echo/a%2Fb%20c", "x=1&y=%2F&z")
    assert (echoed["body_size"], echoed["body_sha256"]) == (6000, hashlib.sha256(b"".join(body)).hexdigest())
    assert echoed["headers"] == [
        ["host", upstream],
        ["x-node-id", "n1"],
        ["x-multi", "one"],
        ["x-multi", "two"],
        ["content-type", "application/octet-stream"],
        ["x-request-id", "r1"],
        ["content-length", "6000"],
    ]
    assert call.received == 3


def test_bodies_without_a_length_and_empty_ones(upstream: str) -> None:
    chunked = Call("POST", "/count-body", body=[CHUNK] * 40)  # 2.5 MiB, no Content-Length: sent chunked
    empty = Call("GET", "/echo/empty")
    one_message = Call("POST", "/echo/one", body=[b'{"a": 1}'])

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            for call in (chunked, empty, one_message):
                assert await forward(instance, call) == 200
        finally:
            await instance.aclose()

    asyncio.run(scenario())
    assert chunked.json()["size"] == 40 * len(CHUNK) and chunked.json()["chunks"] > 1
    assert not {"content-length", "transfer-encoding"} & {name for name, _ in empty.json()["headers"]}
    assert ["content-length", "8"] in one_message.json()["headers"] and one_message.json()["body_size"] == 8


def test_a_target_that_is_not_ascii_is_refused(upstream: str) -> None:
    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            with pytest.raises(InvalidArgument, match="is not a valid URL path"):
                await forward(instance, Call("GET", "/café", raw_path="/café".encode()))
            assert instance.outstanding == 0
        finally:
            await instance.aclose()

    asyncio.run(scenario())


def test_response_status_and_headers_come_back(upstream: str) -> None:
    call = Call("GET", "/headers")

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            assert await forward(instance, call, response_headers=[(b"x-node-id", b"n1")]) == 201
        finally:
            await instance.aclose()

    asyncio.run(scenario())
    assert call.start is not None and call.start["status"] == 201
    assert call.headers == [
        (b"content-length", b"7"),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"x-custom", b"1"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-request-id", b"r1"),
        (b"x-node-id", b"n1"),
    ], "no hop-by-hop header, no Date or Server (the front's server sets them), cellnode's request ID"
    assert bytes(call.body) == b"created" and call.body_messages == 1, "a body complete by its length: one message"


# Streaming


def test_a_50_mb_response_streams_through_in_chunks(upstream: str) -> None:
    call = Call("GET", "/large", query=b"mb=50", keep_body_up_to=0)
    samples: list[int] = []  # RSS every 5 MB or so of the body
    call.on_body = lambda size: samples.append(rss()) if size % (5 * MB) < len(CHUNK) else None

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            tracemalloc.start()
            try:
                assert await forward(instance, call) == 200
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        finally:
            await instance.aclose()
        assert peak < 8 * MB, f"{peak} bytes allocated at the peak: the body was buffered"

    before = rss()
    asyncio.run(scenario())
    assert call.body_size == 50 * MB and call.is_complete
    assert call.body_messages >= 50 * MB // (256 * 1024) and call.largest_message <= MB
    assert len(samples) >= 9 and max(samples) - before < 25 * MB, f"RSS grew by {(max(samples) - before) / MB:.1f} MB"


def test_chunks_reach_the_client_as_the_instance_sends_them(upstream: str) -> None:
    call = Call("GET", "/drip", query=b"pause=0.3")

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            began = time.monotonic()
            assert await forward(instance, call) == 200
        finally:
            await instance.aclose()
        first, second = call.sent_at[0] - began, call.sent_at[1] - began
        assert first < 0.25 <= second, (first, second)

    asyncio.run(scenario())
    assert bytes(call.body) == b"dropdrop" and call.body_messages == 3, "two chunks, then the end"


def test_a_client_that_leaves_mid_body_ends_the_forward(upstream: str) -> None:
    call = Call("GET", "/forever", keep_body_up_to=0)
    call.on_body = lambda size: call.leave.set() if size >= 10 * len(CHUNK) else None

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            assert await asyncio.wait_for(forward(instance, call), 5) == 200
            assert instance.outstanding == 0 and not call.is_complete
            again = Call("GET", "/echo/again")
            assert await forward(instance, again) == 200, "the instance still serves"
        finally:
            await instance.aclose()

    asyncio.run(scenario())


def test_a_caller_cancelling_the_forward_is_not_swallowed(upstream: str) -> None:
    async def scenario() -> None:
        instance = proxy(upstream)
        call = Call("GET", "/forever", keep_body_up_to=0)
        try:
            task = asyncio.create_task(forward(instance, call))
            while call.body_size < 5 * len(CHUNK):
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert instance.outstanding == 0
        finally:
            await instance.aclose()

    asyncio.run(scenario())


# Limits and errors


def test_a_body_over_16_mb_is_refused(upstream: str) -> None:
    declared = Call("POST", "/count-body", headers=[(b"content-length", str(16 * MB + 1).encode())], body=[b"x"])
    streamed_over = Call("POST", "/count-body", body=[b"x" * MB] * 17)
    one_message_over = Call("POST", "/count-body", body=[b"x" * (16 * MB + 1)])
    just_under = Call("POST", "/count-body", body=[b"x" * MB] * 16)

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            with pytest.raises(PayloadTooLarge) as raised:
                await forward(instance, declared)
            assert raised.value.message == (
                "The request body is 16777217 bytes, over the 16 MB limit (16777216 bytes); send less data."
            )
            assert declared.received == 0, "refused by its Content-Length before any of it was read"
            for call in (streamed_over, one_message_over):
                with pytest.raises(
                    PayloadTooLarge, match="^The request body is at least 1[67][0-9]{6} bytes, over the 16 MB"
                ):
                    await forward(instance, call)
                assert call.start is None
            assert await forward(instance, just_under) == 200
            assert instance.outstanding == 0
        finally:
            await instance.aclose()

    asyncio.run(scenario())
    assert just_under.json()["size"] == 16 * MB


def test_past_the_deadline_is_deadline_exceeded(upstream: str) -> None:
    async def scenario() -> None:
        instance = proxy(upstream, timeout=0.3)
        try:
            began = time.monotonic()
            with pytest.raises(DeadlineExceeded) as raised:
                await forward(instance, Call("GET", "/slow", query=b"seconds=1"), seconds=0.3)
            assert 0.25 < time.monotonic() - began < 1.5
            assert raised.value.message == (
                "Node 'n1' did not answer within its timeout of 0.3 s; the request to instance 'i1' was cancelled."
            )
            assert instance.outstanding == 0
            assert await forward(instance, Call("GET", "/slow", query=b"seconds=0")) == 200
        finally:
            await instance.aclose()

    asyncio.run(scenario())


def test_a_body_that_stalls_past_the_timeout_aborts(upstream: str) -> None:
    call = Call("GET", "/drip", query=b"pause=2")

    async def scenario() -> None:
        instance = proxy(upstream, timeout=0.3)
        try:
            with pytest.raises(ResponseAborted, match="failed after its response \\(HTTP 200\\) had started: it sent"):
                await forward(instance, call)
        finally:
            await instance.aclose()

    asyncio.run(scenario())
    assert call.start is not None and bytes(call.body) == b"drop" and not call.is_complete


def test_an_instance_that_fails_mid_body_aborts(upstream: str) -> None:
    call = Call("GET", "/abort")

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            with pytest.raises(ResponseAborted, match="its connection broke") as raised:
                await forward(instance, call)
            assert raised.value.status_code == 200
        finally:
            await instance.aclose()

    asyncio.run(scenario())
    assert call.body_size == 3 * len(CHUNK) and not call.is_complete


def test_a_closed_port_is_not_started() -> None:
    async def scenario() -> None:
        instance = proxy(f"127.0.0.1:{free_port()}")
        call = Call("POST", "/echo/x", body=[b"payload"])
        try:
            with pytest.raises(NotStarted) as raised:
                await forward(instance, call)
        finally:
            await instance.aclose()
        assert isinstance(raised.value, Unavailable) and raised.value.status_code == 503
        assert raised.value.message.startswith("Instance 'i1' of node 'n1' refused the connection (")
        assert raised.value.message.endswith("nothing ran, so another instance may take the request.")

    asyncio.run(scenario())


@contextmanager
def closing_server() -> Iterator[str]:
    """A TCP server that reads a request's head and resets the connection without answering."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


def test_a_connection_closed_before_the_answer_is_unavailable() -> None:
    async def scenario(address: str) -> None:
        instance = proxy(address)
        try:
            with pytest.raises(Unavailable) as raised:
                await forward(instance, Call("GET", "/anything"))
        finally:
            await instance.aclose()
        assert not isinstance(raised.value, NotStarted), "the request was sent: it may have run"
        assert raised.value.message.startswith("Instance 'i1' of node 'n1' broke the connection before it answered")

    with closing_server() as address:
        asyncio.run(scenario(address))


def test_a_client_gone_before_its_body_ends_is_refused(upstream: str) -> None:
    call = Call("POST", "/count-body", body=[b"x" * 1000, b"y"])

    async def receive() -> Message:
        message = await Call.receive(call)
        return {"type": "http.disconnect"} if call.received == 2 else message

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            with pytest.raises(InvalidArgument, match="closed the connection before it sent the whole request body"):
                await instance.forward(call.scope, receive, call.send, deadline=deadline(), request_id="r1")
        finally:
            await instance.aclose()

    asyncio.run(scenario())


# Connections and bookkeeping


def test_connections_are_reused(upstream: str) -> None:
    async def port_of(instance: ProxyInstance) -> int:
        call = Call("GET", "/echo/port")
        await forward(instance, call)
        return int(call.json()["client_port"])

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            sequential = {await port_of(instance) for _ in range(50)}
            assert len(sequential) == 1, "one kept-alive connection for requests one after another"
            concurrent = set(await asyncio.gather(*(port_of(instance) for _ in range(8))))
            assert 1 <= len(concurrent) <= 8
            again = {await port_of(instance) for _ in range(20)}
            assert again <= sequential | concurrent, "no new connection once the pool has some"
        finally:
            await instance.aclose()

    asyncio.run(scenario())


def test_outstanding_counts_a_request_until_its_body_ends(upstream: str) -> None:
    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            call = Call("GET", "/drip", query=b"pause=0.3")  # a chunk, 0.3 s, a chunk, 0.3 s, the end
            streaming = asyncio.create_task(forward(instance, call))
            await asyncio.sleep(0.1)
            assert instance.outstanding == 1 and call.body_size == 4, "under way while its body streams"
            slow = asyncio.create_task(forward(instance, Call("GET", "/slow", query=b"seconds=0.05")))
            await asyncio.sleep(0.02)
            assert instance.outstanding == 2
            await slow
            assert instance.outstanding == 1 and not call.is_complete
            await streaming
            assert instance.outstanding == 0 and call.is_complete
        finally:
            await instance.aclose()

    asyncio.run(scenario())


def test_health_and_close(upstream: str) -> None:
    async def scenario() -> None:
        instance = proxy(upstream)
        assert (instance.instance_id, instance.node_id, instance.timeout, instance.is_alive) == ("i1", "n1", 5.0, True)
        instance.is_alive = False  # a failed health check takes it out of rotation
        assert not instance.is_alive
        instance.is_alive = True
        assert await forward(instance, Call()) == 200
        instance.close()
        assert not instance.is_alive
        instance.is_alive = True
        assert not instance.is_alive, "a closed instance stays out of service"
        await instance.aclose()
        with pytest.raises(NotStarted, match="Instance 'i1' of node 'n1' was taken out of service."):
            await forward(instance, Call())

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="Endpoint 'grpc' cannot be proxied over HTTP"):
        ProxyInstance("i1", "n1", upstream, "grpc", 5.0)


# End to end: a real ASGI front in front of the proxy, called over HTTP.


class Front:
    """The execute front's part, reduced: route every request to one instance, render errors raised before the
    response started, let ResponseAborted drop the connection."""

    def __init__(self, instance: ProxyInstance) -> None:
        self.instance = instance

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.instance.aclose()  # its connections belong to this server's loop
            await send({"type": "lifespan.shutdown.complete"})
            return
        loop = asyncio.get_running_loop()
        try:
            await self.instance.forward(
                scope, receive, send, deadline=loop.time() + self.instance.timeout, request_id="front-1"
            )
        except APIError as exc:
            response = error_response(exc)
            response.headers["x-request-id"] = "front-1"
            await response(scope, receive, send)


@pytest.fixture(scope="module")
def front(upstream: str) -> Iterator[str]:
    with serve(Front(proxy(upstream, timeout=1.0)), lifespan="on") as address:
        yield f"http://{address}"


def test_end_to_end_through_a_front(front: str) -> None:
    with httpx.Client(base_url=front, trust_env=False) as client:
        answer = client.post(
            "/echo/a%20b?q=1", content=b'{"input": 1}', headers={"authorization": "Bearer secret", "x-node-id": "n1"}
        )
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "front-1"
        assert answer.headers.get_list("date") == [answer.headers["date"]] and answer.headers["server"] == "uvicorn"
        echoed = answer.json()
        assert (echoed["method"], echoed["raw_path"], echoed["query"]) == ("POST", "/echo/a%20b", "q=1")
        names = [name for name, _ in echoed["headers"]]
        assert "authorization" not in names and ["x-request-id", "front-1"] in echoed["headers"]
        assert echoed["body_size"] == 12

        before = rss()
        received = chunks = 0
        with client.stream("GET", "/large?mb=50") as streaming:
            for chunk in streaming.iter_raw():
                received += len(chunk)
                chunks += 1
        assert received == 50 * MB and chunks > 100
        assert rss() - before < 25 * MB

        too_large = client.post("/count-body", content=b"x" * (16 * MB + 1))
        assert too_large.status_code == 413 and too_large.json()["code"] == 8
        timed_out = client.get("/slow?seconds=1.5")
        assert timed_out.status_code == 504
        assert "did not answer within its timeout of 1 s" in timed_out.json()["message"]
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/abort")  # the front dropped the connection: the body is incomplete
        assert client.get("/echo/after").status_code == 200


@pytest.mark.parametrize("address", ["10.0.0.5:80", "example.com:80", "[fe80::1]:80"])
def test_only_loopback_instances(address: str) -> None:
    with pytest.raises(ValueError, match="not on loopback"):
        ProxyInstance("i1", "n1", address, "http", 1.0)
