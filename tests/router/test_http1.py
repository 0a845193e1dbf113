"""The HTTP/1.1 pool against a scripted server on loopback: framing, keep-alive and its limits, early and broken
answers, and the pool's bookkeeping when requests wait or give up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from cellnode.router.http1 import Broken, ConnectFailed, Pool

GET = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """Runs `script` for each connection; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(script: Script) -> AsyncIterator[tuple[Server, Pool]]:
    server = Server(script)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    pool = Pool("127.0.0.1", server.port, max_connections=2, max_idle=2, keepalive_expiry=5.0)
    try:
        yield server, pool
    finally:
        await pool.aclose()
        listener.close()
        await listener.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes = OK) -> None:
    while True:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()


async def body_of(pool: Pool, request: bytes = GET, *, head_only: bool = False) -> tuple[int, bytes]:
    answer = await pool.request(request, b"", chunked=False, head_only=head_only)
    try:
        return answer.status, b"".join([chunk async for chunk in answer.chunks()])
    finally:
        answer.release()


def test_a_kept_alive_connection_serves_the_next_requests() -> None:
    async def scenario() -> None:
        async with serving(keep_answering) as (server, pool):
            assert [await body_of(pool) for _ in range(5)] == [(200, b"ok")] * 5
            assert server.connections == 1 and pool.connections == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ],
)
def test_an_answer_that_closes_its_connection_is_not_reused(answer: bytes) -> None:
    async def scenario() -> None:
        async with serving(lambda r, w: keep_answering(r, w, answer)) as (server, pool):
            assert [await body_of(pool) for _ in range(3)] == [(200, b"ok")] * 3
            assert server.connections == 3 and pool.connections == 0

    asyncio.run(scenario())


def test_a_body_without_length_ends_with_the_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        await writer.drain()

    async def scenario() -> None:
        async with serving(script) as (_, pool):
            assert await body_of(pool) == (200, b"part one, part two")
            assert pool.connections == 0

    asyncio.run(scenario())


def test_chunked_answers_and_early_hints() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    hinted = b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n" + OK

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in (chunked, hinted):
            await read_request(reader)
            writer.write(answer)
            await writer.drain()

    async def scenario() -> None:
        async with serving(script) as (server, pool):
            assert await body_of(pool) == (200, b"abcde")
            answer = await pool.request(GET, b"", chunked=False, head_only=False)
            assert answer.status == 200 and answer.headers == [(b"content-length", b"2")], "the 103's headers dropped"
            assert b"".join([chunk async for chunk in answer.chunks()]) == b"ok"
            answer.release()
            assert server.connections == 1

    asyncio.run(scenario())


def test_a_head_answer_has_no_body_and_its_connection_is_closed() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        await writer.drain()
        await reader.read()  # until we close

    async def scenario() -> None:
        async with serving(script) as (_, pool):
            head = b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n"
            assert await asyncio.wait_for(body_of(pool, head, head_only=True), 5) == (200, b"")
            assert pool.connections == 0

    asyncio.run(scenario())


def test_a_chunked_request_body_is_framed() -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        seen.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(OK)
        await writer.drain()

    async def parts() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b"world"

    async def scenario() -> None:
        async with serving(script) as (_, pool):
            request = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            answer = await pool.request(request, parts(), chunked=True, head_only=False)
            assert answer.status == 200
            answer.release()

    asyncio.run(scenario())
    assert seen[1] == b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"


def test_an_idle_connection_the_server_closed_is_not_used() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()  # then closes, as a server past its keep-alive timeout does

    async def scenario() -> None:
        async with serving(script) as (server, pool):
            assert await body_of(pool) == (200, b"ok")
            await asyncio.sleep(0.1)  # the close arrives
            assert await body_of(pool) == (200, b"ok")
            assert server.connections == 2

    asyncio.run(scenario())


def test_an_idle_connection_past_its_expiry_is_closed() -> None:
    async def scenario() -> None:
        async with serving(keep_answering) as (server, pool):
            pool.keepalive_expiry = 0.05
            assert await body_of(pool) == (200, b"ok")
            await asyncio.sleep(0.1)
            assert await body_of(pool) == (200, b"ok")
            assert server.connections == 2 and pool.connections == 1

    asyncio.run(scenario())


def test_past_max_connections_a_request_waits_for_a_free_one() -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(OK)
            await writer.drain()

    async def scenario() -> None:
        async with serving(slow) as (server, pool):
            calls = [asyncio.create_task(body_of(pool)) for _ in range(5)]
            await asyncio.sleep(0.1)
            assert server.connections == 2 and pool.connections == 2
            gives_up = asyncio.create_task(body_of(pool))
            await asyncio.sleep(0.05)
            gives_up.cancel()  # a waiter that leaves must not keep a slot
            release.set()
            assert await asyncio.gather(*calls) == [(200, b"ok")] * 5
            assert server.connections == 2 and pool.connections == 2
            assert await body_of(pool) == (200, b"ok")

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"", "closed the connection"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "closed the connection"),
        (b"SMTP ready\r\n\r\n", "not valid HTTP/1.1"),
    ],
)
def test_broken_answers(answer: bytes, error: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def scenario() -> None:
        async with serving(script) as (_, pool):
            with pytest.raises(Broken, match=error):
                await body_of(pool)
            assert pool.connections == 0
            with pytest.raises(Broken, match=error):  # and the pool goes on
                await body_of(pool)

    asyncio.run(scenario())


def test_a_refused_connection_is_connect_failed() -> None:
    async def scenario() -> None:
        async with serving(keep_answering) as (server, pool):
            pool.port = server.port
        # The listener is closed now.
        closed = Pool("127.0.0.1", server.port)
        with pytest.raises(ConnectFailed):
            await closed.request(GET, b"", chunked=False, head_only=False)
        assert closed.connections == 0
        await closed.aclose()

    asyncio.run(scenario())


def test_reading_pauses_while_the_body_is_not_taken() -> None:
    size = 8 * 2**20

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // 2**16):
            writer.write(b"x" * 2**16)
            await writer.drain()

    async def scenario() -> None:
        async with serving(script) as (_, pool):
            answer = await pool.request(GET, b"", chunked=False, head_only=False)
            await asyncio.sleep(0.3)  # nobody reads: the connection stops reading past its high water mark
            connection = answer._connection
            assert connection.paused and connection.unread < 2 * 2**20
            total = 0
            async for chunk in answer.chunks():
                total += len(chunk)
            answer.release()
            assert total == size

    asyncio.run(scenario())
