"""The HTTP proxy to container instances, against real uvicorn servers on loopback: an upstream Starlette app (the
instance), and for the end-to-end tests an ASGI front that calls `forward`, as cellnode's execute front will."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import tracemalloc
from collections.abc import Iterator

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from cellnode.api.errors import error_response
from cellnode.exceptions import APIError, InvalidArgument
from cellnode.router.proxy import ProxyInstance
from tests.helpers import serve_asgi
from tests.router.proxy_helpers import CHUNK, MB, Call, forward, proxy


def rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
    ], "no hop-by-hop header, no Date or Server (the front's server sets them), no x-cellnode-error, cellnode's ID"
    assert bytes(call.body) == b"created" and call.body_messages == 1, "a body complete by its length: one message"


# Streaming


def test_a_50_mb_response_streams_through_in_chunks(upstream: str) -> None:
    call = Call("GET", "/large", query=b"mb=50", keep_body_up_to=0)
    samples: list[int] = []  # RSS at each 5 MB of the body passed

    def sample(size: int) -> None:
        if size >= (len(samples) + 1) * 5 * MB:
            samples.append(rss())

    call.on_body = sample

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


def test_a_client_that_leaves_before_the_answer_frees_the_instance(upstream: str) -> None:
    """As nginx does: the instance's connection is closed, and the request no longer counts in the node's queue."""
    call = Call("GET", "/slow", query=b"seconds=5")

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            task = asyncio.create_task(forward(instance, call))
            await asyncio.sleep(0.2)
            assert instance.outstanding == 1 and instance._pool is not None and instance._pool.connections == 1
            call.leave.set()
            assert await asyncio.wait_for(task, 1) == 499, "the metrics' status for a client that left"
            assert instance.outstanding == 0 and instance._pool.connections == 0 and call.start is None
            assert await forward(instance, Call("GET", "/echo/again")) == 200, "the instance still serves"
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
    with serve_asgi(Front(proxy(upstream, timeout=1.0)), lifespan="on") as address:
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
