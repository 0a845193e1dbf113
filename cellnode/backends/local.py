"""The local backend: a zygote process per node, and instances forked from it (see `cellnode.runtime.zygote`).

The first `start()` of a node starts its zygote, `python -u -m cellnode.runtime --zygote SPEC`, a child of the server
in a session of its own, which loads the checkpoint once. The zygote is keyed by the node and a digest of its launch
spec (without the instance ID), environment and log file, so a changed checkpoint or cell gets a new zygote. The
backend holds one end of a socket pair, the zygote's control connection; through it each `start()` asks for a fork,
and the zygote reports each instance's exit, which is what `handle.wait()` returns. The handle signals the instance
itself, through a pidfd, so a pid reused after the instance ended is never signalled.

Lifetimes: a node's current zygote stays (a replacement instance then starts in milliseconds) until `release(node_id)`
or `close()`; a superseded zygote is stopped once its last instance has ended. If a zygote dies, its instances are
killed and reported as -9, and the next `start()` of the node starts a new zygote. A zygote whose control connection
closes (the server died) kills its instances and exits.

Zygotes get a minimal environment plus `InstanceSpec.env`, never the server's `CELLNODE_*` settings, and write stdout
and stderr (theirs and their instances') to the node's log file. Specs and sockets live in a private runtime directory
(`tempfile.mkdtemp`, mode 0700) with short names, because a Unix socket path holds at most 107 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cellnode.backends.base import Backend, InstanceFailed, InstanceHandle, InstanceSpec
from cellnode.runtime.protocol import EXITED, FORK, FORKED, PING, PONG, READY, encode, read_frame

# COVERAGE_PROCESS_START lets coverage follow into instances; it carries no secret.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "COVERAGE_PROCESS_START")
LOG_TAIL_BYTES = 4096
ZYGOTE_STOP_GRACE = 5.0


class LocalInstanceHandle(InstanceHandle):
    """An instance forked from a zygote: a grandchild of the server, whose exit its zygote reports."""

    def __init__(self, spec: InstanceSpec, address: str, zygote: LocalZygote) -> None:
        super().__init__(instance_id=spec.instance_id, node_id=spec.node_id, address=address)
        self.log_path = spec.log_path
        self.zygote = zygote
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._launch = asyncio.create_task(zygote.fork(self), name=f"fork-{spec.instance_id}")

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    async def wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(asyncio.shield(self._launch), timeout)
        except TimeoutError:
            if not self.zygote.is_ready:
                self.zygote.kill()  # Still loading after the whole start timeout: hung, or too slow to be useful.
            await self._give_up(timeout)
        delay = 0.005
        while True:
            if self.returncode is not None:
                raise InstanceFailed(self._failure(f"exited with code {self.returncode} before it was ready"))
            if await self._ping(max(0.0, deadline - loop.time())):
                return
            if loop.time() >= deadline:
                await self._give_up(timeout)
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.1)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def interrupt(self) -> None:
        self._signal(signal.SIGINT)

    async def stop(self, grace: float = 5.0) -> None:
        if self._pid is None:
            self.kill()
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), grace)
        except TimeoutError:
            self.kill()
            await self.wait()

    def kill(self) -> None:
        if self.returncode is not None:
            return
        if self._pid is None:
            # Not forked yet: the fork is skipped, or its child killed as soon as the zygote names it.
            self.end(-signal.SIGKILL)
            return
        if self._is_running():
            # The instance leads its own process group: this also ends the processes the cell started.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pid, signal.SIGKILL)
        self._signal(signal.SIGKILL)

    def last_log_line(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                tail = log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def forked(self, pid: int) -> None:
        """The zygote forked this instance as `pid` (called before any EXITED frame for it is read)."""
        self._pid = pid
        with contextlib.suppress(OSError):  # Already reaped: its EXITED frame follows.
            self._pidfd = os.pidfd_open(pid)
        if self.returncode is not None:  # Killed while the fork was in flight.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            self._close_pidfd()

    def end(self, code: int) -> None:
        """Record the exit code and remove what the instance left behind."""
        if self._exit.done():
            return
        self._exit.set_result(code)
        self._close_pidfd()
        Path(self.address).unlink(missing_ok=True)
        self.zygote.forget(self)

    async def end_orphan(self) -> None:
        """The zygote died: kill the instance, wait until it is gone, and report it as killed."""
        self.kill()
        if self._pidfd is not None:
            loop = asyncio.get_running_loop()
            gone: asyncio.Future[None] = loop.create_future()

            def on_exit() -> None:
                if not gone.done():
                    gone.set_result(None)

            loop.add_reader(self._pidfd, on_exit)
            try:
                await asyncio.wait_for(gone, ZYGOTE_STOP_GRACE)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(self._pidfd)
        self.end(-signal.SIGKILL)

    async def _give_up(self, timeout: float) -> None:
        self.kill()
        await self.wait()
        raise InstanceFailed(self._failure(f"did not answer a PING within {timeout:g} s, so it was killed"))

    def _is_running(self) -> bool:
        # A pidfd turns readable when its process exits, before the pid can be reused.
        return self._pidfd is not None and not select.select([self._pidfd], [], [], 0)[0]

    def _signal(self, signum: int) -> None:
        if self.returncode is None and self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def _ping(self, timeout: float) -> bool:
        try:
            reader, writer = await asyncio.open_unix_connection(self.address)
        except OSError:
            return False
        try:
            writer.write(encode(PING))
            kind, _ = await asyncio.wait_for(read_frame(reader), timeout)
            return kind == PONG
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _failure(self, what: str) -> str:
        line = self.last_log_line()
        said = f"; its last log line: {line}" if line else "; it logged nothing"
        return f"Instance {self.instance_id!r} of node {self.node_id!r} {what}{said} (log: {self.log_path})."


class LocalZygote:
    """The backend's side of one zygote process: its control connection and the instances it forked."""

    def __init__(
        self, node_id: str, digest: str, process: asyncio.subprocess.Process, spec_path: Path, control: socket.socket
    ) -> None:
        self.node_id = node_id
        self.digest = digest
        self.process = process
        self.spec_path = spec_path
        self.is_current = True
        self.is_ready = False
        self.is_gone = False
        self.handles: set[LocalInstanceHandle] = set()
        self._by_pid: dict[int, LocalInstanceHandle] = {}
        self._control = control
        self._writer: asyncio.StreamWriter | None = None
        # Resolves to None on READY, or to the exit code of a zygote that ended first.
        self._ready: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._lock = asyncio.Lock()
        self._forking: tuple[LocalInstanceHandle, asyncio.Future[dict[str, Any]]] | None = None
        self._task = asyncio.create_task(self._run(), name=f"zygote-{node_id}")
        self._stopping: asyncio.Task[None] | None = None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def fork(self, handle: LocalInstanceHandle) -> None:
        """Fork `handle`'s instance, then end the handle if that failed or the zygote could not load."""
        self.handles.add(handle)
        async with self._lock:
            code = await asyncio.shield(self._ready)
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
        self.handles.discard(handle)
        if handle.pid is not None:
            self._by_pid.pop(handle.pid, None)
        if not self.is_current:
            self.retire()

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
        """End the zygote at once; its instances are then killed too."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def _stop(self, grace: float) -> None:
        await asyncio.gather(*(handle.stop(grace) for handle in list(self.handles)))
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
                        handle.forked(message["pid"])
                    answer.set_result(message)
        except (ConnectionError, OSError, ValueError, KeyError, TypeError):
            pass  # The end of the stream, or a zygote that broke the protocol: either way it is done.
        finally:
            self.is_gone, self.is_current = True, False
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
        for handle in list(self.handles):
            if handle.pid is not None:
                handle.end(-signal.SIGKILL)


class LocalBackend(Backend):
    """Runs instances as forks of one zygote process per node.

    Parameters:
        python: the interpreter that runs zygotes; defaults to the server's own.
    """

    name = "local"

    def __init__(self, *, python: str = sys.executable) -> None:
        self.python = python
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="cn-"))
        self.zygotes: list[LocalZygote] = []
        self._current: dict[str, LocalZygote] = {}
        self._counter = itertools.count(1)
        self._lock = asyncio.Lock()

    async def start(self, spec: InstanceSpec) -> LocalInstanceHandle:
        self.zygotes = [zygote for zygote in self.zygotes if zygote.returncode is None]
        digest = launch_digest(spec, self.python)
        async with self._lock:  # Two starts at once must not both start a zygote.
            zygote = self._current.get(spec.node_id)
            if zygote is None or zygote.digest != digest or not zygote.is_current:
                if zygote is not None:
                    zygote.retire()
                zygote = await self._start_zygote(spec, digest)
                self._current[spec.node_id] = zygote
                self.zygotes.append(zygote)
        return LocalInstanceHandle(spec, str(self.runtime_dir / f"{next(self._counter)}.sock"), zygote)

    async def release(self, node_id: str) -> None:
        """Stop the node's instances that still run, then its zygotes."""
        self._current.pop(node_id, None)
        await asyncio.gather(*(zygote.stop() for zygote in self.zygotes if zygote.node_id == node_id))

    async def close(self) -> None:
        zygotes, self.zygotes = self.zygotes, []
        self._current.clear()
        await asyncio.gather(*(zygote.stop() for zygote in zygotes))
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    async def _start_zygote(self, spec: InstanceSpec, digest: str) -> LocalZygote:
        spec_path = self.runtime_dir / f"z{next(self._counter)}.json"
        ours, theirs = socket.socketpair()
        launch = {key: value for key, value in spec.launch.items() if key != "instance_id"}
        launch.update(node_id=spec.node_id, control_fd=theirs.fileno())
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w", encoding="utf-8") as file:
            json.dump(launch, file)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(spec.log_path, "ab") as log:
                process = await asyncio.create_subprocess_exec(
                    *(self.python, "-u", "-m", "cellnode.runtime", "--zygote", str(spec_path)),
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
            raise InstanceFailed(
                f"Instance {spec.instance_id!r} of node {spec.node_id!r} could not be started with "
                f"{self.python!r}: {exc}. Check that the interpreter exists and is executable."
            ) from exc
        finally:
            theirs.close()
        return LocalZygote(spec.node_id, digest, process, spec_path, ours)


def launch_digest(spec: InstanceSpec, python: str) -> str:
    """What makes a zygote reusable for `spec`: the launch spec but its instance ID, the environment, the log file."""
    launch = {key: value for key, value in spec.launch.items() if key != "instance_id"}
    key = {"launch": launch, "env": spec.env, "log": str(spec.log_path), "python": python}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def instance_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a zygote and its instances: a few variables of the server's, then `extra`."""
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env.update(extra)
    return env
