"""The gRPC pass-through's time, limits and failures: the node's timeout and the caller's deadline, cancellation, an
instance that refuses the connection or dies mid-call, messages over 16 MB, a request stream that fails."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import wrappers_pb2

from cellnode.grpc.passthrough import GrpcProxyInstance
from cellnode.router.instance import NotStarted
from tests.grpc.passthrough_helpers import (
    CHUNK,
    MB,
    Upstream,
    free_port,
    run,
    serve_front,
    serve_upstream,
    setup,
    silent_port,
)

# Time, cancellation, failures.


def test_the_nodes_timeout_ends_the_call() -> None:
    async def scenario() -> None:
        async with setup(timeout=0.3) as (upstream, instance, front, channel):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Echo/Sleep")(b"5")
            assert time.monotonic() - started < 2
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert caught.value.details() == (
                "Node 'n1' did not answer within its timeout of 0.3 s; the call to instance 'i1' was cancelled."
            )
            (remaining,) = upstream.remaining
            assert remaining is not None and remaining < 0.35  # the service knew its deadline
            await asyncio.wait_for(upstream.cancelled.wait(), 2)
            assert instance.outstanding == 0

    run(scenario)


def test_the_callers_shorter_deadline_goes_upstream() -> None:
    async def scenario() -> None:
        async with setup(timeout=30.0) as (upstream, instance, front, channel):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Echo/Sleep")(b"5", timeout=0.5)
            assert time.monotonic() - started < 2
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            (remaining,) = upstream.remaining
            assert remaining is not None and remaining < 0.55
            await asyncio.wait_for(upstream.cancelled.wait(), 2)

    run(scenario)


def test_the_nodes_timeout_covers_the_wait_for_a_connection() -> None:
    async def scenario() -> None:
        with silent_port() as port:
            instance = GrpcProxyInstance("i1", "n1", f"127.0.0.1:{port}", 0.3)
            async with serve_front(instance) as (front, channel):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=5)
                assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                assert caught.value.details() == (
                    "Node 'n1' did not answer within its timeout of 0.3 s; the call was still waiting for a connection."
                )

    run(scenario)


def test_a_caller_that_stops_reading_is_cut_off_at_the_deadline() -> None:
    async def scenario() -> None:
        async with setup(timeout=0.5) as (upstream, instance, front, channel):
            request = wrappers_pb2.Int32Value(value=100_000).SerializeToString()  # 6 GB: far more than the windows
            call = channel.unary_stream("/test.Echo/Stream")(request)
            assert len(await call.read()) == len(CHUNK) + 4
            await asyncio.sleep(1.0)  # reads nothing past the node's timeout: the forward waits in its write
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while True:
                    await call.read()
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert caught.value.details() == (
                "Node 'n1' did not answer within its timeout of 0.5 s; the call to instance 'i1' was cancelled."
            )
            assert instance.outstanding == 0

    run(scenario)


def test_caller_cancel_cancels_the_upstream_call() -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            call = channel.unary_unary("/test.Echo/Sleep")(b"10")
            await asyncio.wait_for(upstream.started.wait(), 5)
            assert instance.outstanding == 1
            call.cancel()
            await asyncio.wait_for(upstream.cancelled.wait(), 2)
            for _ in range(100):
                if instance.outstanding == 0:
                    break
                await asyncio.sleep(0.01)
            assert instance.outstanding == 0

    run(scenario)


def test_an_instance_that_refuses_the_connection_leaves_the_call_to_the_next() -> None:
    async def scenario() -> None:
        upstream = Upstream()
        async with serve_upstream(upstream) as address:
            down = GrpcProxyInstance("i0", "n1", f"127.0.0.1:{free_port()}", 10.0)
            up = GrpcProxyInstance("i1", "n1", address, 10.0)
            async with serve_front(down, up) as (front, channel):

                async def requests() -> AsyncIterator[bytes]:
                    for message in (b"a", b"bb", b"ccc"):
                        yield message

                answer = await channel.stream_unary("/test.Echo/Sum")(requests(), timeout=5)
                assert wrappers_pb2.StringValue.FromString(answer).value == "3 messages, 6 bytes"
                assert upstream.received == [b"a", b"bb", b"ccc"]  # none was lost to the refusing instance
                (refused,) = front.errors
                assert isinstance(refused, NotStarted)
                assert "'i0' of node 'n1' accepts no connection" in refused.message
                assert down.outstanding == 0

                # With no other instance, the caller is told.
                front.instances = [down]
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=5)
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "nothing ran, so another instance may take the call" in (caught.value.details() or "")

    run(scenario)


DYING_UPSTREAM = """
import asyncio, grpc

async def drip(request, context):
    yield b"first"
    await asyncio.sleep(30)

class Handler(grpc.GenericRpcHandler):
    def service(self, details):
        return grpc.unary_stream_rpc_method_handler(drip)

async def main():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([Handler()])
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
"""


def test_an_instance_that_dies_mid_call_is_unavailable() -> None:
    async def scenario() -> None:
        with subprocess.Popen([sys.executable, "-c", DYING_UPSTREAM], stdout=subprocess.PIPE, text=True) as process:
            try:
                assert process.stdout is not None
                port = int(await asyncio.to_thread(process.stdout.readline))
                instance = GrpcProxyInstance("i1", "n1", f"127.0.0.1:{port}", 10.0)
                async with serve_front(instance) as (front, channel):
                    call = channel.unary_stream("/test.Echo/Drip")(b"", timeout=10)
                    assert await call.read() == b"first"
                    process.send_signal(signal.SIGKILL)
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call.read()
                    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
                    assert (caught.value.details() or "").startswith(
                        "Instance 'i1' of node 'n1' did not finish the call: its connection broke ("
                    )
            finally:
                process.kill()

    run(scenario)


@pytest.mark.parametrize("size", [17 * MB, 33 * MB])
def test_an_answer_over_16_mb_is_refused_with_our_message(size: int) -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Echo/Big")(str(size).encode(), timeout=10)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            details = caught.value.details() or ""
            assert details.startswith("Instance 'i1' of node 'n1' sent a message of ")
            assert "over the 16 MB limit of a message (16777216 bytes)" in details
            assert upstream.answer_size == size

    run(scenario)


def test_a_request_over_16_mb_is_refused_with_our_message() -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):

            async def requests() -> AsyncIterator[bytes]:
                yield b"small"
                yield b"x" * (17 * MB)

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.stream_unary("/test.Echo/Sum")(requests(), timeout=10)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert caught.value.details() == (
                f"The request message is {17 * MB} bytes, over the 16 MB limit (16777216 bytes); send less data."
            )
            assert upstream.received == [b"small"]

    run(scenario)


def test_a_failure_of_the_callers_request_stream_ends_the_upstream_call() -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):

            async def requests() -> AsyncIterator[bytes]:
                yield b"one"
                await asyncio.sleep(10)
                yield b"two"

            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.stream_unary("/test.Echo/BrokenRequests")(requests(), timeout=5)
            assert caught.value.code() is grpc.StatusCode.UNKNOWN
            assert time.monotonic() - started < 2  # the upstream call did not wait for more requests
            (failure,) = front.failures
            assert isinstance(failure, RuntimeError) and str(failure) == "the request stream broke"
            assert instance.outstanding == 0

    run(scenario)
