"""The local backend: a zygote process per node, and instances forked from it (see `cellnode.backends.zygote`).

The first `start()` of a node starts its zygote, which loads the checkpoint once. The zygote is keyed by the node and
a digest of its launch spec (without the instance ID), environment and log directory, so a changed checkpoint or cell
gets a new zygote. Each `start()` asks the node's zygote for a fork; the zygote reports each instance's exit, which is
what `handle.wait()` returns. The handle signals the instance itself, through a pidfd, so a pid reused after the
instance ended is never signalled. If a zygote dies, the next `start()` of the node starts a new one.

A node whose zygote is not safe to fork (its load started threads or initialised CUDA), and one whose launch spec
says `"fork": false`, gets standalone instances instead: each a child of the server that loads the checkpoint itself.
Their handles behave the same; only `pid`'s parent and the start time differ.

`InstanceSpec.log_path` is the node's log directory (created mode 0700): each instance writes `<instance_id>.log`
there, and each zygote `zygote-<n>.log`. Specs and sockets live in a private runtime directory (`tempfile.mkdtemp`,
mode 0700) with short names, because a Unix socket path holds at most 107 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from cellnode.backends.base import Backend, InstanceFailed, InstanceHandle, InstanceSpec
from cellnode.backends.zygote import (
    ZYGOTE_STOP_GRACE,
    InstanceStarter,
    LocalZygote,
    instance_env as instance_env,  # Re-exported: scripts start instances by hand.
    launch_digest,
    start_zygote,
)
from cellnode.runtime.protocol import PING, PONG, encode, read_frame

LOG_TAIL_BYTES = 4096


class LocalInstanceHandle(InstanceHandle):
    """An instance: forked from a zygote, which reports its exit, or standalone, a child the backend waits for.

    `zygote` is what started it: the node's `LocalZygote`, or an `InstanceStarter` for a node that runs without one.
    """

    def __init__(self, spec: InstanceSpec, address: str, zygote: InstanceStarter) -> None:
        super().__init__(instance_id=spec.instance_id, node_id=spec.node_id, address=address)
        self.log_path = spec.log_path / f"{spec.instance_id}.log"
        self.zygote = zygote
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._error = ""
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._claims_load = zygote.claim_load()
        self._created = asyncio.get_running_loop().time()
        self._ready_after: float | None = None
        self._launch = asyncio.create_task(zygote.launch(self), name=f"launch-{spec.instance_id}")

    @property
    def load_seconds(self) -> float | None:
        if self._claims_load:
            return self.zygote.load_seconds
        if not self.zygote.is_forking:
            return self._ready_after  # a standalone instance loads for itself: from its start to its first PONG
        return None

    async def wait_started(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._launch), timeout)  # wait_ready reports a timeout

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
            if await ping(self.address, max(0.0, deadline - loop.time())):
                self._ready_after = loop.time() - self._created
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
            # Not started yet: the start is skipped, or its process killed as soon as its pid is known.
            self.end(-signal.SIGKILL)
            return
        if self._is_running():
            # The instance leads its own process group: this also ends the processes the cell started.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pid, signal.SIGKILL)
        self._signal(signal.SIGKILL)

    def last_log_line(self) -> str:
        """Why it could not be started, or the last record in its log file, or else in its zygote's (load errors)."""
        zygote_log = self.zygote.log_path
        return self._error or last_line(self.log_path) or (last_line(zygote_log) if zygote_log is not None else "")

    def started(self, pid: int) -> None:
        """The instance runs as `pid` (called before its exit can be reported: an EXITED frame, or the wait for it)."""
        self._pid = pid
        with contextlib.suppress(OSError):  # Already reaped: its exit is reported next.
            self._pidfd = os.pidfd_open(pid)
        if self.returncode is not None:  # Killed while the fork was in flight.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            self._close_pidfd()

    def end(self, code: int, error: str = "") -> None:
        """Record the exit code (and `error`, why it could not be started) and remove what the instance left behind."""
        if self._exit.done():
            return
        self._error = error
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

    def _failure(self, what: str) -> str:
        line = self.last_log_line()
        said = f"; its last log line: {line}" if line else "; it logged nothing"
        return f"Instance {self.instance_id!r} of node {self.node_id!r} {what}{said} (log: {self.log_path})."


class LocalBackend(Backend):
    """Runs instances as forks of one zygote process per node, or standalone where forking is not safe or is off.

    Parameters:
        python: the interpreter that runs zygotes and standalone instances; defaults to the server's own.
    """

    name = "local"

    def __init__(self, *, python: str = sys.executable) -> None:
        self.python = python
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="cn-"))
        self.zygotes: list[InstanceStarter] = []
        self._current: dict[str, InstanceStarter] = {}
        self._counter = itertools.count(1)
        self._zygote_numbers = itertools.count(1)
        self._lock = asyncio.Lock()

    async def start(self, spec: InstanceSpec) -> LocalInstanceHandle:
        is_forking = spec.launch.get("fork", True)
        if not isinstance(is_forking, bool):
            raise InstanceFailed(
                f"The launch spec of node {spec.node_id!r} has fork {is_forking!r}; it must be true or false."
            )
        self.zygotes = [zygote for zygote in self.zygotes if not zygote.is_done]
        digest = launch_digest(spec, self.python)
        async with self._lock:  # Two starts at once must not both start a zygote.
            zygote = self._current.get(spec.node_id)
            if zygote is None or zygote.digest != digest or not zygote.is_current:
                if zygote is not None:
                    zygote.retire()
                if is_forking:
                    zygote = await self._start_zygote(spec, digest)
                else:
                    zygote = InstanceStarter(spec, digest, python=self.python)
                self._current[spec.node_id] = zygote
                self.zygotes.append(zygote)
        return LocalInstanceHandle(spec, str(self.runtime_dir / f"{next(self._counter)}.sock"), zygote)

    async def release(self, node_id: str) -> None:
        """Stop the node's instances that still run (forked or standalone), then its zygotes."""
        self._current.pop(node_id, None)
        await asyncio.gather(*(zygote.stop() for zygote in self.zygotes if zygote.node_id == node_id))

    async def close(self) -> None:
        zygotes, self.zygotes = self.zygotes, []
        self._current.clear()
        await asyncio.gather(*(zygote.stop() for zygote in zygotes))
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    async def _start_zygote(self, spec: InstanceSpec, digest: str) -> LocalZygote:
        number = next(self._zygote_numbers)
        spec_path = self.runtime_dir / f"z{number}.json"
        return await start_zygote(spec, digest, python=self.python, spec_path=spec_path, name=f"zygote-{number}")


def last_line(path: Path) -> str:
    """The text of the last non-empty line of a log file (a line not in the record format, whole); empty if none."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            tail = log.read().decode("utf-8", "replace")
    except OSError:
        return ""
    for line in reversed(tail.splitlines()):
        fields = line.split(" ", 4)
        # TIMESTAMP INSTANCE_ID REQUEST_ID STREAM TEXT
        text = fields[4] if len(fields) == 5 and fields[0].endswith("Z") and fields[3] in ("out", "err") else line
        if text.strip():
            return text.strip()
    return ""


async def ping(address: str, timeout: float) -> bool:
    """Whether the runtime at the Unix socket `address` answers PING within `timeout` (an instance of the local or
    the kernel image backend)."""
    try:
        reader, writer = await asyncio.open_unix_connection(address)
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
