"""The gRPC pass-through's instance itself: one channel for every call, only loopback addresses, close, and the
health checks' `is_alive`."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cellnode.grpc.passthrough import GrpcProxyInstance
from tests.grpc.passthrough_helpers import run, serve_front, setup, silent_port

# The instance itself.


def test_one_channel_carries_every_call() -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            unary = channel.unary_unary("/test.Echo/Unary")
            for index in range(25):
                assert await unary(str(index).encode(), timeout=5) == f"echo:{index}".encode()
            answers = await asyncio.gather(*(unary(str(index).encode(), timeout=5) for index in range(25)))
            assert answers == [f"echo:{index}".encode() for index in range(25)]
            assert len(upstream.peers) == 50
            assert len(set(upstream.peers)) == 1, set(upstream.peers)

            # Another instance at the same address has a connection of its own (which its close() ends).
            other = GrpcProxyInstance("i2", "n1", instance.address, 10.0)
            front.instances = [other]
            assert await unary(b"x", timeout=5) == b"echo:x"
            assert upstream.peers[-1] not in upstream.peers[:-1]

    run(scenario)


@pytest.mark.parametrize("address", ["10.0.0.1:50051", "example.com:443", "0.0.0.0:1", "[2001:db8::1]:1"])
def test_only_loopback_addresses_are_taken(address: str) -> None:
    with pytest.raises(ValueError, match="is not on loopback"):
        GrpcProxyInstance("i1", "n1", address, 1.0)


@pytest.mark.parametrize("address", ["127.0.0.1:1", "127.1.2.3:1", "[::1]:1", "localhost:1"])
def test_loopback_addresses_are_taken(address: str) -> None:
    assert GrpcProxyInstance("i1", "n1", address, 1.0).address == address


def test_close_ends_calls_under_way_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            assert await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=5) == b"echo:x"
            call = channel.unary_unary("/test.Echo/Sleep")(b"10", timeout=5)
            await asyncio.wait_for(upstream.started.wait(), 5)
            await instance.aclose()
            assert not instance.is_alive
            instance.is_alive = True
            assert not instance.is_alive  # for good
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "it was taken out of service" in (caught.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=5)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert caught.value.details() == "Instance 'i1' of node 'n1' was taken out of service."
            await asyncio.wait_for(upstream.cancelled.wait(), 2)
            assert instance.outstanding == 0

    run(scenario)


def test_an_instance_closed_before_its_first_call_opens_no_channel() -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            await instance.aclose()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=5)
            assert caught.value.details() == "Instance 'i1' of node 'n1' was taken out of service."
            assert upstream.peers == []

    run(scenario)


def test_close_while_a_call_waits_for_its_connection() -> None:
    async def scenario() -> None:
        with silent_port() as port:
            instance = GrpcProxyInstance("i1", "n1", f"127.0.0.1:{port}", 10.0)
            async with serve_front(instance) as (front, channel):
                call = channel.unary_unary("/test.Echo/Unary")(b"x", timeout=5)
                await asyncio.sleep(0.2)
                assert instance.outstanding == 1
                await instance.aclose()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
                assert caught.value.details() == "Instance 'i1' of node 'n1' was taken out of service."

    run(scenario)


def test_is_alive_is_the_health_checks_to_set() -> None:
    instance = GrpcProxyInstance("i1", "n1", "127.0.0.1:1", 1.0)
    assert instance.is_alive and instance.outstanding == 0
    instance.is_alive = False
    assert not instance.is_alive
    instance.is_alive = True
    assert instance.is_alive
    assert repr(instance) == "GrpcProxyInstance('i1', node='n1', grpc at 127.0.0.1:1)"
