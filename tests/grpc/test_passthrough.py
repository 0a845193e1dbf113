"""The gRPC pass-through's calls: the four kinds of call, message by message, and the metadata and statuses that go
both ways."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Iterator

import grpc
import orjson
import pytest
from google.protobuf import wrappers_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.grpc.passthrough_helpers import CHUNK, DETAILS, MB, NO_PROXY, STATUS_DETAILS, caller_metadata, run, setup

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
