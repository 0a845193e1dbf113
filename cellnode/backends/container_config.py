"""What a container instance runs: `InstanceSpec.launch["container"]`, checked into a `ContainerConfig` by
`ContainerConfig.parse()` (only `image` and `port` are required):

    {
        "image": "127.0.0.1:5000/team/model:1",          # pulled when the engine does not have it
        "registry_auth": {"username": "json_key", "password": "..."},  # or None; the password is never logged
        "endpoint": "http",                               # "http", "http2" or "grpc"
        "port": 8080,                                     # the port the node's form declares
        "healthcheck": {"kind": "http", "port": 8080, "path": "/health-check", "timeout": 1, "interval": 15,
                        "fails_threshold": 3, "passes_threshold": 3},   # or None (see `health.HealthCheck`)
        "telemetry": {"path": "/metrics", "port": 8080},  # or None
        "memory_bytes": 536870912,                        # or None: the memory limit, swap included
        "cpus": 1.5,                                      # or None
        "disk_bytes": 10737418240,                        # or None: the size limit of its writable layer
        "mounts": [{"source": "/srv/code", "target": "/app"}],   # bind mounts, always read-only
        "command": ["python3", "-m", "uvicorn", "app:app"],      # or None: the image's own
        "entrypoint": None,                               # or a list of strings, replacing the image's own
        "working_dir": "/app",                            # or None: the image's own
        "assign_ports": True,                             # False: the image listens on the declared ports
    }

A `RunDir` replaces the port of a container that runs a runtime instance (see `cellnode.backends.container`,
`start_container()`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cellnode.backends.health import HealthCheck

ENDPOINTS = ("http", "http2", "grpc")


@dataclass(frozen=True)
class ContainerConfig:
    """`launch["container"]`, checked (see the module docstring); `parse()` raises ValueError naming the key."""

    image: str
    port: int | None = None  # None only for a container started with a RunDir: it listens on no port
    endpoint: str = "http"
    registry_auth: dict[str, str] | None = field(default=None, repr=False)  # holds the password: never printed
    healthcheck: HealthCheck | None = None
    telemetry: dict[str, Any] | None = None
    memory_bytes: int | None = None
    cpus: float | None = None
    disk_bytes: int | None = None
    mounts: list[dict[str, str]] = field(default_factory=list)
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    working_dir: str | None = None
    assign_ports: bool = True

    @classmethod
    def parse(cls, value: object) -> ContainerConfig:
        if not isinstance(value, dict):
            raise ValueError(f"The launch spec's 'container' is {type(value).__name__}; it must be a dict.")
        unknown = sorted(set(value) - set(CONFIG_CHECKS))
        if unknown:
            raise ValueError(f"The container launch spec has unknown keys {unknown}; known: {sorted(CONFIG_CHECKS)}.")
        for key in ("image", "port"):
            if key not in value:
                raise ValueError(f"The container launch spec has no {key!r}; it is required.")
        for key, given in value.items():
            is_valid, expected = CONFIG_CHECKS[key]
            if not is_valid(given):
                shown = "<hidden>" if key == "registry_auth" else repr(given)
                raise ValueError(f"The container launch spec has {key} {shown}; it must be {expected}.")
        fields = {key: given for key, given in value.items() if given is not None or key == "registry_auth"}
        if value.get("healthcheck") is not None:
            try:
                fields["healthcheck"] = HealthCheck(**{"port": value["port"], **value["healthcheck"]})
            except TypeError as exc:
                raise ValueError(f"The container launch spec's healthcheck is not valid: {exc}.") from exc
        if value.get("telemetry") is not None:
            fields["telemetry"] = {"path": "/metrics", "port": value["port"], **value["telemetry"]}
        return cls(**fields)


def _is_port(value: object) -> bool:
    return type(value) is int and 1 <= value <= 65535


def _is_strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_mount(value: object) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"source", "target"}
        and all(isinstance(path, str) and path.startswith("/") for path in value.values())
    )


# Each key of `launch["container"]`: a test of its value, and what the value must be.
CONFIG_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "image": (lambda v: isinstance(v, str) and v != "", "a non-empty image reference"),
    "port": (_is_port, "an integer in 1..65535"),
    "endpoint": (lambda v: v in ENDPOINTS, "'http', 'http2' or 'grpc'"),
    "registry_auth": (
        lambda v: v is None
        or (isinstance(v, dict) and set(v) == {"username", "password"} and _is_strings([*v.values()])),
        'None or {"username": str, "password": str}',
    ),
    "healthcheck": (lambda v: v is None or isinstance(v, dict), "None or a dict of HealthCheck fields"),
    "telemetry": (
        lambda v: v is None
        or (
            isinstance(v, dict)
            and set(v) <= {"path", "port"}
            and _is_port(v.get("port", 1))
            and str(v.get("path", "/")).startswith("/")
        ),
        'None or {"path": str, "port": int}',
    ),
    "memory_bytes": (lambda v: v is None or (type(v) is int and v > 0), "None or a number of bytes > 0"),
    "cpus": (lambda v: v is None or (type(v) in (int, float) and v > 0), "None or a number > 0"),
    "disk_bytes": (lambda v: v is None or (type(v) is int and v > 0), "None or a number of bytes > 0"),
    "mounts": (
        lambda v: v is None or (isinstance(v, list) and all(map(_is_mount, v))),
        'a list of {"source": ..., "target": ...} absolute paths',
    ),
    "command": (lambda v: v is None or _is_strings(v), "None or a list of strings"),
    "entrypoint": (lambda v: v is None or _is_strings(v), "None or a list of strings"),
    "working_dir": (lambda v: v is None or isinstance(v, str), "None or an absolute path"),
    "assign_ports": (lambda v: isinstance(v, bool), "true or false"),
}


@dataclass(frozen=True)
class RunDir:
    """The one writable mount of a runtime container: the private host directory `source`, at `target` in it.

    The runtime instance binds its Unix socket at `socket` (the host path, which becomes the handle's `address`) and
    writes its log records into the FIFO `records` (a host path), which the container's log copies.
    """

    source: str
    target: str
    socket: str
    records: str
