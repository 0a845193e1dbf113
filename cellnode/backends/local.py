"""The local backend: each instance is a child process of the server, `python -u -m cellnode.runtime SPEC`.

Launch specs and sockets live in a private runtime directory (`tempfile.mkdtemp`, mode 0700) with short names,
because a Unix socket path holds at most 107 bytes. An instance writes stdout and stderr to its node's log file.
It gets a minimal environment plus `InstanceSpec.env`, never the server's `CELLNODE_*` settings, and runs in a
session of its own, so that a Ctrl-C on the server does not reach it and `kill()` ends the processes it spawned.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from cellnode.backends.base import Backend, InstanceFailed, InstanceHandle, InstanceSpec
from cellnode.runtime.protocol import PING, PONG, encode, read_frame

# COVERAGE_PROCESS_START lets coverage follow into instances; it carries no secret.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "COVERAGE_PROCESS_START")
LOG_TAIL_BYTES = 4096


class LocalInstanceHandle(InstanceHandle):
    """A child process running `cellnode.runtime`."""

    def __init__(self, spec: InstanceSpec, process: asyncio.subprocess.Process, address: str, spec_path: Path) -> None:
        super().__init__(instance_id=spec.instance_id, node_id=spec.node_id, address=address)
        self.log_path = spec.log_path
        self._process = process
        self._spec_path = spec_path

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.005
        while True:
            if self.returncode is not None:
                raise InstanceFailed(self._failure(f"exited with code {self.returncode} before it was ready"))
            if await self._ping(max(0.0, deadline - loop.time())):
                return
            if loop.time() >= deadline:
                self.kill()
                await self.wait()
                raise InstanceFailed(self._failure(f"did not answer a PING within {timeout:g} s, so it was killed"))
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.1)

    async def wait(self) -> int:
        code = await self._process.wait()
        self.remove_files()
        return code

    def remove_files(self) -> None:
        """Remove the socket and the launch spec of an ended instance."""
        for path in (Path(self.address), self._spec_path):
            path.unlink(missing_ok=True)

    def interrupt(self) -> None:
        self._signal(signal.SIGINT)

    async def stop(self, grace: float = 5.0) -> None:
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), grace)
        except TimeoutError:
            self.kill()
            await self.wait()

    def kill(self) -> None:
        if self.returncode is None:
            # The instance leads its own process group: this also ends the processes the cell started.
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
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

    def _signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signum)

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


class LocalBackend(Backend):
    """Runs instances as child processes of this one.

    Parameters:
        python: the interpreter that runs instances; defaults to the server's own.
    """

    name = "local"

    def __init__(self, *, python: str = sys.executable) -> None:
        self.python = python
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="cn-"))
        self._handles: list[LocalInstanceHandle] = []
        self._counter = itertools.count(1)

    async def start(self, spec: InstanceSpec) -> LocalInstanceHandle:
        self._forget_ended()
        number = next(self._counter)
        address = str(self.runtime_dir / f"{number}.sock")
        spec_path = self.runtime_dir / f"{number}.json"
        launch = {**spec.launch, "node_id": spec.node_id, "instance_id": spec.instance_id, "socket": address}
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w", encoding="utf-8") as file:
            json.dump(launch, file)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as log:
            try:
                process = await asyncio.create_subprocess_exec(
                    self.python,
                    "-u",
                    "-m",
                    "cellnode.runtime",
                    str(spec_path),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=instance_env(spec.env),
                    start_new_session=True,
                )
            except OSError as exc:
                spec_path.unlink(missing_ok=True)
                raise InstanceFailed(
                    f"Instance {spec.instance_id!r} of node {spec.node_id!r} could not be started with "
                    f"{self.python!r}: {exc}. Check that the interpreter exists and is executable."
                ) from exc
        handle = LocalInstanceHandle(spec, process, address, spec_path)
        self._handles.append(handle)
        return handle

    async def close(self) -> None:
        handles, self._handles = self._handles, []
        await asyncio.gather(*(handle.stop() for handle in handles))
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _forget_ended(self) -> None:
        for handle in self._handles:
            if handle.returncode is not None:
                handle.remove_files()
        self._handles = [handle for handle in self._handles if handle.returncode is None]


def instance_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of an instance: a few variables of the server's, then `extra`."""
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env.update(extra)
    return env
