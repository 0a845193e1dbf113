"""Start real instances through the local backend, and look at processes, for backend and router tests."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cellnode.backends.base import InstanceSpec
from cellnode.backends.local import LocalBackend, LocalInstanceHandle


async def start_ready(
    backend: LocalBackend,
    tmp_path: Path,
    launch: dict[str, Any],
    *,
    instance_id: str = "i1",
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> LocalInstanceHandle:
    """Start an instance of `launch` and wait until it answers PING."""
    spec = InstanceSpec(launch["node_id"], instance_id, launch, log_path=log_dir(tmp_path), env=env or {})
    handle = await backend.start(spec)
    await handle.wait_ready(timeout)
    return handle


def log_dir(tmp_path: Path) -> Path:
    """The node's log directory that `start_ready` gives the backend."""
    return tmp_path / "logs" / "n1"


def read_logs(directory: Path) -> str:
    """Every log file of a node's directory, rotated ones included, one after the other."""
    return "".join(path.read_text() for path in sorted(directory.iterdir()))


def parent_of(pid: int) -> int:
    """The parent pid of a running process."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def is_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, ended but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(*pids: int, timeout: float = 5.0) -> None:
    """Wait until none of `pids` runs."""
    deadline = time.monotonic() + timeout
    while any(is_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"Processes {[p for p in pids if is_alive(p)]} are still running."
        time.sleep(0.02)


def socket_inodes(pid: int) -> set[str]:
    """The sockets a process holds, as `socket:[inode]` links."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found
