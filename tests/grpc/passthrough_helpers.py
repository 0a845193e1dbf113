"""The harness of the gRPC pass-through tests, against real `grpc.aio` servers on loopback: an upstream server (the
user's service, raw-bytes methods of each kind plus the typed `grpc.health.v1` service), and a front server whose
generic handler sends every method to `forward`, as `GrpcFront.find()` will (with the retry on NotStarted that the
execute core does)."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc
import orjson
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
