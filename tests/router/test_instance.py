from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cellnode.backends.local import LocalBackend
from cellnode.exceptions import CellExecutionError, DeadlineExceeded, InternalError, OutputError, Unavailable
from cellnode.router.instance import Instance
from tests.backends.instances import log_dir, read_logs, start_ready
from tests.runtime.checkpoints import launch_spec, randomizer_spec

RANDOM_INPUT = json.dumps({"input_data": {"left_bound": 1, "right_bound": 10}}).encode()
# `calls` is mutated in place, so it counts the requests that ran; `seconds` is the request's input.
SLEEPER_SETUP = ("import time\ncalls = []",)
SLEEPER = "calls.append(seconds)\ntime.sleep(seconds)\nn = len(calls)"


def sleeper(tmp_path: Path) -> dict[str, Any]:
    return launch_spec(tmp_path, SLEEPER, setup=SLEEPER_SETUP, outputs={"n": "int"})


@asynccontextmanager
async def running(
    tmp_path: Path, launch: dict[str, Any], *, timeout: float = 1.0, grace: float = 5.0
) -> AsyncIterator[Instance]:
    async with LocalBackend() as backend:
        handle = await start_ready(backend, tmp_path, launch)
        instance = Instance(handle, timeout=timeout, interrupt_grace=grace)
        await instance.connect()
        try:
            yield instance
        finally:
            instance.close()


def deadline(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


def test_randomizer_and_many_sequential_requests(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path, randomizer_spec(tmp_path)) as instance:
            assert (instance.instance_id, instance.node_id, instance.is_alive) == ("i1", "n1", True)
            for _ in range(1000):
                answer = json.loads(await instance.execute(RANDOM_INPUT, deadline=deadline(5)))
                assert answer.keys() == {"output_data"}
                assert 1 <= answer["output_data"]["generated_value"] <= 10
            assert instance.outstanding == 0

    asyncio.run(scenario())


def test_the_request_id_reaches_the_log_only(tmp_path: Path) -> None:
    launch = launch_spec(tmp_path, "print('seen', x)\ny = x", inputs={"x": "int"}, outputs={"y": "int"})

    async def scenario() -> None:
        async with running(tmp_path, launch) as instance:
            assert await instance.execute(b'{"x": 5}', deadline=deadline(5), request_id="a1B2_c-3") == b'{"y":5}'
            assert await instance.execute(b'{"x": 6}', deadline=deadline(5)) == b'{"y":6}'
            with pytest.raises(AssertionError, match="is not valid"):
                await instance.execute(b'{"x": 7}', deadline=deadline(5), request_id="no spaces")

    asyncio.run(scenario())
    log = read_logs(log_dir(tmp_path))
    assert " i1 a1B2_c-3 out seen 5\n" in log and " i1 - out seen 6\n" in log
    assert "seen 7" not in log


def test_cell_error(tmp_path: Path) -> None:
    launch = launch_spec(tmp_path, "x = 1\ny = 1 / zero", outputs={"y": "float"})

    async def scenario() -> None:
        async with running(tmp_path, launch) as instance:
            with pytest.raises(CellExecutionError) as caught:
                await instance.execute(b'{"zero": 0}', deadline=deadline(5))
            error = caught.value
            assert (error.error_name, error.error_message) == ("ZeroDivisionError", "division by zero")
            assert error.message == "The cell raised ZeroDivisionError: division by zero"
            assert error.traceback[1].startswith('  File "<cell>", line 2, in <module>\n')
            assert await instance.execute(b'{"zero": 2}', deadline=deadline(5)) == b'{"y":0.5}'

    asyncio.run(scenario())


def test_output_error_and_failure(tmp_path: Path) -> None:
    launch = launch_spec(tmp_path, "y = str(x)", outputs={"y": "int"})

    async def scenario() -> None:
        async with running(tmp_path, launch) as instance:
            with pytest.raises(OutputError, match="Output variable 'y' must be an int; the cell left str '1'"):
                await instance.execute(b'{"x": 1}', deadline=deadline(5))
            with pytest.raises(InternalError, match="Instance 'i1' of node 'n1' failed: The EXECUTE payload is not"):
                await instance.execute(b"[]", deadline=deadline(5))
            assert instance.is_alive

    asyncio.run(scenario())


def test_timeout_interrupts_and_the_instance_keeps_serving(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path, sleeper(tmp_path), timeout=0.3) as instance:
            with pytest.raises(DeadlineExceeded) as caught:
                await instance.execute(b'{"seconds": 30}', deadline=deadline(0.3))
            assert caught.value.message == (
                "Node 'n1' did not answer within its timeout of 0.3 s; the cell was interrupted."
            )
            assert instance.is_alive
            assert await instance.execute(b'{"seconds": 0}', deadline=deadline(5)) == b'{"n":2}'

    asyncio.run(scenario())


def test_queued_past_the_deadline_never_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path, sleeper(tmp_path)) as instance:
            first = asyncio.create_task(instance.execute(b'{"seconds": 0.3}', deadline=deadline(5)))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(instance.execute(b'{"seconds": 0}', deadline=deadline(0.1)))
            await asyncio.sleep(0.01)
            assert instance.outstanding == 2
            with pytest.raises(DeadlineExceeded, match="the request was still waiting for the instance"):
                await second
            assert await first == b'{"n":1}'
            assert await instance.execute(b'{"seconds": 0}', deadline=deadline(5)) == b'{"n":2}'
            with pytest.raises(DeadlineExceeded):
                await instance.execute(b'{"seconds": 0}', deadline=deadline(-1))
            assert instance.outstanding == 0

    asyncio.run(scenario())


def test_cell_ignoring_sigint_is_killed(tmp_path: Path) -> None:
    launch = launch_spec(
        tmp_path, "signal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass", setup=("import signal",)
    )

    async def scenario() -> None:
        async with running(tmp_path, launch, timeout=0.5, grace=0.3) as instance:
            with pytest.raises(DeadlineExceeded) as caught:
                await instance.execute(b"{}", deadline=deadline(0.5))
            assert caught.value.message == (
                "Node 'n1' did not answer within its timeout of 0.5 s; "
                "the cell ignored the interrupt for 0.3 s, so its instance was killed."
            )
            assert not instance.is_alive
            assert instance.handle.returncode == -signal.SIGKILL
            with pytest.raises(Unavailable, match="Instance 'i1' of node 'n1' is unavailable: the cell ignored"):
                await instance.execute(b"{}", deadline=deadline(5))

    asyncio.run(scenario())


def test_killed_instance_is_unavailable(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path, sleeper(tmp_path)) as instance:
            running_request = asyncio.create_task(instance.execute(b'{"seconds": 30}', deadline=deadline(60)))
            await asyncio.sleep(0.1)
            instance.handle.kill()
            with pytest.raises(Unavailable) as caught:
                await running_request
            message = caught.value.message
            assert message.startswith("Instance 'i1' of node 'n1' is unavailable: its connection broke while the cell")
            assert "it exited with code -9. The node's log has its output." in message
            assert "loaded" not in message, "the instance's output is for the node's log, not for callers"
            assert not instance.is_alive
            with pytest.raises(Unavailable, match="exited with code -9"):
                await instance.execute(b'{"seconds": 0}', deadline=deadline(5))
            assert instance.outstanding == 0

    asyncio.run(scenario())


def test_a_caller_that_leaves_does_not_leave_the_cell_running(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path, sleeper(tmp_path), timeout=0.3) as instance:
            left = asyncio.create_task(instance.execute(b'{"seconds": 30}', deadline=deadline(20)))
            await asyncio.sleep(0.2)
            left.cancel()
            with pytest.raises(asyncio.CancelledError):
                await left
            # Busy until the abandoned cell has stopped, so that no request is routed to it as if it were idle.
            assert instance.outstanding == 1
            # The cell is interrupted at once, not at the first request's deadline, 20 s away.
            assert await instance.execute(b'{"seconds": 0}', deadline=deadline(3)) == b'{"n":2}'
            assert instance.outstanding == 0

    asyncio.run(scenario())


def test_unreachable_instance(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, randomizer_spec(tmp_path))
            await handle.stop()
            instance = Instance(handle, timeout=1.0)
            with pytest.raises(Unavailable, match="it refused the connection; it exited with code 0"):
                await instance.execute(RANDOM_INPUT, deadline=deadline(5))
            assert not instance.is_alive

    asyncio.run(scenario())


def test_closed_instance_is_out_of_service(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path, randomizer_spec(tmp_path)) as instance:
            instance.close()
            assert not instance.is_alive
            with pytest.raises(Unavailable, match="Instance 'i1' of node 'n1' was taken out of service."):
                await instance.execute(RANDOM_INPUT, deadline=deadline(5))
            assert instance.handle.returncode is None

    asyncio.run(scenario())
