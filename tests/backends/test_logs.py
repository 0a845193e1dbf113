"""The local backend's log directory: one file per process, and the last line of a crashed instance."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import stat
from pathlib import Path

import pytest

from cellnode.backends.base import InstanceFailed, InstanceSpec
from cellnode.backends.local import LocalBackend
from cellnode.router.channel import InstanceChannel
from cellnode.runtime.protocol import EXECUTE, OK, PING, PONG
from tests.backends.instances import log_dir, start_ready
from tests.runtime.checkpoints import launch_spec, randomizer_spec

RECORD = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (\S+) (\S+) (out|err) .*")


def test_each_process_writes_its_own_file(tmp_path: Path) -> None:
    launch = randomizer_spec(tmp_path)

    async def scenario() -> None:
        async with LocalBackend() as backend:
            first = await start_ready(backend, tmp_path, launch, instance_id="a")
            await start_ready(backend, tmp_path, launch, instance_id="b")
            (zygote,) = backend.zygotes
            written = json.loads(zygote.spec_path.read_text())
            assert (written["log_dir"], written["log_name"]) == (str(log_dir(tmp_path)), "zygote-1")
            assert first.log_path == log_dir(tmp_path) / "a.log"

    asyncio.run(scenario())
    directory = log_dir(tmp_path)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(path.name for path in directory.iterdir()) == ["a.log", "b.log", "zygote-1.log"]
    for path in directory.iterdir():
        lines = path.read_text().splitlines()
        assert lines and all(RECORD.fullmatch(line) for line in lines), lines
        assert {RECORD.fullmatch(line).group(1) for line in lines} == {path.stem}  # type: ignore[union-attr]
    assert "loaded 5 variables" in (directory / "zygote-1.log").read_text()
    assert "Instance 'b' of node 'n1' forked from zygote" in (directory / "b.log").read_text()


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_last_log_line_of_a_crashed_instance(tmp_path: Path, how: str) -> None:
    launch = launch_spec(tmp_path, "print(words)\nif die:\n    os._exit(7)", setup=("import os",))

    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, launch)
            channel = InstanceChannel(handle.address)
            await channel.connect()
            answer = await channel.request(EXECUTE, json.dumps({"words": "last words", "die": False}).encode())
            assert answer == (OK, b"{}")
            # The instance writes a request's lines after its answer: once PING is answered, they are written.
            assert await channel.request(PING) == (PONG, b"")
            if how == "exit":
                await channel.submit(EXECUTE, json.dumps({"words": "lost", "die": True}).encode())
                assert await handle.wait() == 7
            else:
                handle.kill()
                assert await handle.wait() == -signal.SIGKILL
            channel.close()
            assert handle.last_log_line() == "last words"

    asyncio.run(scenario())


def test_a_spec_error_is_the_zygotes_last_line(tmp_path: Path) -> None:
    launch = {**randomizer_spec(tmp_path), "state": "shared"}

    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await backend.start(InstanceSpec("n1", "i1", launch, log_path=tmp_path / "logs"))
            with pytest.raises(InstanceFailed) as caught:
                await handle.wait_ready(30)
            assert handle.returncode == 2
            assert "its last log line: The launch spec has state 'shared'; use 'isolated'" in str(caught.value)

    asyncio.run(scenario())
