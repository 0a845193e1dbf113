from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cellnode.backends.local import LocalBackend
from cellnode.router.channel import InstanceChannel
from cellnode.runtime.protocol import EXECUTE, OK, PING, PONG, ProtocolError, encode
from tests.backends.instances import start_ready
from tests.runtime.checkpoints import launch_spec

SLEEPER = ("import time",)


def sleeper(tmp_path: Path) -> dict[str, object]:
    return launch_spec(tmp_path, "time.sleep(seconds)\ny = seconds", setup=SLEEPER, outputs={"y": "float"})


def test_requests_are_serialized(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, sleeper(tmp_path))
            channel = InstanceChannel(handle.address)
            assert not channel.is_connected
            await channel.connect()
            assert channel.is_connected
            answers = await asyncio.gather(
                channel.request(EXECUTE, b'{"seconds": 0.05}'),
                *(channel.request(PING) for _ in range(10)),
                channel.request(EXECUTE, b'{"seconds": 0}'),
            )
            assert answers == [(OK, b'{"y":0.05}'), *[(PONG, b"")] * 10, (OK, b'{"y":0}')]
            channel.close()
            assert channel.is_closed and not channel.is_connected
            with pytest.raises(ConnectionError, match="is closed"):
                await channel.request(PING)
            with pytest.raises(ConnectionError, match="is closed; open a new one"):
                await channel.connect()

    asyncio.run(scenario())


def test_deadline_while_busy_sends_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, sleeper(tmp_path))
            channel = InstanceChannel(handle.address)
            await channel.connect()
            loop = asyncio.get_running_loop()
            busy = await channel.submit(EXECUTE, b'{"seconds": 0.3}')
            with pytest.raises(TimeoutError):
                await channel.submit(EXECUTE, b'{"seconds": 0}', deadline=loop.time() + 0.05)
            with pytest.raises(TimeoutError):
                await channel.submit(EXECUTE, b'{"seconds": 0}', deadline=loop.time() - 1)
            assert await busy == (OK, b'{"y":0.3}')
            assert await channel.request(PING) == (PONG, b"")
            channel.close()

    asyncio.run(scenario())


def test_cancelled_request_closes_the_channel(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, sleeper(tmp_path))
            channel = InstanceChannel(handle.address)
            await channel.connect()
            task = asyncio.create_task(channel.request(EXECUTE, b'{"seconds": 0.2}'))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert channel.is_closed

    asyncio.run(scenario())


def test_dead_instance_breaks_the_channel(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, sleeper(tmp_path))
            channel = InstanceChannel(handle.address)
            await channel.connect()
            answer = await channel.submit(EXECUTE, b'{"seconds": 10}')
            queued = asyncio.create_task(channel.request(PING))
            handle.kill()
            with pytest.raises(ProtocolError, match="The instance closed the connection"):
                await answer
            with pytest.raises(ConnectionError):
                await queued
            assert channel.is_closed

    asyncio.run(scenario())


def test_connect_to_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        channel = InstanceChannel(str(tmp_path / "none.sock"))
        with pytest.raises(ConnectionError, match="Cannot connect to the instance at"):
            await channel.connect()
        with pytest.raises(ConnectionError, match="not connected; call connect\\(\\) first"):
            await channel.request(PING)

    asyncio.run(scenario())


async def with_server(frames: bytes, test: Callable[[str], Awaitable[None]]) -> None:
    """Run `test` against a Unix socket whose peer writes `frames` once it reads a frame header, then hangs up."""
    directory = tempfile.mkdtemp(prefix="cn-t")
    path = f"{directory}/s.sock"

    handled = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(5)
            writer.write(frames)
            await asyncio.sleep(0.05)
        finally:
            writer.close()
            handled.set()

    server = await asyncio.start_unix_server(handle, path)
    try:
        await test(path)
    finally:
        await handled.wait()
        server.close()
        await server.wait_closed()
        shutil.rmtree(directory)


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        (encode(OK, b"{}") * 2, "answers no request"),
        ((1 << 31).to_bytes(4, "big") + b"O", "over the limit"),
        (encode(OK, b"{}")[:6], "closed the connection"),
    ],
    ids=["unasked", "oversized", "truncated"],
)
def test_protocol_violations_close_the_channel(frames: bytes, expected: str) -> None:
    async def test(path: str) -> None:
        channel = InstanceChannel(path)
        await channel.connect()
        answer = await channel.submit(PING)
        if expected == "answers no request":
            assert await answer == (OK, b"{}")
            await asyncio.sleep(0.01)
        else:
            with pytest.raises(ProtocolError, match=expected):
                await answer
        assert channel.is_closed

    asyncio.run(with_server(frames, test))
