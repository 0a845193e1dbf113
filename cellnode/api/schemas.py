"""Request and response bodies of the management API."""

from __future__ import annotations

import keyword
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, model_validator

from cellnode.api.containers import CELL_TIMEOUT, ENDPOINT_TIMEOUT, ContainerDecl, ContainerPatch, KernelImageDecl
from cellnode.runtime.variables import TYPES

NAME_PATTERN = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")


def _resource_name(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(
            f"name {value!r} is not allowed; use 1-63 lowercase letters, digits and hyphens, "
            "starting with a letter and not ending with a hyphen (for example 'randomizer-node')"
        )
    return value


def _identifier(value: str) -> str:
    if not value.isidentifier() or keyword.iskeyword(value):
        raise ValueError(f"variable name {value!r} is not a Python identifier; use letters, digits and underscores")
    return value


ResourceName = Annotated[str, AfterValidator(_resource_name)]
StatePolicy = Literal["isolated", "persistent", "fork"]
STATE_HELP = (
    "What a request may leave behind: 'isolated' (default; top-level bindings restored after each request), "
    "'persistent' (changes stay on the instance, as on the reference platform), 'fork' (each request runs in a "
    "child process: nothing leaks)."
)
Identifier = Annotated[str, AfterValidator(_identifier)]
NodeType = Literal["cell", "docker"]
# What only a cell node has: refused on a docker node.
CELL_ONLY = ("checkpoint", "inputs", "outputs", "state", "kernel_image")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class FolderOut(_Out):
    id: str
    name: str
    description: str
    created_at: datetime


class FolderList(BaseModel):
    folders: list[FolderOut]


class TokenOut(BaseModel):
    iam_token: str
    expires_at: datetime


class CheckpointCreate(BaseModel):
    notebook: str = Field(description="The notebook's content: .ipynb JSON, or a percent-format .py script.")
    notebook_name: str = Field(min_length=1, max_length=255, description="File name; its extension picks the format.")
    cell: int | None = Field(None, ge=1, description="Code cell to deploy, counting code cells from 1; default last.")
    name: ResourceName | None = Field(None, description="Pin the checkpoint under this name.")
    folder_id: str | None = None


class CheckpointOut(_Out):
    id: str
    folder_id: str
    name: str | None
    pinned: bool
    notebook_name: str
    cell: int
    cell_source: str
    variables: list[dict[str, Any]]
    imports: dict[str, str]
    unserializable: list[dict[str, Any]]
    python_version: str
    packages: list[str]
    stdout: str
    created_by: str
    created_at: datetime
    pinned_at: datetime | None
    evicted: list[str] = Field(default_factory=list, description="Unpinned checkpoints this one pushed out.")


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointOut]


class PinRequest(BaseModel):
    name: ResourceName


class VariableDecl(BaseModel):
    name: Identifier
    type: str = Field(description="One of int, float, str, bool, list, dict, any.")

    @model_validator(mode="after")
    def _known_type(self) -> VariableDecl:
        if self.type not in TYPES:
            raise ValueError(
                f"variable {self.name!r} has type {self.type!r}; use one of {', '.join(TYPES)} (any = any JSON value)"
            )
        return self


ZONE_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_INSTANCES = 64
MAX_NODE_SECRETS = 16  # each value is at most 64 KiB; an environment must stay well under ARG_MAX (2 MiB)
SECRETS_HELP = "Secrets of the node's folder (names or IDs) its instances get as environment variables, by name."


class ZoneDecl(BaseModel):
    """One zone the node's instances may run in, and optionally the subnet they use there."""

    zone: str = Field(description="A zone of the server's backend ('cellnode spec list' shows them; 'local' here).")
    subnet: str = Field("", max_length=255, description="Subnet in that zone; empty for the zone's default.")

    @model_validator(mode="after")
    def _zone_name(self) -> ZoneDecl:
        if not ZONE_PATTERN.match(self.zone):
            raise ValueError(f"zone {self.zone!r} is not a zone name; use lowercase letters, digits and hyphens")
        return self


def _distinct_zones(zones: list[ZoneDecl]) -> list[ZoneDecl]:
    names = [z.zone for z in zones]
    twice = sorted({z for z in names if names.count(z) > 1})
    if twice:
        raise ValueError(f"zone {twice[0]!r} is listed more than once; list each zone once")
    return zones


Zones = Annotated[list[ZoneDecl], AfterValidator(_distinct_zones)]


class _Scaling(BaseModel):
    """A fixed `instance_count`, or a range `min_instances`..`max_instances` the autoscaler moves in."""

    instance_count: int | None = Field(
        None, ge=1, le=MAX_INSTANCES, description="A fixed number of instances (min = max). Default 1."
    )
    min_instances: int | None = Field(None, ge=1, le=MAX_INSTANCES, description="Fewest instances when autoscaled.")
    max_instances: int | None = Field(None, ge=1, le=MAX_INSTANCES, description="Most instances when autoscaled.")

    @model_validator(mode="after")
    def _one_way(self) -> _Scaling:
        ranged = self.min_instances is not None or self.max_instances is not None
        if self.instance_count is not None and ranged:
            raise ValueError(
                f"instance_count ({self.instance_count}) fixes the number of instances, and min_instances/"
                "max_instances set a range for the autoscaler; give one or the other"
            )
        low, high = self.min_instances, self.max_instances
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"min_instances ({self.min_instances}) is greater than max_instances ({self.max_instances}); "
                "make min_instances at most max_instances"
            )
        return self

    def fields_set_scaling(self) -> bool:
        """Whether the request changes the instance count or range."""
        return bool({"instance_count", "min_instances", "max_instances"} & self.model_fields_set)


class NodeCreate(_Scaling):
    """A cell node (a pinned checkpoint, its input and output variables), or a docker node (`container`)."""

    name: ResourceName
    type: NodeType | None = Field(None, description="'cell' or 'docker'; default 'docker' when `container` is given.")
    checkpoint: str | None = Field(None, description="Cell nodes: ID or pinned name of the checkpoint behind it.")
    inputs: list[VariableDecl] = Field(default_factory=list, description="Cell nodes: the input variables.")
    outputs: list[VariableDecl] = Field(default_factory=list, description="Cell nodes: the output variables (1+).")
    description: str = Field("", max_length=1024)
    folder_id: str | None = None
    acl: list[str] | None = Field(None, description="Folder IDs allowed to call the node; default: its own folder.")
    timeout: float | None = Field(
        None, gt=0, le=3600, description="Seconds a request may run: 60 by default for a cell node, 15 for docker."
    )
    spec: str = Field("c1.4", description="Instance spec from the server's table ('cellnode spec list').")
    zones: Zones | None = Field(
        None, min_length=1, description="Zones to spread instances over, in turn; default: every zone of the backend."
    )
    maintenance_limit: int = Field(1, ge=1, le=MAX_INSTANCES, description="Instances replaced at once in a roll.")
    state: StatePolicy | None = Field(None, description=STATE_HELP)
    max_queue: int = Field(
        64, ge=0, le=100_000, description="Requests that may wait for a busy node; past that, 429. Defaults to 64."
    )
    secrets: list[str] | None = Field(None, max_length=MAX_NODE_SECRETS, description=SECRETS_HELP)
    container: ContainerDecl | None = Field(None, description="Docker nodes: the image and how it serves.")
    kernel_image: KernelImageDecl | None = Field(
        None, description="Cell nodes: run the instances in this image instead of the server's Python."
    )

    @model_validator(mode="after")
    def _kind(self) -> NodeCreate:
        kind = self.type or ("docker" if self.container is not None else "cell")
        if kind == "docker":
            if self.container is None:
                raise ValueError("a docker node needs 'container' with its image and port (--image REF --port P)")
            for key in CELL_ONLY:
                if key in self.model_fields_set and getattr(self, key) not in (None, []):
                    raise ValueError(
                        f"{key} is a cell node's setting; a docker node runs its image and passes requests through, "
                        f"so drop {key}"
                    )
        else:
            if self.container is not None:
                raise ValueError("'container' is a docker node's setting; give type 'docker', or drop it")
            if self.checkpoint is None:
                raise ValueError("a cell node needs 'checkpoint': the ID or pinned name of its checkpoint")
            if not self.outputs:
                raise ValueError("a cell node needs at least one output variable (--output NAME:TYPE)")
        self.type = kind
        if self.timeout is None:
            self.timeout = ENDPOINT_TIMEOUT if kind == "docker" else CELL_TIMEOUT
        if self.state is None and kind == "cell":
            self.state = "isolated"
        return self


class NodeUpdate(_Scaling):
    """Only the fields given change. A new checkpoint, variables, spec, state, zones or secrets roll the instances;
    the rest apply at once (a moved folder, instance counts, timeouts, ACL)."""

    name: ResourceName | None = None
    description: str | None = Field(None, max_length=1024)
    checkpoint: str | None = None
    inputs: list[VariableDecl] | None = None
    outputs: list[VariableDecl] | None = Field(None, min_length=1)
    acl: list[str] | None = None
    folder_id: str | None = Field(None, description="Move the node to this folder.")
    timeout: float | None = Field(None, gt=0, le=3600)
    max_queue: int | None = Field(None, ge=0, le=100_000)
    spec: str | None = None
    zones: Zones | None = Field(None, min_length=1)
    state: StatePolicy | None = Field(None, description=STATE_HELP)
    maintenance_limit: int | None = Field(
        None, ge=1, le=MAX_INSTANCES, description="Instances replaced at once in a roll."
    )
    secrets: list[str] | None = Field(
        None, max_length=MAX_NODE_SECRETS, description=SECRETS_HELP + " All of them; a changed list rolls."
    )
    roll: bool = Field(
        False, description="Roll the instances even if nothing else asks for it (to pick up changed secret values)."
    )
    container: ContainerPatch | None = Field(None, description="Docker nodes: the container fields to change; rolls.")
    kernel_image: KernelImageDecl | None = Field(
        None, description="Cell nodes: a new kernel image (null: the server's Python again); rolls."
    )


class InstanceOut(_Out):
    id: str
    slot: int
    generation: int
    status: str
    status_since: datetime
    restarts: int
    last_error: str
    pid: int | None
    host: str
    zone: str


class NodeOut(_Out):
    id: str
    folder_id: str
    name: str
    description: str
    type: str
    checkpoint_id: str | None
    container: dict[str, Any] | None = Field(None, description="A docker node's image, endpoint, checks, telemetry.")
    kernel_image: dict[str, Any] | None = Field(None, description="A cell node's kernel image, if it has one.")
    inputs: list[VariableDecl]
    outputs: list[VariableDecl]
    acl: list[str]
    timeout: float
    instance_count: int = Field(description="Instances wanted now: fixed, or where the autoscaler has put it.")
    min_instances: int
    max_instances: int
    max_queue: int
    spec: str
    zones: list[ZoneDecl]
    state: str | None
    generation: int
    maintenance_limit: int
    rollout_error: str = Field("", description="Why the roll to `generation` stopped; the previous version serves.")
    secrets: list[str] = Field(default_factory=list, description="Names of the secrets its instances get.")
    status: str
    status_message: str
    instances: list[InstanceOut] = Field(default_factory=list, description="Each running instance, as observed.")
    created_at: datetime
    updated_at: datetime


class NodeList(BaseModel):
    nodes: list[NodeOut]


class SpecOut(BaseModel):
    name: str
    vcpu: int
    ram_gb: float
    gpus: int
    units_per_second: float


class SpecTable(BaseModel):
    specs: list[SpecOut]
    cpus: int = Field(description="CPUs of this machine.")
    gpus: int = Field(description="GPUs of this machine.")
    policy: str = Field(description="How specs become limits on this server.")
    zones: list[str] = Field(description="Zones of this server's backend.")


class UsageOut(BaseModel):
    node_id: str
    folder_id: str
    spec: str
    instances: int = Field(description="Instance uptimes counted.")
    seconds: int = Field(description="Uptime, each instance's rounded up to whole seconds.")
    units: float = Field(description="Seconds x the spec's units per second.")


class UsageList(BaseModel):
    since: datetime | None
    usage: list[UsageOut]


class LogLine(BaseModel):
    time: str
    instance_id: str
    request_id: str
    stream: str
    text: str


class LogList(BaseModel):
    node_id: str
    lines: list[LogLine]


class NodeProto(BaseModel):
    """A node's typed gRPC service: its .proto file, and the names a client calls it by."""

    node_id: str
    file_name: str  # cellnode/nodes/n<ID>.proto
    service: str  # cellnode.nodes.n<ID>.Node
    method: str  # /cellnode.nodes.n<ID>.Node/Execute
    proto: str  # the file's text


METADATA_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")
MAX_ALIAS_NODES = 32
MAX_METADATA = 32


class ShareDecl(BaseModel):
    """A node and its percentage of the alias's requests (of the requests copied to it, for a mirror)."""

    node: str = Field(min_length=1, max_length=63, description="Node ID, or name in the alias's folder.")
    percent: StrictInt = Field(ge=0, le=100, description="Whole percent, 0 to 100 (a JSON integer).")


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return value
    if len(value) > MAX_METADATA:
        raise ValueError(f"metadata has {len(value)} keys; at most {MAX_METADATA} are allowed")
    for key, item in value.items():
        if not METADATA_KEY.match(key):
            raise ValueError(
                f"metadata key {key!r} is not allowed; use up to 63 letters, digits, '_', '.' and '-', starting with "
                "a letter"
            )
        if len(item) > 1024:
            raise ValueError(f"metadata value of {key!r} is {len(item)} characters; at most 1024 are allowed")
    return value


Metadata = Annotated[dict[str, str], AfterValidator(_check_metadata)]


def _check_shares(shares: list[ShareDecl] | None, what: str) -> None:
    if shares is None:
        return
    names = [share.node for share in shares]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"node {twice[0]!r} is listed more than once in {what}; list each node once")
    if what == "nodes":
        total = sum(share.percent for share in shares)
        if total != 100:
            each = ", ".join(f"{share.node}={share.percent}" for share in shares)
            raise ValueError(f"the node percentages sum to {total}, not 100 ({each}); make them sum to 100")
    else:
        for share in shares:
            if share.percent == 0:
                raise ValueError(
                    f"mirror {share.node}=0 copies no request; give a percentage from 1 to 100, or leave it out"
                )


class _AliasFields(BaseModel):
    nodes: list[ShareDecl] | None = Field(None, min_length=1, max_length=MAX_ALIAS_NODES)
    mirrors: list[ShareDecl] | None = Field(
        None,
        max_length=MAX_ALIAS_NODES,
        description="Nodes that get a copy of this percentage of the requests; their answers are compared with the "
        "primary's, never returned.",
    )
    description: str | None = Field(None, max_length=1024)
    metadata: Metadata | None = None
    public: bool | None = Field(None, description="Any authenticated principal may call a public alias.")
    acl: list[str] | None = Field(
        None, description="Folder IDs that may call a private alias; default: its own folder."
    )
    rollback_error_rate: float | None = Field(
        None, ge=0, lt=1, description="Take a node out when its error rate (5xx) over the window passes this."
    )
    rollback_window: float | None = Field(None, gt=0, le=86_400, description="Seconds of the error-rate window.")
    rollback_min_requests: int | None = Field(
        None, ge=1, le=1_000_000, description="Answers a node must give in the window before it can be taken out (10)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> _AliasFields:
        _check_shares(self.nodes, "nodes")
        _check_shares(self.mirrors, "mirrors")
        if self.public and self.acl:
            raise ValueError(
                "a public alias may be called by any authenticated principal, so it takes no ACL; give --private "
                "with --acl, or drop --acl"
            )
        if (self.rollback_error_rate is None) != (self.rollback_window is None):
            given = "rollback_error_rate" if self.rollback_error_rate is not None else "rollback_window"
            raise ValueError(
                f"{given} is given alone; automatic rollback needs both rollback_error_rate and rollback_window "
                "(for example --rollback-on-error-rate 0.05 --rollback-window 60)"
            )
        return self


class AliasCreate(_AliasFields):
    name: ResourceName
    prefix: str | None = Field(None, description="One of the server's alias prefixes; default 'datasphere.user'.")
    nodes: list[ShareDecl] = Field(min_length=1, max_length=MAX_ALIAS_NODES)
    folder_id: str | None = None


class AliasUpdate(_AliasFields):
    """Only the fields given change; `nodes` and `mirrors` replace the lists whole. The routing table is swapped in
    one step: requests under way finish on the node they started on."""

    folder_id: str | None = Field(None, description="Move the alias to this folder.")
    rollback_off: bool = Field(False, description="Turn automatic rollback off.")

    @model_validator(mode="after")
    def _off_alone(self) -> AliasUpdate:
        if self.rollback_off and self.rollback_error_rate is not None:
            raise ValueError(
                "rollback_off turns automatic rollback off, and rollback_error_rate sets it; give one or the other"
            )
        return self


class ShareOut(BaseModel):
    node_id: str
    node_name: str
    percent: int
    status: str = Field(description="The node's status; 'ABSENT' if it was deleted meanwhile.")
    serving: bool = Field(description="Whether it has a live instance on this server now.")
    effective_percent: float = Field(description="Its share of requests now, the shares of nodes not serving spread.")


class MirrorStats(BaseModel):
    node_id: str
    requests: int
    agree: int
    differ: int
    error: int
    mean_primary_ms: float
    mean_shadow_ms: float


class AliasOut(_Out):
    id: str
    folder_id: str
    prefix: str
    name: str
    routing_name: str = Field(description="What callers name: '<prefix>.<name>', in x-node-alias or the path.")
    description: str
    nodes: list[ShareOut]
    mirrors: list[ShareOut]
    metadata: dict[str, str]
    public: bool
    acl: list[str]
    rollback_error_rate: float | None
    rollback_window: float | None
    rollback_min_requests: int
    rollbacks: list[dict[str, Any]] = Field(description="Automatic rollbacks, newest last.")
    mirror_stats: list[MirrorStats] = Field(default_factory=list, description="Per shadow node, on this server.")
    mirrored: list[dict[str, Any]] = Field(default_factory=list, description="The latest mirrored requests.")
    warnings: list[str] = Field(default_factory=list)
    version: int
    created_by: str
    created_at: datetime
    updated_at: datetime


class AliasList(BaseModel):
    aliases: list[AliasOut]
