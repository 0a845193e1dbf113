"""Start real instances through the local backend, for backend and router tests."""

from __future__ import annotations

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
    spec = InstanceSpec(launch["node_id"], instance_id, launch, log_path=tmp_path / "logs" / "node.log", env=env or {})
    handle = await backend.start(spec)
    await handle.wait_ready(timeout)
    return handle
