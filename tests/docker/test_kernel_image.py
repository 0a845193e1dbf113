"""The kernel image backend against a real engine: a checkpoint deployed in an image that has nothing of cellnode,
served through the front's `Instance`; the mounts, the image's user, interrupts, two instances, and the failures
that no retry can fix."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from cellnode.backends.base import InstanceFailed, InstanceSpec
from cellnode.backends.container import ContainerBackend
from cellnode.backends.kernel_image import KernelImageBackend, KernelImageFailed, KernelImageHandle
from cellnode.exceptions import DeadlineExceeded
from cellnode.router.instance import Instance
from cellnode.telemetry.logs import read_logs
from tests.docker_engine import Engine
from tests.runtime.checkpoints import launch_spec

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(600)]

USER_IMAGE = "cellnode-test/kernel-user:1"
NO_PYTHON_IMAGE = "cellnode-test/no-python:1"
PASSWD = b"root:x:0:0:root:/root:/bin/sh\njupyter:x:1000:1000::/tmp:/bin/sh\n"
EROFS = 30
EACCES = 13

# `triple` is a notebook function (pickled by value): it loads only in the Python minor version that made it.
SETUP = ("import os\nscale = 3\n\ndef triple(v):\n    return v * scale\n",)
CELL = """\
print('tripling', x)
y = triple(x)
uid = os.getuid()
errors = {}
for path in ('/opt/cellnode/cellnode/runtime/evil.py', '/opt/cellnode/cloudpickle/evil.py', '/cellnode/launch.json',
             '/cellnode/blobs/' + sorted(os.listdir('/cellnode/blobs'))[0], '/cellnode/run/scratch'):
    try:
        open(path, 'a').close()
        errors[path] = 0
    except OSError as exc:
        errors[path] = exc.errno
"""
OUTPUTS = {"y": "int", "uid": "int", "errors": "dict"}
SLEEPER = "time.sleep(seconds)\nn = seconds"


def kernel_spec(
    tmp_path: Path,
    image: str,
    source: str = CELL,
    *,
    instance_id: str = "i1",
    setup: tuple[str, ...] = SETUP,
    inputs: dict[str, str] | None = None,
    outputs: dict[str, str] | None = None,
    **kernel: Any,
) -> InstanceSpec:
    launch = launch_spec(
        tmp_path,
        source,
        setup=setup,
        inputs=inputs or {"x": "int"},
        outputs=outputs or OUTPUTS,
        instance_id=instance_id,
    )
    for variable in launch["variables"]:
        os.chmod(variable["path"], 0o600)  # as the blob store keeps them
    launch["kernel_image"] = {"image": image, "registry_auth": None, **kernel}
    return InstanceSpec("n1", instance_id, launch, log_path=tmp_path / "logs" / "n1")


def with_import(spec: InstanceSpec, name: str, module: str) -> InstanceSpec:
    spec.launch["imports"][name] = module
    return spec


def deadline(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def connected(handle: KernelImageHandle, **options: float) -> Instance:
    instance = Instance(handle, timeout=options.pop("timeout", 10.0), **options)
    await instance.connect()
    return instance


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture(scope="module")
def user_image(docker_engine: Engine, python_image: str) -> Iterator[str]:
    """The Python image run as `jupyter` (uid 1000), as the reference's custom images are, with an entrypoint that
    would fail anything it ran."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("etc/passwd")
        info.size, info.mode = len(PASSWD), 0o644
        tar.addfile(info, io.BytesIO(PASSWD))
    container = docker_engine.client.containers.create(python_image, ["true"], network_mode="none")
    try:
        container.put_archive("/", archive.getvalue())
        repository, tag = USER_IMAGE.split(":")
        container.commit(repository, tag, changes=["USER jupyter", 'ENTRYPOINT ["/bin/false"]'])
    finally:
        container.remove(force=True)
    yield USER_IMAGE
    docker_engine.client.images.remove(USER_IMAGE)


@pytest.fixture(scope="module")
def no_python_image(docker_engine: Engine) -> Iterator[str]:
    """An image of one text file: no python3, no shell."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("README")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"empty"))
    repository, tag = NO_PYTHON_IMAGE.split(":")
    docker_engine.client.api.import_image_from_data(archive.getvalue(), repository=repository, tag=tag)
    yield NO_PYTHON_IMAGE
    docker_engine.client.images.remove(NO_PYTHON_IMAGE)


def test_a_cell_runs_in_an_image_without_cellnode(docker_engine: Engine, python_image: str, tmp_path: Path) -> None:
    for module in ("cellnode", "cloudpickle"):
        with pytest.raises(docker.errors.ContainerError) as missing:
            docker_engine.client.containers.run(
                python_image, ["python3", "-c", f"import {module}"], network_mode="none", remove=True
            )
        assert f"ModuleNotFoundError: No module named '{module}'".encode() in (missing.value.stderr or b"")

    async def scenario() -> None:
        async with (
            ContainerBackend(base_url=docker_engine.host) as containers,
            KernelImageBackend(containers) as backend,
        ):
            handle = await backend.start(kernel_spec(tmp_path, python_image, python_version="3.11.7"))
            await handle.wait_started(30)
            assert handle.pid is not None and handle.returncode is None
            # The pid is the runtime's, here: the child of the container's init.
            assert cmdline(handle.pid)[:3] == ["python3", "-u", "-c"]
            assert cmdline(parent_of(handle.pid))[0].endswith("docker-init")
            await handle.wait_ready(60)
            assert handle.load_seconds is not None and handle.load_seconds > 0
            assert handle.address == str(handle.directory / "run" / "sock") and len(handle.address) < 100
            attrs = docker_engine.client.containers.get(f"cellnode-{handle.instance_id}").attrs
            writable = [(m["Source"], m["Destination"]) for m in attrs["Mounts"] if m["RW"]]
            assert writable == [(str(handle.directory / "run"), "/cellnode/run")], "one writable mount only"
            assert {m["Destination"] for m in attrs["Mounts"]} >= {
                "/opt/cellnode/cellnode/runtime",
                "/opt/cellnode/cloudpickle",
                "/cellnode/launch.json",
            }
            assert not [e for e in attrs["Config"]["Env"] if e.startswith(("PORT=", "CELLNODE_PORT="))]
            spec = json.loads((handle.directory / "launch.json").read_text())
            assert spec["socket"] == "/cellnode/run/sock" and "kernel_image" not in spec
            assert {variable["path"].rsplit("/", 1)[0] for variable in spec["variables"]} == {"/cellnode/blobs"}

            instance = await connected(handle)
            answer = json.loads(await instance.execute(b'{"x": 5}', deadline=deadline(10), request_id="req-1"))
            assert answer["y"] == 15 and answer["uid"] == 0
            paths = list(answer["errors"])
            # Even root in the container cannot write what is mounted read-only; the run directory it can.
            assert [answer["errors"][path] for path in paths] == [EROFS, EROFS, EROFS, EROFS, 0], answer["errors"]
            instance.close()

            began = time.monotonic()
            await handle.stop()
            assert handle.returncode == 0 and await handle.wait() == 0, "SIGTERM reached the runtime"
            assert time.monotonic() - began < 5
            assert not handle.directory.exists()
            assert not docker_engine.client.containers.list(all=True, filters={"label": "cellnode.node_id=n1"})
            handle.interrupt()  # Ended: nothing to signal.
        assert not backend.runtime_dir.exists()

    asyncio.run(scenario())
    records = read_logs(tmp_path / "logs" / "n1", tail=1000)
    # The runtime's own records, request IDs kept, copied through the FIFO.
    assert ("i1", "req-1", "out", "tripling 5") in [(r.instance_id, r.request_id, r.stream, r.text) for r in records]
    assert any(r.request_id == "-" and "loaded 2 variables" in r.text for r in records), records


def test_interrupt_stops_a_long_cell(
    docker_engine: Engine, python_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = ("import time",)
    spec = kernel_spec(
        tmp_path, python_image, SLEEPER, setup=setup, inputs={"seconds": "float"}, outputs={"n": "float"}
    )

    async def scenario() -> None:
        async with (
            ContainerBackend(base_url=docker_engine.host) as containers,
            KernelImageBackend(containers) as backend,
        ):
            handle = await backend.start(spec)
            await handle.wait_ready(60)
            handle.interrupt()  # Idle: ignored.
            instance = await connected(handle, timeout=0.5, interrupt_grace=5.0)
            for way in ("pidfd", "engine"):
                if way == "engine":
                    # A server that may not signal the runtime has the engine pass SIGINT on through the init.
                    def refuse(pidfd: int, signum: int) -> None:
                        raise PermissionError(1, "Operation not permitted")

                    monkeypatch.setattr(signal, "pidfd_send_signal", refuse)
                began = time.monotonic()
                with pytest.raises(DeadlineExceeded, match="the cell was interrupted"):
                    await instance.execute(b'{"seconds": 60}', deadline=deadline(0.5))
                assert time.monotonic() - began < 3, way
                assert instance.is_alive and handle.returncode is None
                assert await instance.execute(b'{"seconds": 0}', deadline=deadline(5)) == b'{"n":0}'
            monkeypatch.undo()
            instance.close()

    asyncio.run(scenario())


def test_two_instances_of_an_image_user(
    docker_engine: Engine, user_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies = tmp_path / "copies"

    async def scenario() -> None:
        async with (
            ContainerBackend(base_url=docker_engine.host) as containers,
            KernelImageBackend(containers, blob_dir=copies) as backend,
        ):
            first, second = await asyncio.gather(
                *(backend.start(kernel_spec(tmp_path, user_image, instance_id=i)) for i in ("a", "b"))
            )
            await asyncio.gather(first.wait_ready(60), second.wait_ready(60))
            assert first.pid != second.pid and first.address != second.address
            for handle in (first, second):
                run_dir = (handle.directory / "run").stat()
                assert (run_dir.st_uid, stat.S_IMODE(run_dir.st_mode)) == (1000, 0o700)
                spec_file = (handle.directory / "launch.json").stat()
                assert (spec_file.st_uid, stat.S_IMODE(spec_file.st_mode)) == (1000, 0o400)
                assert stat.S_IMODE(handle.directory.stat().st_mode) == 0o700
            # The store's blobs are root's, 0600: the image's user reads copies of them, made once for both.
            made = sorted((copies / "1000").iterdir())
            assert len(made) == 2 and first.blob_copies == second.blob_copies == set(made)
            assert {(p.stat().st_uid, stat.S_IMODE(p.stat().st_mode)) for p in made} == {(1000, 0o400)}

            instances = [await connected(handle) for handle in (first, second)]
            for number, instance in enumerate(instances):
                answer = json.loads(await instance.execute(b'{"x": %d}' % number, deadline=deadline(10)))
                assert (answer["y"], answer["uid"]) == (3 * number, 1000)
                # Files it does not own (0400): denied before the read-only mount is even looked at.
                assert [answer["errors"][path] for path in answer["errors"]] == [EROFS, EROFS, EACCES, EACCES, 0]

            first.kill()
            assert await asyncio.wait_for(first.wait(), 10) == -signal.SIGKILL
            assert not first.directory.exists(), "its directory goes once it has ended"
            assert second.returncode is None
            assert json.loads(await instances[1].execute(b'{"x": 7}', deadline=deadline(10)))["y"] == 21

            await backend.release("n1")
            assert second.returncode == 0
            assert not list((copies / "1000").iterdir()), "release removes the copies no instance uses"
            for instance in instances:
                instance.close()

    asyncio.run(scenario())
    records = read_logs(tmp_path / "logs" / "n1", tail=1000)
    assert {record.instance_id for record in records} == {"a", "b"}


def test_failures_no_retry_can_fix(
    docker_engine: Engine, python_image: str, no_python_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ghost = "cellnode-test/ghost-user:1"
    container = docker_engine.client.containers.create(python_image, ["true"], network_mode="none")
    try:
        container.commit(*ghost.split(":"), changes=["USER ghost"])
    finally:
        container.remove(force=True)

    async def failure(backend: KernelImageBackend, spec: InstanceSpec) -> tuple[InstanceFailed, int | None]:
        handle = await backend.start(spec)
        with pytest.raises(InstanceFailed) as failed:
            await handle.wait_ready(60)
        return failed.value, handle.returncode

    async def scenario() -> None:
        async with (
            ContainerBackend(base_url=docker_engine.host) as containers,
            KernelImageBackend(containers) as backend,
        ):
            no_python, newer, no_numpy = await asyncio.gather(
                failure(backend, kernel_spec(tmp_path, no_python_image, instance_id="nopy")),
                failure(backend, kernel_spec(tmp_path, python_image, instance_id="new", python_version="3.12.1")),
                failure(backend, with_import(kernel_spec(tmp_path, python_image, instance_id="np"), "np", "numpy")),
            )
            error, code = no_python
            assert error.permanent and code == 127
            assert str(error).startswith(
                f"Instance 'nopy' of node 'n1' could not start: image '{no_python_image}' has "
            )
            assert re.search(
                r"no usable python3 \(\[FATAL tini \(\d+\)\] exec python3 failed: No such file or directory\)",
                str(error),
            ), error

            error, code = newer
            assert error.permanent and code == 4
            assert "The checkpoint was captured with Python 3.12, and the image's python3 is Python 3.11." in str(error)
            assert "Use an image with Python 3.12, or capture the checkpoint again with Python 3.11." in str(error)

            error, code = no_numpy
            assert error.permanent and code == 4 and isinstance(error, KernelImageFailed)
            assert "exited with code 4 before it was ready; its last log line: Module 'numpy' (imported as 'np')" in (
                str(error)
            )

            # Not ready in time: killed, and worth a retry.
            slow = await backend.start(kernel_spec(tmp_path, python_image, instance_id="slow"))
            with pytest.raises(InstanceFailed, match="did not answer a PING within 0 s, so it was killed") as late:
                await slow.wait_ready(0)
            assert not late.value.permanent and slow.returncode == -signal.SIGKILL

            lost_blob = kernel_spec(tmp_path, python_image, instance_id="lost")
            lost_blob.launch["variables"][0]["path"] = str(tmp_path / "gone.pkl")
            refused = [
                (kernel_spec(tmp_path, python_image, memory=5), "unknown keys \\['memory'\\]"),
                (kernel_spec(tmp_path, python_image, disk_bytes=2**30), "disk limit of 1073741824 bytes .*pquota"),
                (kernel_spec(tmp_path, ghost), "runs as user 'ghost', which its /etc/passwd does not list"),
                (lost_blob, "Blob for variable 'scale' at .*gone.pkl cannot be read: No such file or directory"),
            ]
            for spec, message in refused:
                with pytest.raises(InstanceFailed, match=message) as bad:
                    await backend.start(spec)
                assert bad.value.permanent
            # A server that is not root could not connect to the socket of an image user other than its own.
            monkeypatch.setattr(os, "geteuid", lambda: 4321)
            with pytest.raises(InstanceFailed, match="runs as uid 0, and this server as uid 4321") as other:
                await backend.start(kernel_spec(tmp_path, python_image))
            assert other.value.permanent
            monkeypatch.undo()
            assert not list(backend.runtime_dir.glob("[0-9]*")), "a failed start leaves no instance directory"

    try:
        asyncio.run(scenario())
    finally:
        docker_engine.client.images.remove(ghost)
