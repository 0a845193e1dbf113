"""A kept-alive HTTP/1.1 connection pool to one instance: the pass-through's hot path for "http" endpoints.

httpx's pool (httpcore) spent most of the front's CPU on a pass-through: its pool scans every connection for each
request (`_assign_requests_to_connections`, `is_socket_readable`), and h11 and anyio add their layers; at 64
connections that scan alone took half the front's time (bench/README.md, "passthrough_vs_direct.py"). Here each
connection is an asyncio Protocol whose answers httptools parses (llhttp in C, what uvicorn parses requests with),
idle connections wait in a list (the last one used goes first: its socket is the warmest), and nothing is locked:
the event loop is the only thread.

The caller gives the request head already framed, and a body of bytes or chunks; it gets the answer's status and
headers once they are in, then its body chunk by chunk (reading pauses past `HIGH_WATER` unread bytes, so a slow
client slows the instance rather than filling memory), and must `release()` it: a connection whose answer was read
whole and may be kept alive goes back to the pool, any other is closed.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterable, AsyncIterator
from typing import cast

import httptools

HIGH_WATER = 1 << 20  # unread response bytes per connection before reading pauses


class ConnectFailed(Exception):
    """The instance refused or did not take the connection: nothing was sent."""


class Broken(Exception):
    """The connection closed or sent something that is not HTTP/1.1, before the answer was whole."""


class Pool:
    """Connections to one `host:port`: at most `max_connections` open, at most `max_idle` of them kept idle, each
    for at most `keepalive_expiry` seconds, or until the instance closes it (seen as it happens, in
    `connection_lost`)."""

    def __init__(
        self, host: str, port: int, *, max_connections: int = 256, max_idle: int = 64, keepalive_expiry: float = 4.0
    ) -> None:
        self.host, self.port = host, port
        self.max_connections, self.max_idle, self.keepalive_expiry = max_connections, max_idle, keepalive_expiry
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._closed = False

    @property
    def connections(self) -> int:
        """Connections open now, idle or in use."""
        return self._open

    async def request(
        self, head: bytes, body: bytes | AsyncIterable[bytes], *, chunked: bool, head_only: bool
    ) -> Answer:
        """Send a request and wait for its answer's head. `head` is the request line and headers with the body's
        framing (Content-Length, or Transfer-Encoding: chunked and `chunked`); `head_only` for a HEAD request, whose
        answer has no body. ConnectFailed, Broken, or what iterating `body` raises."""
        connection = await self._acquire()
        try:
            await connection.send(head, body, chunked)
            await connection.head_in()
        except BaseException:
            self._discard(connection)
            raise
        if head_only:
            connection.done = True
            connection.reusable = False
        return Answer(self, connection)

    async def _acquire(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while self._idle:
            connection = self._idle.pop()
            if not connection.lost and loop.time() - connection.idle_since < self.keepalive_expiry:
                connection.reset()
                return connection
            self._discard(connection)
        if self._open >= self.max_connections:
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter  # a released connection, or None: a slot to open one in
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed over just as the request gave up
                    given = waiter.result()
                    if given is not None:
                        self.release(given)
                    else:
                        self._open -= 1
                        self._wake()
                raise
            if handed is not None:
                handed.reset()
                return handed
        else:
            self._open += 1
        try:
            _, connection = await loop.create_connection(_Connection, self.host, self.port)
        except OSError as exc:
            self._open -= 1
            self._wake()
            raise ConnectFailed(exc.strerror or str(exc)) from exc
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        if self._closed:
            connection.close()
            self._open -= 1
            raise ConnectFailed("the pool was closed")
        self._all.add(connection)
        return connection

    def release(self, connection: _Connection) -> None:
        if self._closed or not (connection.done and connection.reusable) or connection.lost:
            self._discard(connection)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        if len(self._idle) >= self.max_idle:
            self._discard(connection)
            return
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.append(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        if connection in self._all:
            self._all.remove(connection)
            self._open -= 1
            self._wake()

    def _wake(self) -> None:
        """Give a waiting request the slot of a connection that closed."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        """Close every connection, in use or idle; requests under way end with Broken."""
        self._closed = True
        self._idle = []
        for connection in list(self._all):
            self._discard(connection)
        await asyncio.sleep(0)  # the transports' close callbacks run


class Answer:
    """An answer whose head is in: `status`, `headers` (names as the instance wrote them), then `chunks()`."""

    __slots__ = ("_connection", "_pool", "headers", "status")

    def __init__(self, pool: Pool, connection: _Connection) -> None:
        self._pool, self._connection = pool, connection
        self.status = connection.status
        self.headers = connection.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; the chunks already in come as one. Broken if the connection ends it early."""
        connection = self._connection
        while True:
            if connection.chunks:
                body = connection.take()
                yield body
            elif connection.done:
                return
            elif connection.error is not None:
                raise connection.error
            else:
                await connection.more()

    def release(self) -> None:
        """Back to the pool if the answer was read whole and the connection may be kept; closed otherwise."""
        self._pool.release(self._connection)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.paused = False  # reading, past HIGH_WATER unread bytes
        self.idle_since = 0.0
        self._writable: asyncio.Future[None] | None = None
        self.reset()

    def reset(self) -> None:
        """Ready for the next request's answer."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.unread = 0
        self.done = False
        self.reusable = False
        self.framed = False  # the answer's body has a length or chunks (else it ends when the connection does)
        self.error: Exception | None = None
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- what the pool and Answer call

    async def send(self, head: bytes, body: bytes | AsyncIterable[bytes], chunked: bool) -> None:
        assert self.transport is not None
        if isinstance(body, bytes):
            self.transport.write(head + body)
            return
        self.transport.write(head)
        async for chunk in body:
            if self.lost:
                raise Broken("the instance closed the connection while the request body was being sent")
            self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if self._writable is not None:
                await self._writable
        if chunked:
            self.transport.write(b"0\r\n\r\n")

    async def head_in(self) -> None:
        if self.status:
            return
        if self.error is not None:
            raise self.error
        self._head = asyncio.get_running_loop().create_future()
        await self._head

    async def more(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def take(self) -> bytes:
        body = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.unread = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return body

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Broken("the instance switched protocols, which the pass-through does not carry"))
        except httptools.HttpParserError as exc:
            self._fail(Broken(f"its answer is not valid HTTP/1.1 ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.status and not self.done and not self.framed:
            self.done = True  # a body without a length ends with the connection
            self._wake()
        elif not self.done:
            reason = f" ({exc})" if exc is not None else ""
            self._fail(Broken(f"the instance closed the connection{reason}"))
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the answer is still to come
            self.headers = []
            return
        self.status = status
        lowered = {name.lower() for name, _ in self.headers}
        self.framed = b"content-length" in lowered or b"transfer-encoding" in lowered or status in (204, 304)
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.unread += len(body)
        if self.unread > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.status:
            return  # a 1xx answer's end
        self.done = True
        self.reusable = self.parser.should_keep_alive()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        self.error = error
        self.reusable = False
        if self.transport is not None:
            self.transport.close()
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
