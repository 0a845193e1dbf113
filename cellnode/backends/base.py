"""The backend seam: start, observe and stop the instances of a node.

A backend turns an `InstanceSpec` into a running instance and hands back an `InstanceHandle`, through which the
supervisor waits for it to be ready, watches it end and stops it, and the front interrupts a cell that ran past its
timeout. The front talks to the instance itself over the Unix socket at `handle.address`
(see `cellnode.runtime.protocol`).

    backend = LocalBackend()
    handle = await backend.start(InstanceSpec("n1", "i1", launch, log_path=Path("logs/n1")))
    await handle.wait_ready(timeout=60.0)
    ...
    await backend.close()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from cellnode.exceptions import CellnodeError


@dataclass(frozen=True)
class InstanceSpec:
    """What a backend needs to start one instance.

    `launch` is the launch spec of `cellnode.runtime` without `"socket"` and `"log_dir"`, which the backend fills in.
    `log_path` is the node's log directory, where each of its processes writes a log file of its own (the local
    backend creates it, mode 0700). `env` is added to the minimal environment the instance gets (secrets, for
    example); the server's own environment is not passed. `zone` is one of the backend's `zones`, and `subnet` the
    node's subnet there (empty: the zone's default).
    """

    node_id: str
    instance_id: str
    launch: dict[str, Any] = field(repr=False)  # a container's may hold registry credentials: never printed
    log_path: Path
    env: dict[str, str] = field(default_factory=dict, repr=False)  # may hold secret values: never printed
    zone: str = "local"
    subnet: str = ""


class InstanceFailed(CellnodeError):
    """An instance could not start; the message gives its exit code and the last line it logged. `permanent` when no
    retry can help (an image that does not exist, credentials a registry refuses): the node then fails at once
    instead of retrying."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class InstanceHandle(ABC):
    """A running (or ended) instance, as its backend sees it."""

    def __init__(self, *, instance_id: str, node_id: str, address: str) -> None:
        self.instance_id = instance_id
        self.node_id = node_id
        self.address = address

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """The process id, where the instance is a process this machine can see."""
        raise NotImplementedError("The 'pid' property must be implemented.")

    @property
    @abstractmethod
    def returncode(self) -> int | None:
        """The exit code once the instance has ended (negative: killed by that signal); None while it runs."""
        raise NotImplementedError("The 'returncode' property must be implemented.")

    @property
    def load_seconds(self) -> float | None:
        """Seconds the checkpoint took to load for this instance's sake: set once it is ready, for the instance that
        loaded it (a lone instance, or the first fork of a new zygote); None for one that found it loaded."""
        return None

    async def wait_started(self, timeout: float) -> None:
        """Return once the instance's process exists (`pid` is set, where there is one); it may still be loading.

        Backends whose `start()` returns only once the process exists need not override it.
        """
        return None

    @abstractmethod
    async def wait_ready(self, timeout: float) -> None:
        """Return once the instance answers PING; InstanceFailed if it exits first or does not answer in time."""
        raise NotImplementedError("The 'wait_ready' method must be implemented.")

    @abstractmethod
    async def wait(self) -> int:
        """Wait for the instance to end; its exit code."""
        raise NotImplementedError("The 'wait' method must be implemented.")

    @abstractmethod
    def interrupt(self) -> None:
        """Interrupt the running cell (SIGINT); an idle instance ignores it."""
        raise NotImplementedError("The 'interrupt' method must be implemented.")

    @abstractmethod
    async def stop(self, grace: float = 5.0) -> None:
        """Ask the instance to finish its request and exit (SIGTERM); kill it after `grace` seconds."""
        raise NotImplementedError("The 'stop' method must be implemented.")

    @abstractmethod
    def kill(self) -> None:
        """End the instance at once (SIGKILL)."""
        raise NotImplementedError("The 'kill' method must be implemented.")

    @abstractmethod
    def last_log_line(self) -> str:
        """The text of the last line the instance (or, failing that, what started it) logged, or an empty string."""
        raise NotImplementedError("The 'last_log_line' method must be implemented.")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.instance_id!r} of node {self.node_id!r} pid={self.pid}>"


class Backend(ABC):
    """Starts instances; `close()` stops every instance it started."""

    name: ClassVar[str]
    # Where instances may run. Nodes spread their instances over the zones they list; a backend with one machine
    # has one zone.
    zones: ClassVar[tuple[str, ...]] = ("local",)

    @abstractmethod
    async def start(self, spec: InstanceSpec) -> InstanceHandle:
        """Start an instance and return its handle at once; wait for it with `handle.wait_ready()`."""
        raise NotImplementedError("The 'start' method must be implemented.")

    async def release(self, node_id: str) -> None:
        """Free what the backend keeps for a node between its instances (the local backend's zygote).

        Call it once the node is deleted; instances of the node that still run are stopped first. A later `start()`
        for the node sets things up again.
        """
        return None  # Backends that keep nothing per node have nothing to free.

    @abstractmethod
    async def close(self) -> None:
        """Stop every instance this backend started and release what it holds."""
        raise NotImplementedError("The 'close' method must be implemented.")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
