"""The HTTP proxy's limits and failures: a body over the limit, the deadline, an instance that stalls, breaks or is
not there, a client that leaves before its body ends."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from starlette.types import Message

from cellnode.exceptions import DeadlineExceeded, InvalidArgument, PayloadTooLarge, ResponseAborted, Unavailable
from cellnode.router.instance import NotStarted
from tests.router.proxy_helpers import CHUNK, MB, Call, deadline, forward, proxy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
