"""The local backend's side of a zygote, the process that loads a node's checkpoint and forks its instances, and of
standalone instances, for nodes that cannot be forked.

`start_zygote()` starts `python -u -m cellnode.runtime --zygote SPEC` (see `cellnode.runtime.zygote`), a child of the
server in a session of its own, and returns a `LocalZygote`, which holds one end of a socket pair, the zygote's control
connection: through it each instance start asks for a fork, and the zygote reports each instance's exit.

Fork safety: a zygote whose load started threads or initialised CUDA says so in its READY frame and exits. Its
`LocalZygote` stays the node's current one and starts each instance as `InstanceStarter` does for a node whose launch
spec says `"fork": false`: `python -u -m cellnode.runtime SPEC`, a child of the server in a session of its own, which
loads the checkpoint itself and whose exit the backend waits for. Such an instance exits by itself within a second
of the server's death (the spec's `"parent_pid"`, checked by `InstanceServer`).

Lifetimes: a node's current zygote stays (a replacement instance then starts in milliseconds) until the backend
releases the node or closes; a superseded zygote is stopped once its last instance has ended. If a zygote dies, its
instances are killed and reported as -9. A zygote whose control connection closes (the server died) kills its
instances and exits.

Zygotes and standalone instances get a minimal environment plus `InstanceSpec.env`, never the server's `CELLNODE_*`
settings. Each process writes its own log file in the node's log directory (`InstanceSpec.log_path`): the zygote
`zygote-<n>.log`, which also takes whatever the interpreter writes before the runtime's log is set up, and each
instance `<instance_id>.log` (see `cellnode.runtime.logs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellnode.backends.base import InstanceFailed, InstanceSpec
from cellnode.runtime.protocol import EXITED, FORK, FORKED, READY, encode, read_frame

if TYPE_CHECKING:
    from cellnode.backends.local import LocalInstanceHandle

# COVERAGE_PROCESS_START lets coverage follow into instances; it carries no secret.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "COVERAGE_PROCESS_START")
ZYGOTE_STOP_GRACE = 5.0
FORK_OFF = 'the launch spec says "fork": false'
CANNOT_START = (
    "Instance {instance_id!r} of node {node_id!r} could not be started with {python!r} (log directory "
    "{log_dir!r}): {error}. Check that the interpreter exists and is executable, and that the log directory can be "
    "written."
)


class InstanceStarter:
    """Starts the instances of one launch spec of a node as standalone processes, and keeps them until they end.

    This is what a node whose launch spec says `"fork": false` gets instead of a zygote; `LocalZygote` builds on it.
    """

    def __init__(self, spec: InstanceSpec, digest: str, *, python: str, reason: str = FORK_OFF) -> None:
        self.node_id = spec.node_id
        self.digest = digest
        self.spec = spec
        self.python = python
        self.is_current = True
        self.is_ready = True
        # True while instances are forked from a zygote; `standalone_reason` says why they are not.
        self.is_forking = False
        self.standalone_reason = reason
        self.handles: set[LocalInstanceHandle] = set()
        self.log_path: Path | None = None
        self._standalone: set[asyncio.Task[None]] = set()
        self.load_seconds: float | None = None  # a zygote's, from its start to READY
        self._load_claimed = False

    def claim_load(self) -> bool:
        """True for the one instance whose start waits for this zygote's load (the first), so that the load is
        reported once."""
        claims = self.is_forking and not self.is_ready and not self._load_claimed
        self._load_claimed = self._load_claimed or claims
        return claims

    @property
    def is_done(self) -> bool:
        """Nothing will start from here again, and nothing that started here still runs."""
        return not self.is_current and not self.handles and not self._standalone

    async def launch(self, handle: LocalInstanceHandle) -> None:
        """Start `handle`'s instance as a process of its own; return once it runs, or has ended the handle."""
        self.handles.add(handle)
        if handle.returncode is not None:
            return
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run_standalone(handle, started), name=f"standalone-{handle.instance_id}")
        self._standalone.add(task)
        task.add_done_callback(self._standalone.discard)
        await asyncio.shield(started)

    def forget(self, handle: LocalInstanceHandle) -> None:
        """`handle` ended; a superseded starter with no instance left is retired."""
        self.handles.discard(handle)
        if not self.is_current:
            self.retire()

    def retire(self) -> None:
        """No new instance will start from here."""
        self.is_current = False

    async def stop(self, grace: float = ZYGOTE_STOP_GRACE) -> None:
        """Stop the instances (SIGTERM, then SIGKILL after `grace`) and wait until each is reaped; idempotent."""
        self.is_current = False
        await self._stop_instances(grace)

    def kill(self) -> None:
        """Nothing of its own to end: the instances are killed through their handles."""

    async def _stop_instances(self, grace: float) -> None:
        await asyncio.gather(*(handle.stop(grace) for handle in list(self.handles)))
        # Also those still starting, whose handles were ended at once: they are killed as soon as they run.
        await asyncio.gather(*list(self._standalone))

    async def _run_standalone(self, handle: LocalInstanceHandle, started: asyncio.Future[None]) -> None:
        log_dir = self.spec.log_path
        spec_path = Path(handle.address).with_suffix(".json")
        try:
            launch = {key: value for key, value in self.spec.launch.items() if key != "instance_id"}
            launch.update(
                node_id=handle.node_id,
                instance_id=handle.instance_id,
                socket=handle.address,
                log_dir=str(log_dir),
                parent_pid=os.getpid(),
            )
            try:
                make_log_dir(log_dir)
                write_spec(spec_path, launch)
                with open(os.open(handle.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
                    process = await asyncio.create_subprocess_exec(
                        *(self.python, "-u", "-m", "cellnode.runtime", str(spec_path)),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        env=instance_env(self.spec.env),
                        start_new_session=True,
                    )
            except OSError as exc:
                spec_path.unlink(missing_ok=True)
                message = CANNOT_START.format(
                    instance_id=handle.instance_id,
                    node_id=handle.node_id,
                    python=self.python,
                    log_dir=str(log_dir),
                    error=exc,
                )
                handle.end(1, message)
                return
            handle.started(process.pid)
        finally:
            if not started.done():
                started.set_result(None)
        code = await process.wait()
        spec_path.unlink(missing_ok=True)
        handle.end(code)


class LocalZygote(InstanceStarter):
    """The backend's side of one zygote process: its control connection and the instances it forked.

    If the zygote finds it is not safe to fork, its instances start standalone, as `InstanceStarter`'s do.
    """

    def __init__(
        self,
        spec: InstanceSpec,
        digest: str,
        *,
        python: str,
        process: asyncio.subprocess.Process,
        spec_path: Path,
        control: socket.socket,
        log_path: Path,
    ) -> None:
        super().__init__(spec, digest, python=python, reason="")
        self.process = process
        self.spec_path = spec_path
        self.log_path = log_path
        self.is_ready = False
        self.is_forking = True
        self.is_gone = False
        self._began = asyncio.get_running_loop().time()
        self._by_pid: dict[int, LocalInstanceHandle] = {}
        self._control = control
        self._writer: asyncio.StreamWriter | None = None
        # Resolves to None on READY, or to the exit code of a zygote that ended first.
        self._ready: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._lock = asyncio.Lock()
        self._forking: tuple[LocalInstanceHandle, asyncio.Future[dict[str, Any]]] | None = None
        self._task = asyncio.create_task(self._run(), name=f"zygote-{self.node_id}")
        self._stopping: asyncio.Task[None] | None = None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def is_done(self) -> bool:
        # A zygote that could not fork exits after READY, but its standalone instances go on.
        return self.returncode is not None and (self.is_forking or super().is_done)

    async def launch(self, handle: LocalInstanceHandle) -> None:
        """Fork `handle`'s instance (or start it standalone), then end the handle if that failed or the load did."""
        self.handles.add(handle)
        code = await asyncio.shield(self._ready)
        if code is None and not self.is_forking:
            await super().launch(handle)
            return
        async with self._lock:
            if handle.returncode is not None:
                return
            if code is not None or self.is_gone or self._writer is None or self._stopping is not None:
                handle.end(code if code is not None else -signal.SIGKILL)
                return
            answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._forking = (handle, answer)
            request = {"instance_id": handle.instance_id, "socket": handle.address}
            self._writer.write(encode(FORK, json.dumps(request).encode()))
            # Shielded: the lock is held until the answer is in, so answers always match their requests.
            failure = await asyncio.shield(answer)
        if "pid" not in failure:
            handle.end(int(failure.get("code", 1)))

    def forget(self, handle: LocalInstanceHandle) -> None:
        """`handle` ended; a superseded zygote with no instance left is stopped."""
        if handle.pid is not None:
            self._by_pid.pop(handle.pid, None)
        super().forget(handle)

    def retire(self) -> None:
        """No new instance will come from this zygote: stop it once its last instance has ended."""
        self.is_current = False
        if not self.handles and self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(ZYGOTE_STOP_GRACE), name=f"stop-zygote-{self.node_id}")

    async def stop(self, grace: float = ZYGOTE_STOP_GRACE) -> None:
        """Stop the instances (SIGTERM, then SIGKILL after `grace`), then the zygote; idempotent."""
        self.is_current = False
        self._stopping = self._stopping or asyncio.create_task(self._stop(grace))
        await asyncio.shield(self._stopping)

    def kill(self) -> None:
        """End the zygote at once; its forked instances are then killed too."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def _stop(self, grace: float) -> None:
        await self._stop_instances(grace)
        if self._writer is not None:
            self._writer.close()  # The zygote exits once its control connection closes.
        else:
            self.kill()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self.kill()
            await self._task

    async def _run(self) -> None:
        try:
            reader, self._writer = await asyncio.open_unix_connection(sock=self._control)
            while True:
                kind, payload = await read_frame(reader)
                message = json.loads(payload)
                if kind == READY and not self._ready.done():
                    self.is_ready = True
                    # The zygote's own measure of its load; else from its start, interpreter included.
                    self.load_seconds = float(message.get("seconds", asyncio.get_running_loop().time() - self._began))
                    if message.get("fork_safe") is False:
                        self.is_forking = False
                        self.standalone_reason = str(message.get("reason", ""))
                    self._ready.set_result(None)
                elif kind == EXITED:
                    handle = self._by_pid.pop(message["pid"], None)
                    if handle is not None:
                        handle.end(message["code"])
                elif self._forking is not None:
                    handle, answer = self._forking
                    self._forking = None
                    if kind == FORKED:
                        self._by_pid[message["pid"]] = handle
                        handle.started(message["pid"])
                    answer.set_result(message)
        except (ConnectionError, OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # The end of the stream, or a zygote that broke the protocol: either way it is done.
        finally:
            self.is_gone = True
            if self.is_forking:
                self.is_current = False
            if self._writer is not None:
                self._writer.close()
            else:
                self._control.close()
        code = await self.process.wait()
        self.spec_path.unlink(missing_ok=True)
        if not self._ready.done():
            self._ready.set_result(code)
        if self._forking is not None:
            self._forking[1].set_result({"code": -signal.SIGKILL})
        await asyncio.gather(*(handle.end_orphan() for handle in list(self._by_pid.values())))
        if self.is_forking:
            for handle in list(self.handles):
                if handle.pid is not None:
                    handle.end(-signal.SIGKILL)


async def start_zygote(spec: InstanceSpec, digest: str, *, python: str, spec_path: Path, name: str) -> LocalZygote:
    """Start the zygote of `spec`'s node, whose launch spec goes to `spec_path` and whose log is `<name>.log`."""
    ours, theirs = socket.socketpair()
    log_dir = spec.log_path
    launch = {key: value for key, value in spec.launch.items() if key != "instance_id"}
    launch.update(node_id=spec.node_id, control_fd=theirs.fileno(), log_dir=str(log_dir), log_name=name)
    write_spec(spec_path, launch)
    log_path = log_dir / f"{name}.log"
    try:
        make_log_dir(log_dir)
        with open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
            process = await asyncio.create_subprocess_exec(
                *(python, "-u", "-m", "cellnode.runtime", "--zygote", str(spec_path)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=instance_env(spec.env),
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
            )
    except OSError as exc:
        ours.close()
        spec_path.unlink(missing_ok=True)
        message = CANNOT_START.format(
            instance_id=spec.instance_id, node_id=spec.node_id, python=python, log_dir=str(log_dir), error=exc
        )
        raise InstanceFailed(message) from exc
    finally:
        theirs.close()
    return LocalZygote(
        spec, digest, python=python, process=process, spec_path=spec_path, control=ours, log_path=log_path
    )


def write_spec(path: Path, launch: dict[str, Any]) -> None:
    """Write a launch spec that only this user can read to a new file."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as file:
        json.dump(launch, file)


def make_log_dir(path: Path) -> None:
    """Create a node's log directory, mode 0700 (its parents as umask allows)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o700:
        path.chmod(0o700)


def launch_digest(spec: InstanceSpec, python: str) -> str:
    """What makes a zygote reusable for `spec`: the launch spec but its instance ID, the environment, the log dir."""
    launch = {key: value for key, value in spec.launch.items() if key != "instance_id"}
    key = {"launch": launch, "env": spec.env, "log": str(spec.log_path), "python": python}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def instance_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a zygote and its instances: a few variables of the server's, then `extra`."""
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env.update(extra)
    return env
