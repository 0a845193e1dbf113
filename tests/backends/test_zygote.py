"""The local backend's zygotes, with real processes: sharing, exits, kills, new launch specs, release, server death."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cellnode.backends.local import LocalBackend, LocalInstanceHandle
from cellnode.router.channel import InstanceChannel
from cellnode.runtime.protocol import EXECUTE, INTERRUPTED, OK
from tests.backends.instances import is_alive, log_dir, parent_of, read_logs, socket_inodes, start_ready, wait_gone
from tests.runtime.checkpoints import launch_spec, randomizer_spec

RANDOM_INPUT = json.dumps({"input_data": {"left_bound": 1, "right_bound": 10}}).encode()


async def execute(handle: LocalInstanceHandle, payload: bytes = RANDOM_INPUT) -> tuple[int, Any]:
    channel = InstanceChannel(handle.address)
    await channel.connect()
    try:
        kind, answer = await channel.request(EXECUTE, payload)
    finally:
        channel.close()
    return kind, json.loads(answer)


def assert_random(answer: tuple[int, Any]) -> None:
    kind, body = answer
    assert kind == OK
    assert 1 <= body["output_data"]["generated_value"] <= 10


def test_instances_of_a_node_share_one_zygote(tmp_path: Path) -> None:
    launch = randomizer_spec(tmp_path)

    async def scenario() -> None:
        async with LocalBackend() as backend:
            first, second = await asyncio.gather(
                start_ready(backend, tmp_path, launch, instance_id="a"),
                start_ready(backend, tmp_path, launch, instance_id="b"),
            )
            (zygote,) = backend.zygotes
            assert first.zygote is second.zygote is zygote
            assert first.pid is not None and second.pid is not None and first.pid != second.pid
            assert parent_of(first.pid) == parent_of(second.pid) == zygote.process.pid
            for _ in range(20):
                assert_random(await execute(first))
                assert_random(await execute(second))
            # Neither instance holds the zygote's control connection, or the other's sockets.
            zygote_sockets = socket_inodes(zygote.process.pid)
            assert not socket_inodes(first.pid) & zygote_sockets
            assert not socket_inodes(second.pid) & zygote_sockets
            assert not socket_inodes(first.pid) & socket_inodes(second.pid)
            third = await start_ready(backend, tmp_path, launch, instance_id="c")
            assert third.zygote is zygote
            assert_random(await execute(third))

    asyncio.run(scenario())
    log = read_logs(log_dir(tmp_path))
    assert log.count("loaded 5 variables") == 1, log
    assert log.count("forked from zygote") == 3, log


def test_killed_instance_is_reported_and_the_other_keeps_serving(tmp_path: Path) -> None:
    launch = randomizer_spec(tmp_path)

    async def scenario() -> None:
        async with LocalBackend() as backend:
            victim = await start_ready(backend, tmp_path, launch, instance_id="a")
            survivor = await start_ready(backend, tmp_path, launch, instance_id="b")
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            assert await asyncio.wait_for(victim.wait(), 5) == -signal.SIGKILL
            assert victim.returncode == -signal.SIGKILL
            assert not os.path.exists(victim.address)
            assert_random(await execute(survivor))
            replacement = await start_ready(backend, tmp_path, launch, instance_id="c")
            assert replacement.zygote is survivor.zygote
            assert_random(await execute(replacement))
            os.kill(replacement.pid or 0, signal.SIGSEGV)
            assert await asyncio.wait_for(replacement.wait(), 5) == -signal.SIGSEGV

    asyncio.run(scenario())


def test_killing_the_zygote_ends_its_instances(tmp_path: Path) -> None:
    launch = launch_spec(tmp_path, "time.sleep(seconds)\ny = seconds", setup=("import time",), outputs={"y": "int"})

    async def scenario() -> None:
        async with LocalBackend() as backend:
            idle = await start_ready(backend, tmp_path, launch, instance_id="a")
            busy = await start_ready(backend, tmp_path, launch, instance_id="b")
            channel = InstanceChannel(busy.address)
            await channel.connect()
            answer = await channel.submit(EXECUTE, b'{"seconds": 60}')
            zygote = idle.zygote
            zygote.process.kill()
            codes = await asyncio.wait_for(asyncio.gather(idle.wait(), busy.wait()), 10)
            assert codes == [-signal.SIGKILL, -signal.SIGKILL]
            assert not is_alive(idle.pid or 0) and not is_alive(busy.pid or 0)
            with pytest.raises(ConnectionError):
                await answer
            channel.close()
            again = await start_ready(backend, tmp_path, launch, instance_id="c")
            assert again.zygote is not zygote, "the next start brings a new zygote"
            assert (await execute(again, b'{"seconds": 0}')) == (OK, {"y": 0})

    asyncio.run(scenario())


def test_a_changed_launch_spec_gets_a_new_zygote(tmp_path: Path) -> None:
    old = launch_spec(tmp_path / "old", "y = x + 1", setup=("x = 1",), outputs={"y": "int"})
    new = launch_spec(tmp_path / "new", "y = x + 1", setup=("x = 41",), outputs={"y": "int"})

    async def scenario() -> None:
        async with LocalBackend() as backend:
            before = await start_ready(backend, tmp_path, old, instance_id="a")
            after = await start_ready(backend, tmp_path, new, instance_id="b")
            assert after.zygote is not before.zygote
            assert await execute(before, b"{}") == (OK, {"y": 2})
            assert await execute(after, b"{}") == (OK, {"y": 42})
            assert before.zygote.returncode is None, "the old zygote stays while its instance runs"
            await before.stop()
            assert await asyncio.wait_for(before.zygote.process.wait(), 10) == 0, "then it is stopped"
            other_env = await start_ready(backend, tmp_path, new, instance_id="c", env={"X": "1"})
            assert other_env.zygote is not after.zygote, "a changed environment also gets a new zygote"

    asyncio.run(scenario())


def test_release_stops_the_instances_and_the_zygote(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, randomizer_spec(tmp_path / "a"))
            other = await start_ready(backend, tmp_path, randomizer_spec(tmp_path / "b"), instance_id="o")
            zygote = handle.zygote
            await backend.release("n1")
            assert handle.returncode == 0
            assert zygote.returncode == 0
            assert other.zygote.returncode == 0, "both zygotes of node n1 (old and new spec) are released"
            await backend.release("n1")  # Nothing left: a no-op.
            again = await start_ready(backend, tmp_path, randomizer_spec(tmp_path / "a"), instance_id="z")
            assert again.zygote is not zygote
            assert_random(await execute(again))

    asyncio.run(scenario())


def test_instances_start_fast_from_a_ready_zygote(tmp_path: Path) -> None:
    async def scenario() -> list[float]:
        async with LocalBackend() as backend:
            launch = randomizer_spec(tmp_path)
            await start_ready(backend, tmp_path, launch, instance_id="first")
            times = []
            for number in range(5):
                started = time.perf_counter()
                handle = await start_ready(backend, tmp_path, launch, instance_id=f"i{number}")
                times.append(time.perf_counter() - started)
                assert_random(await execute(handle))
            return times

    times = asyncio.run(scenario())
    assert len(times) == 5  # bench/zygote_memory.py measures them; here they only have to work.


def test_forked_instances_have_default_signals_and_a_frozen_heap(tmp_path: Path) -> None:
    source = (
        "status = subprocess.run(['cat', '/proc/self/status'], capture_output=True, text=True, check=True).stdout\n"
        "ignored = int(next(line for line in status.splitlines() if line.startswith('SigIgn:')).split()[1], 16)\n"
        "frozen = gc.get_freeze_count()\n"
        "open(marker, 'w').close()\n"
        "time.sleep(seconds)\n"
    )
    launch = launch_spec(
        tmp_path,
        source,
        setup=("import gc, subprocess, time",),
        outputs={"ignored": "int", "frozen": "int"},
    )
    marker = tmp_path / "running"

    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, launch)
            kind, body = await execute(handle, json.dumps({"seconds": 0, "marker": str(marker)}).encode())
            assert kind == OK
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
                assert not body["ignored"] & (1 << (signum - 1)), f"{signum!r} is ignored in the cell's children"
            assert body["frozen"] > 1000, "the zygote froze the loaded objects"
            marker.unlink()
            channel = InstanceChannel(handle.address)
            await channel.connect()
            answer = await channel.submit(EXECUTE, json.dumps({"seconds": 60, "marker": str(marker)}).encode())
            while not marker.exists():
                await asyncio.sleep(0.01)
            handle.interrupt()
            kind, _ = await asyncio.wait_for(answer, 10)
            assert kind == INTERRUPTED
            channel.close()

    asyncio.run(scenario())


SERVER = """\
import asyncio, sys
from pathlib import Path
from cellnode.backends.base import InstanceSpec
from cellnode.backends.local import LocalBackend

async def main():
    backend = LocalBackend()
    launch = {"cell": {"source": "y = 1"}, "outputs": {"y": "int"}, "variables": [], "imports": {}}
    for instance_id in ("a", "b"):
        handle = await backend.start(InstanceSpec("n1", instance_id, launch, log_path=Path(sys.argv[1])))
        await handle.wait_ready(30)
        print(handle.pid, handle.zygote.process.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.slow
def test_nothing_outlives_a_killed_server(tmp_path: Path) -> None:
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path / "logs")], stdout=subprocess.PIPE)
    assert server.stdout is not None
    pids: set[int] = set()
    try:
        for _ in range(2):
            pids.update(int(pid) for pid in server.stdout.readline().split())
        assert len(pids) == 3, "two instances and their one zygote"
        server.kill()
        server.wait()
        started = time.monotonic()
        wait_gone(*pids, timeout=3)
        assert time.monotonic() - started < 2
    finally:
        server.kill()
        server.communicate()
        for pid in pids:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
