"""The kernel image backend: each instance of a cell node runs in a container of the node's own image
(`cellnode node create ... --kernel-image REF`), which needs only Python >= 3.10 and the packages the cell uses.

Nothing of cellnode is installed in the image: the instance code is brought in read-only. The container runs, as the
image's user and with the image's entrypoint replaced, `python3 -u -c BOOTSTRAP /cellnode/launch.json [X.Y]`; the
bootstrap puts the mounted code first on `sys.path`, checks the interpreter (3.10 or newer, and the minor version X.Y
that captured the checkpoint), then runs `cellnode.runtime.instance` as `python -m cellnode.runtime` would. Its mounts:

    /opt/cellnode/cellnode/{__init__,_version}.py, runtime/   read-only: the runtime (standard library + cloudpickle)
    /opt/cellnode/cloudpickle/                                read-only: the server's cloudpickle
    /cellnode/launch.json                                     read-only: the runtime's launch spec, written here
    /cellnode/blobs/<sha256>                                  read-only: each variable's blob
    /cellnode/run/                                            writable, the only writable mount: a private directory

In `/cellnode/run` the runtime binds its Unix socket; the handle's `address` is the socket's host path, so the front
connects across the bind mount. Host side, each instance has a directory in the backend's runtime directory (mode
0700, short, as a socket path holds at most 107 bytes): `launch.json` and `run/`, both owned by the image's user (its
uid read from the image's config, and its `/etc/passwd` for a user name), which nobody else on the host can reach. A
blob the image's user cannot read (the store's are 0600) is copied once per user into `blob_dir` (mode 0400, owned by
that user), and the copies no instance uses are removed when a node is released.

Logs. The runtime writes its records itself, request IDs included, into a FIFO in `run/` (its `<instance_id>.log`),
which the container backend copies into `<instance_id>.log` in the node's log directory and rotates there (see
`cellnode.backends.container_logs`); what is printed before the runtime's log is open (the bootstrap, the image's
init) is copied from the container's output with the request ID `-`.

`InstanceSpec.launch` is the runtime's launch spec, as the supervisor builds it for the local backend, plus:

    "kernel_image": {
        "image": "127.0.0.1:5000/team/kernel:1",
        "registry_auth": {"username": "json_key", "password": "..."},   # or None; the password is never logged
        "python_version": "3.11.7",   # or None: the Python that captured the checkpoint; the image's must be 3.11
        "memory_bytes": 536870912,    # or None: the memory limit, swap included
        "cpus": 1.5,                  # or None
        "disk_bytes": None,           # or the size limit of the container's writable layer (needs xfs with pquota)
    }

Failures that no retry can fix are permanent (`InstanceFailed.permanent`): an image without python3, an interpreter
older than 3.10 or of another minor version than the checkpoint's, a checkpoint it cannot load (a missing package: the
runtime's exit codes 2, 3 and 4), and what the container backend reports as permanent (a missing image, refused
credentials, a refused disk limit). The engine must run on this machine: the mounts are this machine's paths, and
`pid` is the runtime's pid here (the server reads its memory from /proc and interrupts it through a pidfd). The
server must run as root, or as the image's user: the runtime's socket is mode 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import stat
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

import cellnode
from cellnode.backends.base import Backend, InstanceFailed, InstanceHandle, InstanceSpec
from cellnode.backends.container import ContainerBackend, ContainerHandle
from cellnode.backends.container_config import CONFIG_CHECKS, ContainerConfig, RunDir
from cellnode.backends.container_logs import ENGINE_ERRORS
from cellnode.backends.local import ping
from cellnode.runtime.instance import MAX_SOCKET_PATH

CODE_ROOT = "/opt/cellnode"
SPEC_PATH = "/cellnode/launch.json"
BLOB_ROOT = "/cellnode/blobs"
RUN_TARGET = "/cellnode/run"
SOCKET_NAME = "sock"
# The runtime never rotates its FIFO (it would rename it away); the copy into the node's log directory rotates.
NO_ROTATION = 1 << 62
PERMANENT_EXIT_CODES = {2, 3, 4}  # the runtime's: a bad spec, a corrupt blob, a checkpoint it cannot load
EXEC_FAILED = 127  # the container's init could not start python3
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"(\d+)\.(\d+)")

# Runs in the image's python3, whatever its version: no syntax newer than Python 3.0. Exit 4 (permanent) when the
# interpreter cannot load the checkpoint, 2 when the mounted runtime cannot be imported.
BOOTSTRAP = f"""\
import sys
sys.path.insert(0, {CODE_ROOT!r})
found = "%d.%d.%d" % sys.version_info[:3]
wanted = sys.argv[2] if len(sys.argv) > 2 else ""
if sys.version_info < (3, 10):
    sys.stderr.write("The image's python3 is Python %s; cellnode instances need Python 3.10 or newer. Use an image "
                     "with a newer python3.\\n" % found)
    sys.exit(4)
if wanted and found.split(".")[:2] != wanted.split("."):
    sys.stderr.write("The checkpoint was captured with Python %s, and the image's python3 is Python %s: a checkpoint "
                     "loads only in the Python version that captured it. Use an image with Python %s, or capture the "
                     "checkpoint again with Python %s.\\n" % (wanted, found, wanted, found.rsplit(".", 1)[0]))
    sys.exit(4)
try:
    from cellnode.runtime import instance
except Exception as exc:
    sys.stderr.write("The cellnode runtime mounted at %s cannot be imported: %s: %s. The server's cellnode "
                     "package must be readable by the image's user.\\n" % (sys.path[0], type(exc).__name__, exc))
    sys.exit(2)
sys.exit(instance.main(sys.argv[1:2]))
"""

NO_PYTHON = (
    "Instance {instance_id!r} of node {node_id!r} could not start: image {image!r} has no usable python3 ({line}). A "
    "kernel image needs Python 3.10 or newer as python3 on its PATH, and the packages the cell uses."
)
NOT_READY = "Instance {instance_id!r} of node {node_id!r} (kernel image {image!r}) {what}{said} (log: {log})."
NO_SUCH_USER = (
    "Image {image!r} runs as user {user!r}, which its /etc/passwd does not list; set the image's USER to a user it "
    "has, or to a numeric uid."
)
OTHER_USER = (
    "Image {image!r} runs as uid {uid}, and this server as uid {server_uid}, which could not connect to the "
    "instance's socket (mode 0600). Run the server as root, or use an image whose user is uid {server_uid}."
)
NO_BLOB = "Blob for variable {name!r} at {path} cannot be read: {error}. Capture the checkpoint again."


class KernelImageFailed(InstanceFailed):
    """An instance in a kernel image could not start; `permanent` when no retry can help."""


@dataclass(frozen=True)
class KernelImageConfig:
    """`launch["kernel_image"]`, checked (see the module docstring); `parse()` raises ValueError naming the key."""

    image: str
    registry_auth: dict[str, str] | None = field(default=None, repr=False)  # holds the password: never printed
    python_version: str | None = None
    memory_bytes: int | None = None
    cpus: float | None = None
    disk_bytes: int | None = None

    @classmethod
    def parse(cls, value: object) -> KernelImageConfig:
        if not isinstance(value, dict):
            raise ValueError(f"The launch spec's 'kernel_image' is {type(value).__name__}; it must be a dict.")
        unknown = sorted(set(value) - set(KERNEL_CHECKS))
        if unknown:
            raise ValueError(
                f"The kernel_image launch spec has unknown keys {unknown}; known: {sorted(KERNEL_CHECKS)}."
            )
        if "image" not in value:
            raise ValueError("The kernel_image launch spec has no 'image'; it is required.")
        for key, given in value.items():
            is_valid, expected = KERNEL_CHECKS[key]
            if not is_valid(given):
                shown = "<hidden>" if key == "registry_auth" else repr(given)
                raise ValueError(f"The kernel_image launch spec has {key} {shown}; it must be {expected}.")
        return cls(**value)

    @property
    def minor_version(self) -> str:
        """The minor version of `python_version` ("3.11" for "3.11.7"); empty without one."""
        match = _VERSION.match(self.python_version or "")
        return f"{match[1]}.{match[2]}" if match else ""


KERNEL_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{key: CONFIG_CHECKS[key] for key in ("image", "registry_auth", "memory_bytes", "cpus", "disk_bytes")},
    "python_version": (
        lambda v: v is None or (isinstance(v, str) and _VERSION.match(v) is not None),
        'None or a Python version such as "3.11.7"',
    ),
}


class KernelImageHandle(InstanceHandle):
    """An instance in a container of a kernel image: a runtime instance, as the local backend's are, in a container
    (`container`, whose stop, kill and exit it shares).

    `pid` is the runtime's pid on this machine (a child of the container's init), known once `wait_started()` has
    returned. `interrupt()` sends it SIGINT through a pidfd, or through the engine (the init passes it on) where the
    server may not signal it. Exit codes are the runtime's; one killed by a signal exits with minus that signal, as
    a local instance does.
    """

    def __init__(self, spec: InstanceSpec, container: ContainerHandle, directory: Path, image: str) -> None:
        super().__init__(instance_id=spec.instance_id, node_id=spec.node_id, address=container.address)
        self.container = container
        self.directory = directory
        self.image = image
        self.blob_copies: set[Path] = set()
        self._pid: int | None = None
        self._pidfd: int | None = None
        loop = asyncio.get_running_loop()
        self._created = loop.time()
        self._ready_after: float | None = None
        self._ended: asyncio.Future[int] = asyncio.ensure_future(self._clean_up())

    @property
    def pid(self) -> int | None:
        if self._pid is None and self.returncode is None:
            self._find_runtime()
        return self._pid

    @property
    def returncode(self) -> int | None:
        code = self.container.returncode
        return None if code is None else _exit_code(code)

    @property
    def load_seconds(self) -> float | None:
        return self._ready_after  # the instance loads the checkpoint itself: from its start to its first PONG

    @property
    def oom_killed(self) -> bool:
        return self.container.oom_killed

    async def wait_started(self, timeout: float) -> None:
        """Return once the runtime's process is known (`pid`), or the container has ended, or after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pid is None and self.returncode is None and loop.time() < deadline:
            await asyncio.sleep(0.005)

    async def wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.wait_started(timeout)
        delay = 0.005
        while True:
            if self.returncode is not None:
                raise self._failure(f"exited with code {self.returncode} before it was ready")
            if await ping(self.address, max(0.0, deadline - loop.time())):
                self._ready_after = loop.time() - self._created
                return
            if loop.time() >= deadline:
                self.kill()
                await self.wait()
                raise self._failure(f"did not answer a PING within {timeout:g} s, so it was killed")
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.1)

    async def wait(self) -> int:
        """Wait for the instance to end and its directory to be removed; its exit code."""
        return await asyncio.shield(self._ended)

    def interrupt(self) -> None:
        if self.returncode is not None:
            return
        if self._send(signal.SIGINT):
            return
        threading.Thread(
            target=self._engine_signal, args=("SIGINT",), name=f"interrupt-{self.instance_id}", daemon=True
        ).start()

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM through the container's init: the runtime answers the request it runs, then exits 0; SIGKILL after
        `grace` seconds (rounded up to whole seconds)."""
        await self.container.stop(grace)
        await self.wait()

    def kill(self) -> None:
        """SIGKILL the runtime at once (its container then ends), and the container through the engine."""
        if self.returncode is not None:
            return
        self._send(signal.SIGKILL)
        self.container.kill()

    def last_log_line(self) -> str:
        return self.container.last_log_line()

    def _find_runtime(self) -> None:
        """The init's child, the runtime, as a pid and a pidfd (so that a reused pid is never signalled)."""
        init = self.container.pid
        if init is None:
            return
        try:
            children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
            # Until it has exec'd python3, the child is a copy of the init.
            if not children or _cmdline(int(children[0])) == _cmdline(init):
                return
            pidfd = os.pidfd_open(int(children[0]))
        except OSError:
            return  # ended
        self._pid, self._pidfd = int(children[0]), pidfd

    def _send(self, signum: int) -> bool:
        """Signal the runtime through its pidfd; False where this process may not (the engine must)."""
        if self._pidfd is None:
            self._find_runtime()
        if self._pidfd is None or select.select([self._pidfd], [], [], 0)[0]:  # readable: it has exited
            return self._pidfd is not None
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return True

    def _engine_signal(self, name: str) -> None:
        with contextlib.suppress(*ENGINE_ERRORS):  # not running any more
            self.container.container.kill(signal=name)

    async def _clean_up(self) -> int:
        code = await self.container.wait()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        await asyncio.to_thread(shutil.rmtree, self.directory, True)
        return _exit_code(code)

    def _failure(self, what: str) -> KernelImageFailed:
        code = self.returncode
        line = self.last_log_line()
        if code == EXEC_FAILED and "exec python3 failed" in line:
            message = NO_PYTHON.format(instance_id=self.instance_id, node_id=self.node_id, image=self.image, line=line)
            return KernelImageFailed(message, permanent=True)
        if self.oom_killed:
            what += f" (the engine killed it for passing its memory limit of {self.container.memory_bytes} bytes)"
        said = f"; its last log line: {line}" if line else "; it logged nothing"
        message = NOT_READY.format(
            instance_id=self.instance_id,
            node_id=self.node_id,
            image=self.image,
            what=what,
            said=said,
            log=self.container.log.path,
        )
        return KernelImageFailed(message, permanent=code in PERMANENT_EXIT_CODES)


class KernelImageBackend(Backend):
    """Runs the instances of cell nodes in containers of their kernel images (see the module docstring).

    Parameters:
        containers: the container backend whose engine runs them (shared with docker nodes); by default one of its
            own, for the engine at `DOCKER_HOST`, which `close()` closes.
        blob_dir: where blobs are copied for image users who cannot read the store's; by default in the runtime
            directory (a temporary directory, which may be in memory: give a directory on disk for big checkpoints).

        async with KernelImageBackend(ContainerBackend(base_url="unix:///run/docker.sock")) as backend:
            handle = await backend.start(InstanceSpec("n1", "i1", launch, log_path=Path("logs/n1")))
            await handle.wait_ready(timeout=120.0)
    """

    name = "kernel-image"

    def __init__(self, containers: ContainerBackend | None = None, *, blob_dir: Path | None = None) -> None:
        self.containers = containers if containers is not None else ContainerBackend()
        self._owns_containers = containers is None
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="cnk-"))
        self.blob_dir = blob_dir if blob_dir is not None else self.runtime_dir / "blobs"
        self.handles: dict[str, KernelImageHandle] = {}
        self._counter = itertools.count(1)
        self._uids: dict[str, int] = {}  # image id -> the uid it runs as
        self._starting: dict[int, set[Path]] = {}  # the blob copies of starts in flight, which release() must keep
        self._code_mounts = runtime_mounts()

    async def start(self, spec: InstanceSpec) -> KernelImageHandle:
        try:
            config = KernelImageConfig.parse(spec.launch.get("kernel_image"))
        except ValueError as exc:
            raise KernelImageFailed(f"Node {spec.node_id!r}: {exc}", permanent=True) from exc
        uid = await self._image_uid(config)
        if os.geteuid() not in (0, uid):
            raise KernelImageFailed(
                OTHER_USER.format(image=config.image, uid=uid, server_uid=os.geteuid()), permanent=True
            )
        self.handles = {key: handle for key, handle in self.handles.items() if handle.returncode is None}
        number = next(self._counter)
        directory = self.runtime_dir / str(number)
        run_dir = directory / "run"
        socket_path = run_dir / SOCKET_NAME
        if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
            raise KernelImageFailed(
                f"Socket path {str(socket_path)!r} is longer than {MAX_SOCKET_PATH} bytes; set TMPDIR to a shorter "
                "directory.",
                permanent=True,
            )
        copies: set[Path] = set()
        self._starting[number] = copies
        try:
            blob_mounts, variables, made = await asyncio.to_thread(self._blob_mounts, spec, uid)
            copies |= made
            launch = {key: value for key, value in spec.launch.items() if key not in ("kernel_image", "parent_pid")}
            launch.update(
                variables=variables,
                socket=f"{RUN_TARGET}/{SOCKET_NAME}",
                log_dir=RUN_TARGET,
                log_max_bytes=NO_ROTATION,
            )
            records = run_dir / f"{spec.instance_id}.log"
            await asyncio.to_thread(_make_instance_dir, directory, launch, records, uid)
            container_config = ContainerConfig(
                image=config.image,
                registry_auth=config.registry_auth,
                memory_bytes=config.memory_bytes,
                cpus=config.cpus,
                disk_bytes=config.disk_bytes,
                mounts=[*self._code_mounts, {"source": str(directory / "launch.json"), "target": SPEC_PATH}]
                + blob_mounts,
                entrypoint=["python3", "-u", "-c", BOOTSTRAP],
                command=[SPEC_PATH, config.minor_version],
            )
            # The container backend reads only the log settings from its spec's launch.
            log_settings = {key: spec.launch[key] for key in ("log_max_bytes", "log_backups") if key in spec.launch}
            container_spec = InstanceSpec(
                spec.node_id, spec.instance_id, log_settings, log_path=spec.log_path, env=spec.env, zone=spec.zone
            )
            run = RunDir(source=str(run_dir), target=RUN_TARGET, socket=str(socket_path), records=str(records))
            container = await self.containers.start_container(container_spec, container_config, run_dir=run)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise
        finally:
            del self._starting[number]
        handle = KernelImageHandle(spec, container, directory, config.image)
        handle.blob_copies = copies
        self.handles[spec.instance_id] = handle
        return handle

    async def release(self, node_id: str) -> None:
        """Stop the node's instances that still run, and remove the blob copies no running instance uses."""
        await asyncio.gather(*(handle.stop() for handle in self.handles.values() if handle.node_id == node_id))
        self.handles = {key: handle for key, handle in self.handles.items() if handle.returncode is None}
        in_use = set().union(*(handle.blob_copies for handle in self.handles.values()), *self._starting.values())
        await asyncio.to_thread(_remove_copies, self.blob_dir, in_use)

    async def close(self) -> None:
        handles, self.handles = list(self.handles.values()), {}
        try:
            await asyncio.gather(*(handle.stop() for handle in handles))
            if self._owns_containers:
                await self.containers.close()
        finally:
            await asyncio.to_thread(shutil.rmtree, self.runtime_dir, True)
            if self.blob_dir.is_dir():
                await asyncio.to_thread(_remove_copies, self.blob_dir, set())

    async def _image_uid(self, config: KernelImageConfig) -> int:
        """The uid the image runs as: its USER, looked up in its /etc/passwd if it is a name; root without one."""
        attrs = await self.containers.image_attrs(config.image, config.registry_auth)
        image_id = str(attrs["Id"])
        if image_id in self._uids:
            return self._uids[image_id]
        user = str((attrs.get("Config") or {}).get("User") or "").partition(":")[0]
        if not user or user.isdigit():
            uid = int(user or 0)
        else:
            passwd = await self.containers.read_image_file(config.image, "/etc/passwd")
            entries = [line.split(":") for line in (passwd or b"").decode("utf-8", "replace").splitlines()]
            found = [
                int(fields[2]) for fields in entries if len(fields) > 2 and fields[0] == user and fields[2].isdigit()
            ]
            if not found:
                raise KernelImageFailed(NO_SUCH_USER.format(image=config.image, user=user), permanent=True)
            uid = found[0]
        self._uids[image_id] = uid
        return uid

    def _blob_mounts(
        self, spec: InstanceSpec, uid: int
    ) -> tuple[list[dict[str, str]], list[dict[str, str]], set[Path]]:
        """In a thread: a read-only mount per blob, the variables with their paths in the container, and the copies
        made for (or used by) this instance."""
        mounts: dict[str, dict[str, str]] = {}
        variables: list[dict[str, str]] = []
        copies: set[Path] = set()
        for variable in spec.launch.get("variables", []):
            name, sha256, path = variable.get("name"), variable.get("sha256"), Path(variable.get("path", ""))
            if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
                raise KernelImageFailed(
                    f"Node {spec.node_id!r}: variable {name!r} of the launch spec has sha256 {sha256!r}; it must be "
                    "64 lowercase hexadecimal characters.",
                    permanent=True,
                )
            target = f"{BLOB_ROOT}/{sha256}"
            if sha256 not in mounts:
                try:
                    owner = path.stat().st_uid
                    if uid not in (0, owner):  # the store's blobs are 0600: the image's user could not read them
                        path = _copy_blob(path, self.blob_dir / str(uid) / sha256, uid)
                        copies.add(path)
                except OSError as exc:
                    error = exc.strerror or str(exc)
                    raise KernelImageFailed(NO_BLOB.format(name=name, path=path, error=error), permanent=True) from exc
                mounts[sha256] = {"source": str(path), "target": target}
            variables.append({**variable, "path": target})
        return list(mounts.values()), variables, copies


def runtime_mounts() -> list[dict[str, str]]:
    """The read-only mounts of the instance code: the parts of the cellnode package the runtime imports, and
    cloudpickle."""
    package = Path(cellnode.__file__).parent
    mounts = [
        {"source": str(package / name), "target": f"{CODE_ROOT}/cellnode/{name}"}
        for name in ("__init__.py", "_version.py", "runtime")
    ]
    mounts.append({"source": str(Path(cloudpickle.__file__).parent), "target": f"{CODE_ROOT}/cloudpickle"})
    return mounts


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _exit_code(code: int) -> int:
    """The runtime's exit code from the container's: the init exits 128 + N when its child died of signal N."""
    return -(code - 128) if 128 < code <= 128 + 64 else code


def _make_instance_dir(directory: Path, launch: dict[str, Any], records: Path, uid: int) -> None:
    """`directory` (0700), with `launch.json` (0400) and `run/` (0700) holding the FIFO `records` (0600), those
    three owned by `uid`, which the container runs as."""
    directory.mkdir(mode=0o700)
    spec_path = directory / "launch.json"
    with open(os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "w", encoding="utf-8") as file:
        json.dump(launch, file)
    run_dir = records.parent
    run_dir.mkdir(mode=0o700)
    os.mkfifo(records, 0o600)
    for path in (spec_path, run_dir, records):
        os.chown(path, uid, -1)


def _copy_blob(source: Path, target: Path, uid: int) -> Path:
    """`target`, a copy of `source` owned by `uid` (mode 0400), made unless it is there; copied under a temporary
    name, then renamed, so that a copy is whole."""
    if target.exists():
        return target
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    try:
        shutil.copyfile(source, partial)
        os.chown(partial, uid, -1)
        os.chmod(partial, stat.S_IRUSR)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _remove_copies(blob_dir: Path, keep: set[Path]) -> None:
    """Remove the blob copies of `blob_dir` not in `keep`."""
    for path in blob_dir.glob("*/*"):
        if path not in keep:
            path.unlink(missing_ok=True)
