"""One persistent connection from the front to an instance, carrying one request frame at a time.

The instance answers every request frame with exactly one frame, in order, so the channel keeps at most one request
in flight (an `asyncio.Lock`) and pairs each answer with the request that is waiting for it. A frame is parsed
straight from the transport's buffer, with no stream reader and no task per request.

`submit()` is the low-level half: it sends the frame and returns a future of the answer, and the channel stays busy
until that future is done. A caller that gives up waiting (a timeout) can therefore keep the connection in step by
waiting on the same future later. If the future itself is cancelled, the answer can no longer be paired with its
request, so the channel closes.
"""

from __future__ import annotations

import asyncio

from cellnode.runtime.protocol import HEADER, MAX_PAYLOAD, ProtocolError, encode

Answer = tuple[int, bytes]


class InstanceChannel:
    """A persistent Unix-socket connection to one instance."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._transport: asyncio.Transport | None = None
        self._protocol: _FrameProtocol | None = None
        self._lock = asyncio.Lock()
        self._is_closed = False

    @property
    def is_closed(self) -> bool:
        """Whether the connection is gone (closed by us, by the instance, or broken); a closed channel stays closed."""
        return self._is_closed

    @property
    def is_connected(self) -> bool:
        """Whether `connect()` succeeded and the connection is still open."""
        return self._transport is not None and not self._is_closed

    async def connect(self) -> None:
        """Open the connection; ConnectionError if the instance is not listening."""
        if self._is_closed:
            raise ConnectionError(f"The channel to {self.address!r} is closed; open a new one.")
        if self._transport is not None:
            return
        loop = asyncio.get_running_loop()
        protocol = _FrameProtocol(self)
        try:
            transport, _ = await loop.create_unix_connection(lambda: protocol, self.address)
        except OSError as exc:
            if isinstance(exc, ConnectionError):
                raise
            raise ConnectionError(f"Cannot connect to the instance at {self.address!r}: {exc}.") from exc
        self._transport = transport
        self._protocol = protocol

    async def request(self, kind: int, payload: bytes = b"") -> Answer:
        """Send one frame and return the answer frame, waiting for earlier requests first."""
        answer = await self.submit(kind, payload)
        return await answer

    async def submit(
        self, kind: int, payload: bytes = b"", *, deadline: float | None = None, prefix: bytes = b""
    ) -> asyncio.Future[Answer]:
        """Send one frame, whose payload is `prefix` then `payload`, once the channel is free; a future of the answer.

        `deadline` is a `loop.time()` value: if the channel is still busy then, TimeoutError, and nothing is sent.
        A broken or closed connection raises ConnectionError, here or from the future.
        """
        loop = asyncio.get_running_loop()
        if deadline is not None and loop.time() >= deadline:
            raise TimeoutError("The deadline passed before the channel was free.")
        self._check_open()
        if deadline is not None and self._lock.locked():
            async with asyncio.timeout_at(deadline):
                await self._lock.acquire()
        else:
            await self._lock.acquire()
        try:
            self._check_open()
        except ConnectionError:
            self._lock.release()
            raise
        assert self._transport is not None and self._protocol is not None
        answer: asyncio.Future[Answer] = loop.create_future()
        answer.add_done_callback(self._on_answer_done)
        self._protocol.answer = answer
        self._transport.write(encode(kind, payload, prefix))
        return answer

    def close(self) -> None:
        """Close the connection; a request in flight fails with ConnectionError."""
        self._fail(ConnectionError(f"The channel to {self.address!r} was closed."))

    def _check_open(self) -> None:
        if self._is_closed:
            raise ConnectionError(f"The connection to the instance at {self.address!r} is closed.")
        if self._transport is None:
            raise ConnectionError(f"The channel to {self.address!r} is not connected; call connect() first.")

    def _on_answer_done(self, answer: asyncio.Future[Answer]) -> None:
        self._lock.release()
        if answer.cancelled():
            # The answer, when it comes, could not be told apart from the next request's.
            self.close()
        else:
            answer.exception()  # Marks the exception retrieved: the waiter may have given up on this future.

    def _fail(self, exc: ConnectionError) -> None:
        self._is_closed = True
        if self._protocol is not None:
            answer, self._protocol.answer = self._protocol.answer, None
            if answer is not None and not answer.done():
                answer.set_exception(exc)
        if self._transport is not None:
            self._transport.close()


class _FrameProtocol(asyncio.Protocol):
    def __init__(self, channel: InstanceChannel) -> None:
        self.channel = channel
        self.answer: asyncio.Future[Answer] | None = None
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= HEADER.size:
            length, kind = HEADER.unpack_from(buffer)
            if length > MAX_PAYLOAD:
                self.channel._fail(ProtocolError(f"The instance sent a frame of {length} bytes, over the limit."))
                return
            end = HEADER.size + length
            if len(buffer) < end:
                return
            payload = bytes(buffer[HEADER.size : end])
            del buffer[:end]
            answer, self.answer = self.answer, None
            if answer is None or answer.done():
                self.channel._fail(ProtocolError("The instance sent a frame that answers no request."))
                return
            answer.set_result((kind, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc is not None else ""
        self.channel._fail(ProtocolError(f"The instance closed the connection{reason}."))
