"""The tables: desired state written by the API, observed state written by the supervisor."""

from __future__ import annotations

import secrets
import string
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 20


def new_id() -> str:
    """A resource ID: 20 lowercase letters and digits, as the reference platform's IDs."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Folder(Base):
    __tablename__ = "folders"

    id: Mapped[str] = mapped_column(String(20), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Principal(Base):
    """A user or a service account; a service account lives in a folder."""

    __tablename__ = "principals"

    id: Mapped[str] = mapped_column(String(20), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))  # "serviceAccount" or "user"
    name: Mapped[str] = mapped_column(String(63))
    folder_id: Mapped[str | None] = mapped_column(ForeignKey("folders.id"))
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    # Holds `admin` on every folder, and alone manages folders and users.
    server_admin: Mapped[bool] = mapped_column(default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AccessBinding(Base):
    __tablename__ = "access_bindings"
    __table_args__ = (UniqueConstraint("folder_id", "role", "principal_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    folder_id: Mapped[str] = mapped_column(ForeignKey("folders.id"))
    role: Mapped[str] = mapped_column(String(32))
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"))
    created_at: Mapped[datetime | None] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A long-lived credential; only the sha256 of the secret is kept."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(20), primary_key=True, default=new_id)
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class IamToken(Base):
    """A 12-hour credential minted from an API key; only the sha256 is kept."""

    __tablename__ = "iam_tokens"

    id: Mapped[str] = mapped_column(String(20), primary_key=True, default=new_id)
    principal_id: Mapped[str] = mapped_column(ForeignKey("principals.id"))
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]


class Checkpoint(Base):
    """A saved interpreter state: per-variable blobs, the cell to deploy, the environment it ran in."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("folder_id", "name"),)

    id: Mapped[str] = mapped_column(String(20), primary_key=True, default=new_id)
    folder_id: Mapped[str] = mapped_column(ForeignKey("folders.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(63))  # set when pinned
    notebook_name: Mapped[str] = mapped_column(String(255))
    cell: Mapped[int] = mapped_column(Integer)
    cell_source: Mapped[str] = mapped_column(Text)
    variables: Mapped[list[Any]]  # [{"name", "type", "size", "sha256"}]
    imports: Mapped[dict[str, Any]]  # {"np": "numpy"}
    unserializable: Mapped[list[Any]]  # [{"name", "type", "reason"}]
    python_version: Mapped[str] = mapped_column(String(32))
    packages: Mapped[list[Any]]
    stdout: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    pinned_at: Mapped[datetime | None]


class Node(Base):
    """A deployed service. Desired state from the API; `status` and `status_message` from the supervisor."""

    __tablename__ = "nodes"
    __table_args__ = (UniqueConstraint("folder_id", "name"),)

    id: Mapped[str] = mapped_column(String(20), primary_key=True, default=new_id)
    folder_id: Mapped[str] = mapped_column(ForeignKey("folders.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    type: Mapped[str] = mapped_column(String(16), default="cell")  # "cell" or "docker"
    # A docker node's image, registry, endpoint, health check and telemetry (`cellnode.api.containers`); for a cell
    # node, the kernel image its instances run in (None: the server's own Python).
    container: Mapped[dict[str, Any] | None]
    checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"))
    inputs: Mapped[list[Any]]  # [{"name", "type"}], in declaration order
    outputs: Mapped[list[Any]]
    acl: Mapped[list[Any]]  # folder IDs allowed to call the node
    secrets: Mapped[list[Any]] = mapped_column(default=list)  # IDs of the secrets its instances get as variables
    timeout: Mapped[float] = mapped_column(Float)
    # The instances wanted now: the API sets it for a fixed count; the autoscaler moves it in [min, max].
    instance_count: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    min_instances: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    max_instances: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    zones: Mapped[list[Any]] = mapped_column(default=list)  # [{"zone", "subnet"}]; instances spread over them
    max_queue: Mapped[int] = mapped_column(Integer, default=64, server_default="64")
    suspended: Mapped[bool] = mapped_column(default=False, server_default="0")  # desired: no instances
    spec: Mapped[str] = mapped_column(String(32), default="c1.4", server_default="c1.4")
    # Bumped by a change that needs new instances (checkpoint, variables, spec); instances of an older one roll.
    generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    maintenance_limit: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    state: Mapped[str] = mapped_column(String(16), default="isolated", server_default="isolated")
    # Observed: why the roll to `generation` stopped (empty while none failed); the previous version keeps serving.
    rollout_error: Mapped[str] = mapped_column(Text, default="", server_default="")
    cell_code: Mapped[str] = mapped_column(Text)  # the deployed cell, IPython syntax transformed
    uses_ipython: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16), default="CREATED")
    status_message: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Instance(Base):
    """Observed state of one running copy of a node; written by the supervisor only.

    A node with N instances has slots 0..N-1; a replacement takes its predecessor's slot and restart count.
    """

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(20), primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    slot: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    status: Mapped[str] = mapped_column(String(16))
    status_since: Mapped[datetime] = mapped_column(default=utcnow)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    pid: Mapped[int | None] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255), default="")
    zone: Mapped[str] = mapped_column(String(63), default="", server_default="")


class Usage(Base):
    """One instance's uptime, for accounting: units = ceil(seconds) x the spec's units per second.

    `last_seen_at` moves forward while the server runs, so that an interval left open by a server that died ends
    where that server was last seen alive.
    """

    __tablename__ = "usage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(String(20), index=True)
    node_id: Mapped[str] = mapped_column(String(20), index=True)  # kept after the node is deleted
    folder_id: Mapped[str] = mapped_column(String(20), index=True)
    spec: Mapped[str] = mapped_column(String(32))
    units_per_second: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]


class Secret(Base):
    """A value kept encrypted (AES-GCM under the server's master key); the API never returns it after creation."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("folder_id", "name"),)

    id: Mapped[str] = mapped_column(String(20), primary_key=True, default=new_id)
    folder_id: Mapped[str] = mapped_column(ForeignKey("folders.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_by: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AuditEvent(Base):
    """One management action or denied request; rows are only ever added."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    principal_id: Mapped[str | None] = mapped_column(String(20))  # None: the credential was missing or bad
    subject: Mapped[str] = mapped_column(String(64), default="")  # serviceAccount:ID, user:ID, or ""
    action: Mapped[str] = mapped_column(String(64))  # e.g. "nodes.create"
    resource: Mapped[str] = mapped_column(String(255), default="")  # e.g. "node/ID"
    folder_id: Mapped[str | None] = mapped_column(String(20), index=True)
    result: Mapped[str] = mapped_column(String(16))  # "ok", "denied" or "failed"
    code: Mapped[int] = mapped_column(Integer)  # the HTTP status answered
    client: Mapped[str] = mapped_column(String(64), default="")
    request_id: Mapped[str] = mapped_column(String(32), default="")


class Alias(Base):
    """A stable routing name, `<prefix>.<name>`, that spreads requests over nodes by percentage.

    `version` grows with every change, so that a server holding an older routing table knows to replace it, and a
    rollback written by one server never overwrites an update made meanwhile.
    """

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("prefix", "name"),)

    id: Mapped[str] = mapped_column(String(20), primary_key=True, default=new_id)
    folder_id: Mapped[str] = mapped_column(ForeignKey("folders.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    nodes: Mapped[list[Any]]  # [{"node_id", "percent"}], percentages summing to 100
    mirrors: Mapped[list[Any]] = mapped_column(default=list)  # [{"node_id", "percent"}]: shadow copies
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    public: Mapped[bool] = mapped_column(default=False)
    acl: Mapped[list[Any]] = mapped_column(default=list)  # folder IDs that may call a private alias
    rollback_error_rate: Mapped[float | None] = mapped_column(Float)
    rollback_window: Mapped[float | None] = mapped_column(Float)
    rollback_min_requests: Mapped[int] = mapped_column(Integer, default=10)
    # Observed: the automatic rollbacks, newest last: [{"at", "node_id", "error_rate", "requests", "window",
    # "before", "after"}].
    events: Mapped[list[Any]] = mapped_column(default=list)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_by: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    # Every UPDATE checks and bumps `version`: a change made meanwhile raises StaleDataError instead of being lost.
    __mapper_args__ = {"version_id_col": version}
