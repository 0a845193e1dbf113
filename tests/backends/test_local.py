from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from pathlib import Path

import pytest

from cellnode.backends.base import InstanceFailed, InstanceSpec
from cellnode.backends.local import LocalBackend
from cellnode.router.channel import InstanceChannel
from cellnode.runtime.protocol import EXECUTE, OK, PING, PONG
from tests.backends.instances import parent_of, start_ready
from tests.runtime.checkpoints import launch_spec, randomizer_spec

SLEEPER = ("import time",)


def test_start_ready_stop(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend() as backend:
            assert stat.S_IMODE(backend.runtime_dir.stat().st_mode) == 0o700
            handle = await start_ready(backend, tmp_path, randomizer_spec(tmp_path))
            assert (handle.instance_id, handle.node_id, handle.returncode) == ("i1", "n1", None)
            assert handle.pid is not None
            (zygote,) = backend.zygotes
            assert parent_of(handle.pid) == zygote.process.pid != os.getpid()
            assert len(handle.address) < 100 and handle.address.startswith(str(backend.runtime_dir))
            launch = json.loads(zygote.spec_path.read_text())
            assert "instance_id" not in launch and "socket" not in launch
            assert launch["node_id"] == "n1" and isinstance(launch["control_fd"], int)
            assert stat.S_IMODE(zygote.spec_path.stat().st_mode) == 0o600
            assert "Instance 'i1' of node 'n1' forked from zygote" in handle.last_log_line()
            handle.interrupt()  # Idle: ignored.
            await handle.stop()
            assert handle.returncode == 0
            assert not os.path.exists(handle.address)
            handle.interrupt()  # Ended: nothing to signal.
            handle.kill()
            assert zygote.returncode is None, "the node's zygote outlives its instances"
        assert zygote.returncode == 0
        assert not zygote.spec_path.exists()
        assert not backend.runtime_dir.exists()

    asyncio.run(scenario())


def test_environment_is_minimal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLNODE_SECRET_KEY", "server-only")
    monkeypatch.setenv("UNRELATED_SERVER_VARIABLE", "server-only")
    monkeypatch.setenv("TZ", "UTC")
    launch = launch_spec(tmp_path, "env = dict(os.environ)", setup=("import os",), outputs={"env": "dict"})

    async def scenario() -> dict[str, str]:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, launch, env={"MY_SECRET": "s3"})
            channel = InstanceChannel(handle.address)
            await channel.connect()
            kind, payload = await channel.request(EXECUTE, b"{}")
            channel.close()
            assert kind == OK
            env: dict[str, str] = json.loads(payload)["env"]
            return env

    env = asyncio.run(scenario())
    assert env["MY_SECRET"] == "s3"
    assert env["TZ"] == "UTC"
    assert env["PATH"] == os.environ["PATH"]
    assert not [name for name in env if name.startswith("CELLNODE_")]
    assert "UNRELATED_SERVER_VARIABLE" not in env


def test_corrupt_blob_fails_the_start(tmp_path: Path) -> None:
    launch = randomizer_spec(tmp_path)
    Path(launch["variables"][0]["path"]).write_bytes(b"tampered")
    name = launch["variables"][0]["name"]

    async def scenario() -> None:
        async with LocalBackend() as backend:
            spec = InstanceSpec("n1", "i1", launch, log_path=tmp_path / "logs")
            handle = await backend.start(spec)
            with pytest.raises(InstanceFailed) as caught:
                await handle.wait_ready(30)
            message = str(caught.value)
            assert message.startswith("Instance 'i1' of node 'n1' exited with code 3 before it was ready; ")
            assert f"its last log line: Blob for variable {name!r} at " in message
            assert "Capture the checkpoint again." in message
            assert handle.returncode == 3 and handle.pid is None
            assert await handle.wait() == 3
            assert backend.zygotes[0].returncode == 3

    asyncio.run(scenario())


def test_wait_ready_timeout_kills_the_instance(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend() as backend:
            spec = InstanceSpec("n1", "i1", randomizer_spec(tmp_path), log_path=tmp_path / "logs")
            handle = await backend.start(spec)
            with pytest.raises(InstanceFailed, match="did not answer a PING within 0 s, so it was killed"):
                await handle.wait_ready(0)
            assert handle.returncode == -signal.SIGKILL
            (zygote,) = backend.zygotes
            await zygote.process.wait()
            assert zygote.returncode == -signal.SIGKILL, "a zygote still loading after the start timeout is killed"

    asyncio.run(scenario())


def test_missing_interpreter(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LocalBackend(python=str(tmp_path / "no-python")) as backend:
            spec = InstanceSpec("n1", "i1", randomizer_spec(tmp_path), log_path=tmp_path / "logs")
            with pytest.raises(InstanceFailed, match="could not be started with"):
                await backend.start(spec)

    asyncio.run(scenario())


def test_stop_kills_a_cell_that_outlives_the_grace(tmp_path: Path) -> None:
    marker = tmp_path / "running"
    launch = launch_spec(tmp_path, f"open({str(marker)!r}, 'w').close()\ntime.sleep(60)", setup=SLEEPER)

    async def scenario() -> None:
        async with LocalBackend() as backend:
            handle = await start_ready(backend, tmp_path, launch)
            channel = InstanceChannel(handle.address)
            await channel.connect()
            answer = await channel.submit(EXECUTE, b"{}")
            while not marker.exists():
                await asyncio.sleep(0.01)
            await handle.stop(grace=0.3)
            assert handle.returncode == -signal.SIGKILL
            with pytest.raises(ConnectionError):
                await answer

    asyncio.run(scenario())


def test_close_stops_every_instance(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = LocalBackend()
        first = await start_ready(backend, tmp_path, randomizer_spec(tmp_path / "a"), instance_id="a")
        second = await start_ready(backend, tmp_path, randomizer_spec(tmp_path / "b"), instance_id="b")
        first.kill()
        assert await first.wait() == -signal.SIGKILL
        third = await start_ready(backend, tmp_path, randomizer_spec(tmp_path / "c"), instance_id="c")
        channel = InstanceChannel(third.address)
        await channel.connect()
        assert await channel.request(PING) == (PONG, b"")
        channel.close()
        await backend.close()
        assert (second.returncode, third.returncode) == (0, 0)
        assert not backend.runtime_dir.exists()

    asyncio.run(scenario())
