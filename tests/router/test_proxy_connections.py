"""The HTTP proxy's connections and bookkeeping: kept-alive connections reused, requests under way counted, health
and close, and instances only on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.types import Message

from cellnode.router.instance import NotStarted
from cellnode.router.proxy import ProxyInstance
from tests.router.proxy_helpers import Call, forward, proxy


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


def test_a_request_stops_counting_before_its_last_bytes_go_to_the_client(upstream: str) -> None:
    """The client's next request on its connection may come in before the last `send` returns; the node's queue
    must not count the answered one beside it."""
    seen: list[tuple[bool, int]] = []

    async def scenario() -> None:
        instance = proxy(upstream)
        try:
            for call in (Call(), Call("GET", "/drip", query=b"pause=0.01")):  # by its length; chunked to its end
                send = call.send

                async def counting(message: Message, send: Any = send, instance: ProxyInstance = instance) -> None:
                    if message["type"] == "http.response.body":
                        seen.append((message["more_body"], instance.outstanding))
                    await send(message)

                call.send = counting  # type: ignore[method-assign]
                assert await forward(instance, call) == 200
        finally:
            await instance.aclose()

    asyncio.run(scenario())
    assert [outstanding for more, outstanding in seen if not more] == [0, 0]
    assert all(outstanding == 1 for more, outstanding in seen if more)


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


@pytest.mark.parametrize("address", ["10.0.0.5:80", "example.com:80", "[fe80::1]:80"])
def test_only_loopback_instances(address: str) -> None:
    with pytest.raises(ValueError, match="not on loopback"):
        ProxyInstance("i1", "n1", address, "http", 1.0)


def test_httpx_limits_of_none_mean_no_limit() -> None:
    unbounded = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=None)
    instance = ProxyInstance("i1", "n1", "127.0.0.1:9", "http", 5.0, limits=unbounded)
    pool = instance._pool
    assert pool is not None and pool.max_connections >= 2**31 and pool.max_idle >= 2**31
    assert pool.keepalive_expiry == float("inf")
    limited = ProxyInstance("i2", "n1", "127.0.0.1:9", "http", 5.0, limits=httpx.Limits(max_connections=3))
    assert limited._pool is not None and limited._pool.max_connections == 3
