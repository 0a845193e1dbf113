"""Nodes that are not safe to fork, with real processes: their instances start standalone and behave like forks."""

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

from cellnode.backends.base import InstanceFailed, InstanceSpec
from cellnode.backends.local import LocalBackend, LocalInstanceHandle
from cellnode.backends.zygote import InstanceStarter, LocalZygote
from cellnode.router.channel import InstanceChannel
from cellnode.runtime.protocol import EXECUTE, INTERRUPTED, OK
from tests.backends.instances import is_alive, log_dir, parent_of, read_logs, start_ready, wait_gone
from tests.runtime.checkpoints import launch_spec, randomizer_spec, threaded_spec

THREAD_REASON = "the checkpoint started 1 thread while loading ('pool-worker')"
# Marks that it runs, may start a child process (whose pid it returns), then sleeps.
CELL = """\
open(marker, "w").close()
child = subprocess.Popen(["sleep", "60"]).pid if spawn else 0
time.sleep(seconds)
y = pool.size * x
"""
CELL_INPUTS = {"x": "int", "marker": "str", "spawn": "bool", "seconds": "int"}
# A stand-in for torch, which this machine cannot run with CUDA: only what `fork_hazard()` asks of it.
FAKE_TORCH = "class cuda:\n    @staticmethod\n    def is_initialized():\n        return {answer}\n"


def node_spec(tmp_path: Path, mode: str) -> dict[str, Any]:
    """A launch spec of CELL: one whose load starts a thread ("threads"), or a plain one with `"fork": false`."""
    options: dict[str, Any] = {"inputs": CELL_INPUTS, "outputs": {"y": "int", "child": "int"}}
    if mode == "threads":
        return threaded_spec(tmp_path, CELL, setup=("import subprocess, time",), **options)
    plain = "import subprocess, time\n\nclass Pool:\n    size = 2\n\npool = Pool()\n"
    return {**launch_spec(tmp_path, CELL, setup=(plain,), **options), "fork": False}


async def execute(handle: LocalInstanceHandle, payload: dict[str, Any]) -> tuple[int, Any]:
    channel = InstanceChannel(handle.address)
    await channel.connect()
    try:
        kind, answer = await channel.request(EXECUTE, json.dumps(payload).encode())
    finally:
        channel.close()
    return kind, json.loads(answer)


def request(tmp_path: Path, x: int = 21, *, spawn: bool = False, seconds: int = 0) -> dict[str, Any]:
    return {"x": x, "marker": str(tmp_path / "running"), "spawn": spawn, "seconds": seconds}


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_a_checkpoint_that_starts_a_thread_gets_standalone_instances(tmp_path: Path) -> None:
    launch = threaded_spec(tmp_path, "y = pool.size * x", inputs={"x": "int"}, outputs={"y": "int"})

    async def scenario() -> None:
        async with LocalBackend() as backend:
            first, second = await asyncio.gather(
                start_ready(backend, tmp_path, launch, instance_id="a"),
                start_ready(backend, tmp_path, launch, instance_id="b"),
            )
            (zygote,) = backend.zygotes
            assert isinstance(zygote, LocalZygote)
            assert (zygote.is_forking, zygote.standalone_reason) == (False, THREAD_REASON)
            assert await asyncio.wait_for(zygote.process.wait(), 10) == 0, "the zygote exits once it has said so"
            third = await start_ready(backend, tmp_path, launch, instance_id="c")
            assert backend.zygotes == [zygote], "the node's next instances start standalone too, with no new zygote"
            for handle in (first, second, third):
                assert handle.zygote is zygote
                assert handle.pid is not None and handle.pid != zygote.process.pid
                assert parent_of(handle.pid) == os.getpid(), "a child of the server, not a fork of the zygote"
                assert thread_count(handle.pid) == 2, "it loaded the checkpoint, and started the thread, itself"
                assert await execute(handle, {"x": 21}) == (OK, {"y": 42})
            pids = [first.pid, second.pid, third.pid]
        assert zygote.is_done
        wait_gone(*(pid for pid in pids if pid is not None))

    asyncio.run(scenario())
    log = read_logs(log_dir(tmp_path))
    assert log.count(f"Zygote of node 'n1' cannot fork safely: {THREAD_REASON}. Its instances start as") == 1, log
    assert log.count("of node 'n1' loaded 2 variables") == 3, log
    assert "forked from zygote" not in log


def test_a_normal_checkpoint_still_forks(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, randomizer_spec(tmp_path))
            (zygote,) = backend.zygotes
            assert isinstance(zygote, LocalZygote)
            assert (zygote.is_forking, zygote.standalone_reason) == (True, "")
            assert handle.pid is not None and parent_of(handle.pid) == zygote.process.pid
            assert zygote.returncode is None

    asyncio.run(scenario())


@pytest.mark.parametrize("blas_threads", ["1", "2", "4"])
def test_a_numpy_checkpoint_still_forks(tmp_path: Path, blas_threads: str) -> None:
    """numpy starts OpenBLAS's worker pool on import; OpenBLAS has fork handlers, so that pool alone is no hazard."""
    launch = launch_spec(
        tmp_path,
        "y = float(weights @ weights) * x",
        setup=("import numpy as np\nweights = np.ones(3)",),
        inputs={"x": "int"},
        outputs={"y": "float"},
    )

    async def scenario() -> None:
        async with LocalBackend() as backend:
            # As a spec's limits set it (`Spec.environment`).
            handle = await start_ready(backend, tmp_path, launch, env={"OPENBLAS_NUM_THREADS": blas_threads})
            (zygote,) = backend.zygotes
            assert isinstance(zygote, LocalZygote)
            assert (zygote.is_forking, zygote.standalone_reason) == (True, "")
            assert handle.pid is not None and parent_of(handle.pid) == zygote.process.pid
            assert await execute(handle, {"x": 2}) == (OK, {"y": 6.0})

    asyncio.run(scenario())
    # What the zygote saw: the pool's workers running, and no hazard in them. (OpenBLAS stops its pool before a
    # fork and starts it again when next used, so after the first fork the zygote shows one thread.)
    probe = (
        "import os, threading, numpy\n"
        "from cellnode.runtime.zygote import fork_hazard\n"
        "print(len(os.listdir('/proc/self/task')), repr(fork_hazard()))\n"
        "threading.Thread(target=threading.Event().wait, daemon=True, name='mine').start()\n"
        "print(repr(fork_hazard()))\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": blas_threads}
    seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    pool, other = seen.stdout.splitlines()
    assert pool == f"{min(int(blas_threads), os.cpu_count() or 1)} ''"  # OpenBLAS uses no more threads than CPUs
    assert "'mine'" in other, "a thread of the checkpoint's own is a hazard, pool or not"


@pytest.mark.parametrize("mode", ["threads", "fork off"])
def test_standalone_instances_behave_like_forked_ones(tmp_path: Path, mode: str) -> None:
    launch = node_spec(tmp_path, mode)
    marker = tmp_path / "running"

    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, launch, instance_id="a")
            assert handle.pid is not None and parent_of(handle.pid) == os.getpid()
            assert handle.last_log_line().startswith("Instance 'a' of node 'n1' loaded 2 variables in ")
            handle.interrupt()  # Idle: ignored.
            assert await execute(handle, request(tmp_path)) == (OK, {"y": 42, "child": 0})

            # Interrupted in a cell, it answers INTERRUPTED and goes on serving.
            marker.unlink()
            channel = InstanceChannel(handle.address)
            await channel.connect()
            answer = await channel.submit(EXECUTE, json.dumps(request(tmp_path, seconds=60)).encode())
            while not marker.exists():
                await asyncio.sleep(0.01)
            handle.interrupt()
            assert (await asyncio.wait_for(answer, 10))[0] == INTERRUPTED
            channel.close()

            # Killed, it takes what its cell started with it (its process group).
            kind, body = await execute(handle, request(tmp_path, spawn=True))
            assert kind == OK and is_alive(body["child"])
            handle.kill()
            assert await asyncio.wait_for(handle.wait(), 10) == -signal.SIGKILL
            assert handle.returncode == -signal.SIGKILL
            wait_gone(body["child"])
            assert not os.path.exists(handle.address)

            # Stopped, it exits 0 and leaves nothing behind; a killed process reports its signal.
            stopped = await start_ready(backend, tmp_path, launch, instance_id="b")
            await stopped.stop()
            assert stopped.returncode == 0
            assert not os.path.exists(stopped.address)
            assert not list(backend.runtime_dir.glob("*.json")), "the launch specs are removed"
            crashed = await start_ready(backend, tmp_path, launch, instance_id="c")
            os.kill(crashed.pid or 0, signal.SIGSEGV)
            assert await asyncio.wait_for(crashed.wait(), 10) == -signal.SIGSEGV

            # Released, the node's running instances are stopped.
            kept = await start_ready(backend, tmp_path, launch, instance_id="d")
            await backend.release("n1")
            assert kept.returncode == 0
            assert [zygote for zygote in backend.zygotes if not zygote.is_done] == []

            # Closed, the backend stops the rest.
            last = await start_ready(backend, tmp_path, launch, instance_id="e")
        assert last.returncode == 0
        assert not backend.runtime_dir.exists()

    asyncio.run(scenario())


def test_fork_false_starts_no_zygote(tmp_path: Path) -> None:
    launch = {**randomizer_spec(tmp_path), "fork": False}

    async def scenario() -> None:
        async with LocalBackend() as backend:
            first = await start_ready(backend, tmp_path, launch, instance_id="a")
            second = await start_ready(backend, tmp_path, launch, instance_id="b")
            (starter,) = backend.zygotes
            assert type(starter) is InstanceStarter and first.zygote is second.zygote is starter
            assert starter.standalone_reason == 'the launch spec says "fork": false'
            for handle in (first, second):
                assert handle.pid is not None and parent_of(handle.pid) == os.getpid()
            forked = await start_ready(backend, tmp_path, {**launch, "fork": True}, instance_id="c")
            assert isinstance(forked.zygote, LocalZygote) and forked.zygote.is_forking
            assert starter.is_done is False, "superseded, it keeps its instances until they end"
            await first.stop()
            await second.stop()
            assert starter.is_done

    asyncio.run(scenario())
    assert sorted(path.name for path in log_dir(tmp_path).iterdir()) == ["a.log", "b.log", "c.log", "zygote-1.log"]


def test_fork_must_be_a_boolean(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend() as backend:
            spec = InstanceSpec("n1", "i1", {**randomizer_spec(tmp_path), "fork": "no"}, log_path=log_dir(tmp_path))
            with pytest.raises(InstanceFailed, match="The launch spec of node 'n1' has fork 'no'; it must be true or"):
                await backend.start(spec)

    asyncio.run(scenario())


def test_a_standalone_instance_that_cannot_start(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend(python=str(tmp_path / "no-python")) as backend:
            spec = InstanceSpec("n1", "i1", {**randomizer_spec(tmp_path), "fork": False}, log_path=log_dir(tmp_path))
            handle = await backend.start(spec)
            with pytest.raises(InstanceFailed) as caught:
                await handle.wait_ready(30)
            message = str(caught.value)
            assert message.startswith("Instance 'i1' of node 'n1' exited with code 1 before it was ready; ")
            python = str(tmp_path / "no-python")
            assert f"its last log line: Instance 'i1' of node 'n1' could not be started with {python!r}" in message
            assert "Check that the interpreter exists and is executable" in message
            assert handle.pid is None and handle.returncode == 1
            assert not list(backend.runtime_dir.glob("*.json"))

    asyncio.run(scenario())


@pytest.mark.parametrize(("answer", "is_forking"), [("True", False), ("False", True), ("1 / 0", True)])
def test_cuda_initialised_while_loading_is_not_fork_safe(tmp_path: Path, answer: str, is_forking: bool) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text(FAKE_TORCH.format(answer=answer))
    launch = launch_spec(tmp_path, "y = torch.__name__", outputs={"y": "str"})
    launch["imports"]["torch"] = "torch"

    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, launch, env={"PYTHONPATH": str(fake)})
            (zygote,) = backend.zygotes
            assert zygote.is_forking is is_forking
            expected = "" if is_forking else "the checkpoint initialised CUDA while loading"
            assert zygote.standalone_reason.startswith(expected)
            assert handle.pid is not None
            assert (parent_of(handle.pid) == os.getpid()) is not is_forking
            assert await execute(handle, {}) == (OK, {"y": "torch"})

    asyncio.run(scenario())


SERVER = """\
import asyncio, json, sys
from pathlib import Path
from cellnode.backends.base import InstanceSpec
from cellnode.backends.local import LocalBackend

async def main():
    backend = LocalBackend()
    launch = json.loads(sys.argv[2])
    for instance_id in ("a", "b"):
        handle = await backend.start(InstanceSpec("n1", instance_id, launch, log_path=Path(sys.argv[1])))
        await handle.wait_ready(30)
        print(handle.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["threads", "fork off"])
def test_standalone_instances_do_not_outlive_a_killed_server(tmp_path: Path, mode: str) -> None:
    if mode == "threads":
        launch = threaded_spec(tmp_path, "y = pool.size", outputs={"y": "int"})
    else:
        launch = {**launch_spec(tmp_path, "y = 1", outputs={"y": "int"}), "fork": False}
    command = [sys.executable, "-c", SERVER, str(tmp_path / "logs"), json.dumps(launch)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert server.stdout is not None
    pids: list[int] = []
    try:
        for _ in range(2):
            pids.append(int(server.stdout.readline()))
        assert all(parent_of(pid) == server.pid for pid in pids)
        server.kill()
        server.wait()
        started = time.monotonic()
        wait_gone(*pids, timeout=5)
        assert time.monotonic() - started < 3
    finally:
        server.kill()
        server.communicate()
        for pid in pids:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
