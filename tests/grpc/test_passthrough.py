"""The gRPC pass-through to container instances, against real `grpc.aio` servers on loopback: an upstream server (the
user's service, raw-bytes methods of each kind plus the typed `grpc.health.v1` service), and a front server whose
generic handler sends every method to `forward`, as `GrpcFront.find()` will (with the retry on NotStarted that the
execute core does)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import any_pb2, wrappers_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cellnode.config import MAX_MESSAGE_BYTES
from cellnode.exceptions import APIError
from cellnode.grpc.passthrough import GrpcProxyInstance
from cellnode.grpc.rpc import abort
from cellnode.router.instance import NotStarted

MB = 1024 * 1024
CHUNK = b"x" * 65536
TRANSPORT_LIMIT = 2 * MAX_MESSAGE_BYTES
NO_PROXY = ("grpc.enable_http_proxy", 0)
Context = grpc.aio.ServicerContext[Any, Any]


# The instance: the user's own service.


class Upstream:
    """Methods of each kind on raw bytes; what they saw is kept for the tests to check."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.metadata: list[dict[str, Any]] = []
        self.remaining: list[float | None] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.received: list[bytes] = []
        self.step = asyncio.Queue[int]()  # the client's go-ahead for the next message of /test.Echo/Lockstep
        self.produced = 0
        self.answer_size = 0

    def methods(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        return {
            "/test.Echo/Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "/test.Echo/Metadata": grpc.unary_unary_rpc_method_handler(self.echo_metadata),
            "/test.Echo/Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "/test.Echo/Lockstep": grpc.unary_stream_rpc_method_handler(self.lockstep),
            "/test.Echo/Sum": grpc.stream_unary_rpc_method_handler(self.sum),
            "/test.Echo/Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "/test.Echo/First": grpc.stream_unary_rpc_method_handler(self.first),
            "/test.Echo/Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "/test.Echo/Sleep": grpc.unary_unary_rpc_method_handler(self.sleep),
            "/test.Echo/Big": grpc.unary_unary_rpc_method_handler(self.big),
        }

    def _saw(self, context: Context) -> None:
        self.peers.append(context.peer())
        self.remaining.append(context.time_remaining())
        seen: dict[str, Any] = {}
        for key, value in context.invocation_metadata() or ():
            seen.setdefault(key, []).append(value.hex() if isinstance(value, bytes) else value)
        self.metadata.append(seen)

    async def unary(self, request: bytes, context: Context) -> bytes:
        self._saw(context)
        return b"echo:" + request

    async def echo_metadata(self, request: bytes, context: Context) -> bytes:
        self._saw(context)
        await context.send_initial_metadata((("x-init", "1"), ("x-init-bin", b"\x00\x01\xff")))
        context.set_trailing_metadata(
            (
                ("x-trail", "2"),
                ("x-trail-bin", b"\xfe\x00"),
                ("x-request-id", "the-instance's-own"),
                ("x-cellnode-error", "NOT_FOUND"),  # only cellnode's own errors carry it
            )
        )
        return orjson.dumps(self.metadata[-1])

    async def stream(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        self._saw(context)
        count = wrappers_pb2.Int32Value.FromString(request).value
        for index in range(count):
            yield index.to_bytes(4, "big") + CHUNK

    async def lockstep(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        """Makes message i+1 only once the client said it has message i: a proxy that waits for the end deadlocks."""
        self._saw(context)
        for index in range(int(request)):
            self.produced += 1
            yield str(index).encode()
            assert await self.step.get() == index

    async def sum(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        self._saw(context)
        count = size = 0
        async for message in requests:
            self.received.append(message)
            count += 1
            size += len(message)
        return wrappers_pb2.StringValue(value=f"{count} messages, {size} bytes").SerializeToString()

    async def first(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        """Answers the first request at once, or refuses it: the caller may still be sending."""
        self._saw(context)
        async for message in requests:
            if message == b"refuse":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request is refused")
            return message
        return b""

    async def chat(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        self._saw(context)
        async for message in requests:
            yield message.upper()

    async def fail(self, request: bytes, context: Context) -> bytes:
        self._saw(context)
        code = grpc.StatusCode[request.decode()]
        await context.send_initial_metadata((("x-init", "before the failure"),))
        await context.abort(code, "the thing is not there", ((STATUS_DETAILS, DETAILS.SerializeToString()),))
        raise AssertionError("unreachable")

    async def sleep(self, request: bytes, context: Context) -> bytes:
        self._saw(context)
        self.started.set()
        try:
            await asyncio.sleep(float(request))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b"slept"

    async def big(self, request: bytes, context: Context) -> bytes:
        self._saw(context)
        self.answer_size = int(request)
        return b"x" * int(request)


STATUS_DETAILS = "grpc-status-details-bin"
DETAILS = status_pb2.Status(
    code=5,
    message="the thing is not there",
    details=[any_pb2.Any(type_url="type.googleapis.com/test.Why", value=b"\x08\x01")],
)


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, find: Callable[[str], grpc.RpcMethodHandler[Any, Any] | None]) -> None:
        self.find = find

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self.find(handler_call_details.method)


@asynccontextmanager
async def serve_upstream(upstream: Upstream) -> AsyncIterator[str]:
    """The upstream server, with the health service; its address."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([_Generic(upstream.methods().get)])
    servicer = health.aio.HealthServicer()
    await servicer.set("test.Echo", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


# The front: the wiring that GrpcFront.find() will do, minus authentication and the routing table.


class Front:
    """Sends every method to the first of `instances` that takes it; what `forward` returned or raised is kept."""

    def __init__(self, instances: Sequence[GrpcProxyInstance]) -> None:
        self.instances = instances
        self.codes: list[grpc.StatusCode] = []
        self.errors: list[APIError] = []
        self.request_ids: list[str] = []
        self.port = 0
        self.trailing: tuple[tuple[str, str], ...] = ()  # what the alias front adds: its x-node-id
        self.failures: list[Exception] = []

    def find(self, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        async def handle(requests: AsyncIterator[bytes], context: Context) -> None:
            target = method
            if method == "/test.Echo/BrokenRequests":  # the front's own request stream fails after one message
                requests, target = broken(requests), "/test.Echo/Sum"
            try:
                await self.handle(target, requests, context)
            except Exception as exc:
                self.failures.append(exc)
                raise

        return grpc.stream_stream_rpc_method_handler(handle)

    async def handle(self, method: str, requests: AsyncIterator[bytes], context: Context) -> None:
        loop = asyncio.get_running_loop()
        request_id = os.urandom(8).hex()
        self.request_ids.append(request_id)
        try:
            for attempt, instance in enumerate(self.instances):
                deadline = loop.time() + instance.timeout
                remaining = context.time_remaining()
                if remaining is not None:  # as GrpcFront._new_call: a little before the caller's deadline
                    deadline = min(deadline, loop.time() + remaining - min(0.05, remaining / 10))
                try:
                    code = await instance.forward(
                        method,
                        requests,
                        context,
                        deadline=deadline,
                        request_id=request_id,
                        trailing_metadata=self.trailing,
                    )
                    self.codes.append(code)
                    return
                except NotStarted as exc:
                    self.errors.append(exc)
                    if attempt == len(self.instances) - 1:
                        raise
        except APIError as exc:
            if not isinstance(exc, NotStarted):
                self.errors.append(exc)
            await abort(context, exc, request_id)


async def broken(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message
        raise RuntimeError("the request stream broke")


@asynccontextmanager
async def serve_front(*instances: GrpcProxyInstance) -> AsyncIterator[tuple[Front, grpc.aio.Channel]]:
    """The front server, and a client channel to it."""
    front = Front(instances)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", TRANSPORT_LIMIT),
            ("grpc.max_send_message_length", TRANSPORT_LIMIT),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers([_Generic(front.find)])
    front.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{front.port}", options=[NO_PROXY, ("grpc.max_receive_message_length", TRANSPORT_LIMIT)]
    )
    try:
        yield front, channel
    finally:
        await channel.close()
        await server.stop(None)
        for instance in instances:
            await instance.aclose()


@asynccontextmanager
async def setup(timeout: float = 10.0) -> AsyncIterator[tuple[Upstream, GrpcProxyInstance, Front, grpc.aio.Channel]]:
    upstream = Upstream()
    async with serve_upstream(upstream) as address:
        instance = GrpcProxyInstance("i1", "n1", address, timeout)
        async with serve_front(instance) as (front, channel):
            yield upstream, instance, front, channel


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run the scenario; fail it if a task was left with an exception nobody saw (asyncio would only log it)."""

    async def main() -> None:
        unseen: list[dict[str, Any]] = []

        def record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if isinstance(context.get("future"), asyncio.Task):  # not grpc's own callbacks, which log on shutdown
                unseen.append(context)
            else:
                loop.default_exception_handler(context)

        asyncio.get_running_loop().set_exception_handler(record)
        await asyncio.wait_for(scenario(), 20)
        gc.collect()
        assert unseen == []

    asyncio.run(main())


def free_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port that takes connections (the kernel's backlog) but never speaks: the channel stays CONNECTING."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def caller_metadata() -> tuple[tuple[str, str | bytes], ...]:
    return (
        ("authorization", "Bearer the-callers-token"),
        ("x-folder-id", "folder-1"),
        ("x-node-id", "n1"),
        ("x-custom", "kept"),
        ("x-custom-bin", b"\x00\xffbinary"),
        ("x-request-id", "the-callers-own"),
    )


# The four kinds of call.


def test_unary_call_and_typed_health_service_pass_through() -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            assert await channel.unary_unary("/test.Echo/Unary")(b"hello", timeout=5) == b"echo:hello"
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="test.Echo"), timeout=5
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert front.codes == [grpc.StatusCode.OK] * 2 and front.errors == []
            assert instance.outstanding == 0

    run(scenario)


def test_server_streaming_answer_flows_message_by_message() -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            call = channel.unary_stream("/test.Echo/Lockstep")(b"20", timeout=10)
            for index in range(20):
                assert await call.read() == str(index).encode()
                assert upstream.produced == index + 1  # the next one is made only after this one arrived
                assert instance.outstanding == 1
                upstream.step.put_nowait(index)
            assert await call.read() is grpc.aio.EOF
            assert await call.code() is grpc.StatusCode.OK
            assert instance.outstanding == 0

    run(scenario)


def test_a_long_server_streaming_answer_is_not_held_in_memory() -> None:
    count = 500  # 32 MB in all, 64 KiB a message

    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            request = wrappers_pb2.Int32Value(value=count).SerializeToString()
            received = 0
            tracemalloc.start()
            try:
                async for message in channel.unary_stream("/test.Echo/Stream")(request, timeout=15):
                    assert int.from_bytes(message[:4], "big") == received and len(message) == len(CHUNK) + 4
                    received += 1
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert received == count
            assert peak < 8 * MB, f"peak {peak / MB:.1f} MB for a {count * len(CHUNK) / MB:.0f} MB answer"

    run(scenario)


def test_client_streaming_call() -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            messages = [bytes([n]) * n for n in range(1, 101)]

            async def requests() -> AsyncIterator[bytes]:
                for message in messages:
                    yield message

            answer = await channel.stream_unary("/test.Echo/Sum")(requests(), timeout=5)
            assert wrappers_pb2.StringValue.FromString(answer).value == f"100 messages, {5050} bytes"
            assert upstream.received == messages

    run(scenario)


@pytest.mark.parametrize("first", [b"accept", b"refuse"])
def test_a_service_that_ends_the_call_while_requests_flow_keeps_its_status(first: bytes) -> None:
    """Our write that fails as the service ends the call must not turn its status into INTERNAL (grpc/grpc#36066).
    The caller is a sync client: a grpc.aio one has the same bug on its own hop."""
    calls = 30

    def endless() -> Iterator[bytes]:
        yield first
        while True:
            yield CHUNK

    def call_all(port: int) -> list[tuple[grpc.StatusCode, str | None]]:
        outcomes = []
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[NO_PROXY]) as channel:
            method = channel.stream_unary("/test.Echo/First")
            for _ in range(calls):
                try:
                    outcomes.append((grpc.StatusCode.OK, method(endless(), timeout=5).decode()))
                except grpc.RpcError as exc:
                    outcomes.append((exc.code(), exc.details()))
        return outcomes

    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            outcomes = await asyncio.to_thread(call_all, front.port)
            if first == b"accept":
                assert outcomes == [(grpc.StatusCode.OK, "accept")] * calls
            else:
                assert outcomes == [(grpc.StatusCode.INVALID_ARGUMENT, "the first request is refused")] * calls
            assert front.codes == [outcomes[0][0]] * calls
            assert instance.outstanding == 0

    run(scenario)


def test_bidi_call_interleaves_requests_and_answers() -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            call = channel.stream_stream("/test.Echo/Chat")(timeout=5)
            for word in (b"one", b"two", b"three"):
                await call.write(word)
                assert await call.read() == word.upper()  # answered before the next request is even sent
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() is grpc.StatusCode.OK

    run(scenario)


# Metadata and statuses.


def test_metadata_goes_both_ways_without_the_callers_credential() -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            front.trailing = (("x-node-id", "n1"),)
            call = channel.unary_unary("/test.Echo/Metadata")(b"", metadata=caller_metadata(), timeout=5)
            seen = orjson.loads(await call)
            (request_id,) = front.request_ids
            assert "authorization" not in seen
            assert seen["x-folder-id"] == ["folder-1"] and seen["x-node-id"] == ["n1"]
            assert seen["x-custom"] == ["kept"]
            assert seen["x-custom-bin"] == [b"\x00\xffbinary".hex()]
            assert seen["x-request-id"] == [request_id]
            assert seen["user-agent"][0].startswith("grpc-python")  # the channel's own, once
            assert not [key for key in seen if key.startswith(("grpc-", ":"))]

            initial = list(await call.initial_metadata())
            assert ("x-init", "1") in initial and ("x-init-bin", b"\x00\x01\xff") in initial
            trailing = list(await call.trailing_metadata())
            assert ("x-trail", "2") in trailing and ("x-trail-bin", b"\xfe\x00") in trailing
            assert [value for key, value in trailing if key == "x-request-id"] == [request_id]
            assert ("x-node-id", "n1") in trailing
            assert "x-cellnode-error" not in dict(trailing)

    run(scenario)


@pytest.mark.parametrize("code", ["NOT_FOUND", "UNAVAILABLE", "PERMISSION_DENIED"])
def test_the_services_error_goes_back_as_it_is(code: str) -> None:
    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            call = channel.unary_unary("/test.Echo/Fail")(code.encode(), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            error = caught.value
            assert error.code() is grpc.StatusCode[code]
            assert error.details() == "the thing is not there"
            assert ("x-init", "before the failure") in list(error.initial_metadata())
            trailing = dict(error.trailing_metadata())
            assert status_pb2.Status.FromString(trailing[STATUS_DETAILS]) == DETAILS
            assert trailing["x-request-id"] == front.request_ids[0]
            assert front.codes == [grpc.StatusCode[code]] and front.errors == []

    run(scenario)


def test_unknown_method_is_the_services_unimplemented() -> None:
    calls = 200  # the service answers before it reads the request, as our write of it is under way

    async def scenario() -> None:
        async with setup() as (upstream, instance, front, channel):
            for _ in range(calls):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary("/test.Echo/Nope")(b"x" * 1000, timeout=5)
                assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert front.codes == [grpc.StatusCode.UNIMPLEMENTED] * calls

    run(scenario)


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
