"""The state policies with real processes: an instance forked from its zygote, driven as the front drives it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cellnode.backends.local import LocalBackend
from cellnode.exceptions import CellExecutionError, DeadlineExceeded
from cellnode.router.instance import Instance
from tests.backends.instances import log_dir, read_logs, start_ready
from tests.runtime.checkpoints import launch_spec

# `seen` is mutated in place and `count` rebound at the top level, on every request.
SETUP = ("seen = []\ncount = 0\nx = 0",)
CELL = "seen.append(x)\ncount = count + 1\nlength = len(seen)\ntotal = count\nprint('request', x)"


@asynccontextmanager
async def running(tmp_path: Path, launch: dict[str, Any], *, timeout: float = 10.0) -> AsyncIterator[Instance]:
    async with LocalBackend() as backend:
        handle = await start_ready(backend, tmp_path, launch)
        instance = Instance(handle, timeout=timeout, interrupt_grace=5.0)
        await instance.connect()
        try:
            yield instance
        finally:
            instance.close()


async def execute(instance: Instance, inputs: dict[str, Any], request_id: str | None = None) -> Any:
    deadline = asyncio.get_running_loop().time() + instance.timeout
    return json.loads(await instance.execute(json.dumps(inputs).encode(), deadline=deadline, request_id=request_id))


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (None, [(1, 1), (2, 1), (3, 1)]),  # isolated, the default: the mutation stays, the rebinding does not
        ("isolated", [(1, 1), (2, 1), (3, 1)]),
        ("persistent", [(1, 1), (2, 2), (3, 3)]),  # both stay
        ("fork", [(1, 1), (1, 1), (1, 1)]),  # neither: each request runs in a child
    ],
)
def test_what_a_request_leaves_for_the_next(tmp_path: Path, state: str | None, expected: list[tuple[int, int]]) -> None:
    launch = launch_spec(tmp_path, CELL, setup=SETUP, inputs={"x": "int"}, outputs={"length": "int", "total": "int"})
    if state is not None:
        launch["state"] = state

    async def scenario() -> list[tuple[int, int]]:
        async with running(tmp_path, launch) as instance:
            answers = [await execute(instance, {"x": number}, f"req-{number}") for number in range(3)]
        return [(answer["length"], answer["total"]) for answer in answers]

    assert asyncio.run(scenario()) == expected
    log = read_logs(log_dir(tmp_path))
    for number in range(3):
        assert f" i1 req-{number} out request {number}\n" in log, log


def test_fork_interrupts_the_child_on_a_timeout(tmp_path: Path) -> None:
    launch = launch_spec(
        tmp_path,
        "calls.append(seconds)\ntime.sleep(seconds)\nn = len(calls)",
        setup=("import time\ncalls = []",),
        outputs={"n": "int"},
    )
    launch["state"] = "fork"

    async def scenario() -> None:
        async with running(tmp_path, launch, timeout=1.0) as instance:
            with pytest.raises(DeadlineExceeded, match="the cell was interrupted"):
                await execute(instance, {"seconds": 60})
            assert instance.is_alive
            assert await execute(instance, {"seconds": 0}) == {"n": 1}

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("death", "how"),
    [
        ("print('bye')\n    os._exit(3)", "exited with code 3"),
        ("ctypes.string_at(0)", "was killed by signal SIGSEGV"),
    ],
)
def test_fork_survives_a_dying_child(tmp_path: Path, death: str, how: str) -> None:
    cell = f"if die:\n    {death}\ny = 1"
    launch = launch_spec(tmp_path, cell, setup=("import ctypes, os",), outputs={"y": "int"})
    launch["state"] = "fork"

    async def scenario() -> None:
        async with running(tmp_path, launch) as instance:
            assert await execute(instance, {"die": False}) == {"y": 1}
            with pytest.raises(CellExecutionError) as caught:
                await execute(instance, {"die": True}, "dying")
            details = caught.value.details[0]
            assert details["error_name"] == "WorkerDied"
            assert details["error_message"].startswith(f"The process that ran the cell {how} before it answered")
            assert instance.is_alive
            assert await execute(instance, {"die": False}) == {"y": 1}

    asyncio.run(scenario())
    assert f" i1 dying err The process that ran the cell {how}" in read_logs(log_dir(tmp_path))
