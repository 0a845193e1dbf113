"""Container settings of nodes: a docker node's image, registry, endpoint, health check and telemetry, and a cell
node's kernel image. The request bodies, their checks, and the form kept in `Node.container`.

Stored (`Node.container`), for a docker node:

    {"image": "127.0.0.1:5000/team/model:1", "registry_username": "json_key", "registry_password_secret": SECRET_ID,
     "endpoint": "http", "port": 9875, "idle_timeout": 300.0, "memory_bytes": None, "disk_bytes": None,
     "command": None, "fixed_ports": False,
     "telemetry": {"type": "prometheus", "path": "/metrics", "port": 9875} | None,
     "healthcheck": {"type": "http", "port": 9875, "path": "/health-check", "timeout": 1.0, "interval": 15.0,
                     "fails_threshold": 3, "passes_threshold": 3} | None}

and for a cell node with a kernel image, `{"image", "registry_username", "registry_password_secret"}`. The password
secret is kept by ID and read (decrypted) only when an instance's image is pulled.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from cellnode.exceptions import InvalidArgument, NotFound
from cellnode.store.models import Node, Secret

# Docker's reference grammar, simplified: [host[:port]/]path[:tag][@digest], path components in lowercase.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])"
IMAGE_REFERENCE = re.compile(
    rf"^(?:{_HOST}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?(?:@sha256:[0-9a-f]{{64}})?$"
)
DEFAULT_REGISTRY_USER = "json_key"  # the reference's user for its own registry
MIN_MEMORY = 6 * 2**20  # the engine refuses a smaller limit
MAX_DISK = 4096 * 2**30  # the reference's additional disk: 10-4096 GB
ENDPOINT_TIMEOUT = 15.0  # the reference's default endpoint timeout
CELL_TIMEOUT = 60.0
Port = Field(ge=1, le=65535)


def _image(value: str) -> str:
    if not IMAGE_REFERENCE.match(value) or len(value) > 512:
        raise ValueError(
            f"image {value!r} is not an image reference; write it as [REGISTRY[:PORT]/]PATH[:TAG], with the path in "
            "lowercase (for example '127.0.0.1:5000/team/model:1' or 'cellnode/example:1')"
        )
    return value


class _Image(BaseModel):
    image: str = Field(description="Image reference: [REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST].")
    registry_username: str | None = Field(
        None, min_length=1, max_length=255, description="Registry user; 'json_key' when only the secret is given."
    )
    registry_password_secret: str | None = Field(
        None, min_length=1, max_length=63, description="Secret of the node's folder (name or ID) holding the password."
    )

    _check_image = field_validator("image")(_image)

    @model_validator(mode="after")
    def _credentials(self) -> _Image:
        if self.registry_username is not None and self.registry_password_secret is None:
            raise ValueError(
                f"registry_username {self.registry_username!r} is given without registry_password_secret; give the "
                "secret that holds the registry password too (--registry-password-secret NAME)"
            )
        return self


class KernelImageDecl(_Image):
    """The image a cell node's instances run in: Python >= 3.10 and the packages its cell uses; nothing of cellnode."""


class HealthcheckDecl(BaseModel):
    """A load-balancer health check: in rotation after `passes_threshold` passes in a row, out of it after
    `fails_threshold` failures in a row, probed every `interval` seconds, each probe within `timeout`."""

    type: Literal["http", "grpc"] = Field(description="'http' (a 2xx answer passes) or 'grpc' (grpc.health.v1).")
    port: int | None = Field(None, ge=1, le=65535, description="Container port; default the endpoint's.")
    path: str | None = Field(
        None, max_length=1024, description="HTTP: the path probed (default '/'). gRPC: the service checked ('')."
    )
    timeout: float = Field(1.0, gt=0, le=60, description="Seconds a probe may take (1).")
    interval: float = Field(15.0, gt=0, le=3600, description="Seconds between probes (15).")
    fails_threshold: int = Field(3, ge=1, le=100, description="Failures in a row that take an instance out (3).")
    passes_threshold: int = Field(3, ge=1, le=100, description="Passes in a row that put it in rotation (3).")

    @model_validator(mode="after")
    def _path(self) -> HealthcheckDecl:
        if self.type == "http" and self.path is not None and not self.path.startswith("/"):
            raise ValueError(
                f"healthcheck path {self.path!r} is not an HTTP path; give one starting with '/' (for example "
                "'/health-check')"
            )
        if self.timeout > self.interval:
            raise ValueError(
                f"healthcheck timeout ({self.timeout:g} s) is longer than its interval ({self.interval:g} s); make "
                "the timeout at most the interval"
            )
        return self


class TelemetryDecl(BaseModel):
    """Where an instance serves its own metrics, in Prometheus text; cellnode scrapes them onto its `/metrics`."""

    type: Literal["prometheus"] = Field("prometheus", description="Only 'prometheus' (text format) is supported.")
    path: str = Field("/metrics", max_length=1024, description="HTTP path of the metrics page ('/metrics').")
    port: int | None = Field(None, ge=1, le=65535, description="Container port; default the endpoint's.")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"telemetry path {value!r} is not an HTTP path; give one starting with '/'")
        return value


class ContainerDecl(_Image):
    """A docker node's container: what to run, where it listens, how it is checked and measured."""

    endpoint: Literal["http", "http2", "grpc"] = Field(
        "http", description="'http' (HTTP/1.1), 'http2' (h2c) or 'grpc': what the service speaks on its port."
    )
    port: int = Field(ge=1, le=65535, description="The port the service listens on (see fixed_ports).")
    idle_timeout: float = Field(
        300.0, gt=0, le=86_400, description="Seconds an idle connection to an instance is kept open (300)."
    )
    memory_bytes: int | None = Field(
        None, ge=MIN_MEMORY, description="Memory limit of each container, swap included; default the spec's RAM."
    )
    disk_bytes: int | None = Field(
        None, ge=1, le=MAX_DISK, description="Writable layer size of each container (needs an engine that can)."
    )
    command: list[str] | None = Field(None, max_length=256, description="Command to run instead of the image's own.")
    fixed_ports: bool = Field(
        False,
        description="The image listens on the declared ports rather than $PORT: then one instance per machine.",
    )
    telemetry: TelemetryDecl | None = None
    healthcheck: HealthcheckDecl | None = None


class ContainerPatch(BaseModel):
    """A change to a docker node's container: the fields given replace the stored ones (null clears telemetry,
    healthcheck, memory, disk, command, registry credentials)."""

    image: str | None = None
    registry_username: str | None = Field(None, min_length=1, max_length=255)
    registry_password_secret: str | None = Field(None, min_length=1, max_length=63)
    endpoint: Literal["http", "http2", "grpc"] | None = None
    port: int | None = Field(None, ge=1, le=65535)
    idle_timeout: float | None = Field(None, gt=0, le=86_400)
    memory_bytes: int | None = Field(None, ge=MIN_MEMORY)
    disk_bytes: int | None = Field(None, ge=1, le=MAX_DISK)
    command: list[str] | None = Field(None, max_length=256)
    fixed_ports: bool | None = None
    telemetry: TelemetryDecl | None = None
    healthcheck: HealthcheckDecl | None = None

    _check_image = field_validator("image")(lambda value: value if value is None else _image(value))


def store_container(session: Session, decl: ContainerDecl, folder_id: str) -> dict[str, Any]:
    """The stored form of a docker node's container: defaults filled in, the password secret by ID."""
    stored = decl.model_dump()
    stored.update(_registry(session, decl.registry_username, decl.registry_password_secret, folder_id))
    if decl.healthcheck is not None:
        check = stored["healthcheck"]
        check["port"] = check["port"] or decl.port
        check["path"] = check["path"] if check["path"] is not None else ("/" if check["type"] == "http" else "")
    if decl.telemetry is not None:
        stored["telemetry"]["port"] = stored["telemetry"]["port"] or decl.port
    return stored


def store_kernel_image(session: Session, decl: KernelImageDecl, folder_id: str) -> dict[str, Any]:
    """The stored form of a cell node's kernel image."""
    return {"image": decl.image, **_registry(session, decl.registry_username, decl.registry_password_secret, folder_id)}


def patch_container(session: Session, node: Node, patch: ContainerPatch) -> dict[str, Any]:
    """The node's container with the patch applied and checked as a whole, stored form."""
    assert node.container is not None, "a docker node has a container"
    current = dict(node.container)  # its password secret by ID, which `_registry` takes as a request's would be
    given = patch.model_dump(include=patch.model_fields_set)
    if "registry_password_secret" in given and "registry_username" not in given and given["registry_password_secret"]:
        given.setdefault("registry_username", current.get("registry_username") or DEFAULT_REGISTRY_USER)
    if "port" in given:  # checks and telemetry that followed the endpoint's port keep following it
        for key in ("healthcheck", "telemetry"):
            if key not in given and current.get(key) and current[key]["port"] == current["port"]:
                current[key] = {**current[key], "port": None}
    merged = {**current, **given}
    try:
        decl = ContainerDecl.model_validate(merged)
    except ValueError as exc:
        raise InvalidArgument(f"The container settings would not be valid after this update: {exc}") from None
    return store_container(session, decl, node.folder_id)


def _registry(session: Session, username: str | None, secret_ref: str | None, folder_id: str) -> dict[str, Any]:
    if secret_ref is None:
        return {"registry_username": None, "registry_password_secret": None}
    secret = session.get(Secret, secret_ref)
    if secret is None or secret.folder_id != folder_id:
        secret = session.scalar(select(Secret).where(Secret.folder_id == folder_id, Secret.name == secret_ref))
    if secret is None:
        raise NotFound(
            f"registry_password_secret {secret_ref!r} is not a secret (by ID or name) of folder {folder_id!r}, the "
            f"node's. Create it with 'cellnode secret create NAME --value-file FILE', or list them with 'cellnode "
            f"secret list --folder {folder_id}'."
        )
    return {"registry_username": username or DEFAULT_REGISTRY_USER, "registry_password_secret": secret.id}


def check_registry_secret(session: Session, node: Node) -> None:
    """Refuse a node whose registry password secret is of another folder than its own (it moved without one)."""
    secret = session.get(Secret, registry_secret(node))
    if secret is not None and secret.folder_id != node.folder_id:
        raise InvalidArgument(
            f"Node {node.name!r} reads its registry password from secret {secret.name!r} of folder "
            f"{secret.folder_id!r}; in folder {node.folder_id!r} it can use only that folder's secrets. In the same "
            "update, give it a secret of that folder (--registry-password-secret NAME)."
        )


def container_out(session: Session, container: dict[str, Any] | None) -> dict[str, Any] | None:
    """A node's container settings as the API shows them: the password secret by name."""
    if container is None:
        return None
    out = dict(container)
    secret_id = out.get("registry_password_secret")
    if secret_id is not None:
        secret = session.get(Secret, secret_id)
        out["registry_password_secret"] = secret.name if secret is not None else secret_id
    return out


def registry_secret(node: Node) -> str | None:
    """The ID of the secret holding the node's registry password, if it has one."""
    return (node.container or {}).get("registry_password_secret")
