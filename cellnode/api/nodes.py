"""Nodes: create (a cell node, with the checks that catch a broken deployment before it starts, or a docker node), list,
get, update, suspend, resume, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from cellnode.api.checkpoints import find_checkpoint
from cellnode.api.containers import (
    check_registry_secret,
    container_out,
    patch_container,
    store_container,
    store_kernel_image,
)
from cellnode.api.deps import CallerDep, Services, ServicesDep, find_resource, resolve_folder
from cellnode.api.node_openapi import node_openapi
from cellnode.api.schemas import (
    CELL_ONLY,
    InstanceOut,
    LogLine,
    LogList,
    NodeCreate,
    NodeList,
    NodeOut,
    NodeProto,
    NodeUpdate,
    VariableDecl,
    ZoneDecl,
)
from cellnode.api.secrets import check_node_secrets, resolve_secrets, secret_names
from cellnode.checkpoint.analysis import analyze_cell, transform_cell
from cellnode.exceptions import AlreadyExists, FailedPrecondition, InvalidArgument
from cellnode.iam.access import Role
from cellnode.iam.credentials import Caller
from cellnode.store.models import Checkpoint, Folder, Instance, Node, Usage, utcnow
from cellnode.supervisor.aliases import aliases_naming, routing_name
from cellnode.supervisor.specs import Spec, check_spec, machine_capacity
from cellnode.telemetry.logs import MAX_TAIL, read_logs

router = APIRouter(prefix="/cellnode/v1/nodes", tags=["nodes"])


@router.post("", response_model=NodeOut)
def create_node(body: NodeCreate, svc: ServicesDep, caller: CallerDep) -> NodeOut:
    """Create a node: a cell node from a pinned checkpoint, or a docker node from an image. It starts as CREATED and
    turns HEALTHY once its instances are up."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, body.folder_id, "developer", "create nodes")
        taken = session.scalar(select(Node.id).where(Node.folder_id == folder.id, Node.name == body.name))
        if taken is not None:
            raise AlreadyExists(f"Folder {folder.id!r} already has a node named {body.name!r} ({taken}).")
        checkpoint, cell_code, uses_ipython, container = None, "", False, None
        if body.type == "docker":
            assert body.container is not None, "checked by NodeCreate"
            container = store_container(session, body.container, folder.id)
        else:
            assert body.checkpoint is not None, "checked by NodeCreate"
            checkpoint = find_checkpoint(session, svc, caller, body.checkpoint, folder.id, "viewer", "use checkpoints")
            _check_pinned(checkpoint)
            cell_code, uses_ipython = check_variables(body.inputs, body.outputs, checkpoint)
            if body.kernel_image is not None:
                container = store_kernel_image(session, body.kernel_image, folder.id)
        check_spec(svc.specs, body.spec, svc.gpus)
        count, low, high = instance_range(body, None)
        check_container(container if body.type == "docker" else None, body.spec, svc.specs, high)
        zones = check_zones(body.zones, svc.zones)
        check_capacity(session, svc, body.spec, high, None)
        acl = check_acl(session, body.acl, folder)
        secrets = resolve_secrets(session, folder.id, body.secrets or [])
        assert body.timeout is not None, "NodeCreate fills in the type's default"
        node = Node(
            folder_id=folder.id,
            name=body.name,
            description=body.description,
            type=body.type,
            checkpoint_id=checkpoint.id if checkpoint is not None else None,
            container=container,
            inputs=[v.model_dump() for v in body.inputs],
            outputs=[v.model_dump() for v in body.outputs],
            acl=acl,
            secrets=secrets,
            timeout=body.timeout,
            instance_count=count,
            min_instances=low,
            max_instances=high,
            zones=zones,
            maintenance_limit=body.maintenance_limit,
            spec=body.spec,
            state=body.state or "isolated",
            max_queue=body.max_queue,
            cell_code=cell_code,
            uses_ipython=uses_ipython,
            created_by=caller.principal_id,
        )
        session.add(node)
        session.flush()
        out = node_out(session, node)
    svc.supervisor.notify()
    return out


def _check_pinned(checkpoint: Checkpoint) -> None:
    if checkpoint.pinned_at is None:
        raise FailedPrecondition(
            f"Checkpoint {checkpoint.id!r} is not pinned; only pinned checkpoints can back a node. "
            f"Pin it with 'cellnode checkpoint pin {checkpoint.id} NAME'."
        )


@router.get("", response_model=NodeList)
def list_nodes(svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> NodeList:
    """The nodes of a folder."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, folder_id, "viewer", "list nodes")
        rows = session.scalars(select(Node).where(Node.folder_id == folder.id).order_by(Node.created_at))
        return NodeList(nodes=[node_out(session, row) for row in rows])


@router.get("/{ref}", response_model=NodeOut)
def get_node(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> NodeOut:
    """One node, by ID or name."""
    with svc.db.session() as session:
        return node_out(session, find_node(session, svc, caller, ref, folder_id, "viewer", "read nodes"))


@router.delete("/{ref}", response_model=NodeOut)
def delete_node(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> NodeOut:
    """Delete a node: it turns DELETING at once, and is gone once its instances have stopped."""
    with svc.db.session() as session:
        node = find_node(session, svc, caller, ref, folder_id, "developer", "delete nodes")
        naming = aliases_naming(session, node.id)
        if naming:
            visible = [row for row in naming if svc.access.role(caller, row.folder_id) is not None]
            names = ", ".join(f"{routing_name(row)} ({row.id})" for row in visible)
            hidden = len(naming) - len(visible)
            if hidden:  # their names and folders are not the caller's to learn
                names += f"{' and ' if names else ''}{hidden} alias(es) in folders you have no role on"
            raise FailedPrecondition(
                f"Node {node.id!r} ({node.name}) is named by {names}; deleting it would leave them routing to "
                "nothing. Take it out of them first ('cellnode alias update ALIAS --node ...'), or delete them."
            )
        node.status, node.status_message = "DELETING", ""
        session.flush()
        out = node_out(session, node)
    svc.supervisor.notify()
    return out


@router.patch("/{ref}", response_model=NodeOut)
def update_node(
    ref: str, body: NodeUpdate, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None
) -> NodeOut:
    """Change a node. A new checkpoint, variables or spec start new instances and drain the old ones, at most
    `maintenance_limit` at once, so that the node keeps answering; other fields apply at once."""
    with svc.db.session() as session:
        node = find_node(session, svc, caller, ref, folder_id, "developer", "change nodes")
        if node.status == "DELETING":
            raise FailedPrecondition(f"Node {node.id!r} is being deleted; it cannot be updated.")
        _check_fields_of_type(node, body)
        if body.folder_id is not None and body.folder_id != node.folder_id:
            _move(session, svc, caller, node, body.folder_id)
        if body.name is not None and body.name != node.name:
            taken = session.scalar(select(Node.id).where(Node.folder_id == node.folder_id, Node.name == body.name))
            if taken is not None:
                raise AlreadyExists(f"Folder {node.folder_id!r} already has a node named {body.name!r} ({taken}).")
            node.name = body.name
        rolls = body.roll
        if body.secrets is not None:
            secrets = resolve_secrets(session, node.folder_id, body.secrets)
            rolls = rolls or set(secrets) != set(node.secrets)  # the same secrets in another order: same variables
            node.secrets = secrets
        elif node.secrets:
            check_node_secrets(session, node)  # after a move
        if body.checkpoint is not None or body.inputs is not None or body.outputs is not None:
            checkpoint = (
                find_checkpoint(session, svc, caller, body.checkpoint, node.folder_id, "viewer", "use checkpoints")
                if body.checkpoint is not None
                else session.get(Checkpoint, node.checkpoint_id)
            )
            assert checkpoint is not None, "a node's checkpoint cannot be deleted (the API refuses it)"
            _check_pinned(checkpoint)
            inputs = body.inputs if body.inputs is not None else [VariableDecl(**v) for v in node.inputs]
            outputs = body.outputs if body.outputs is not None else [VariableDecl(**v) for v in node.outputs]
            node.cell_code, node.uses_ipython = check_variables(inputs, outputs, checkpoint)
            node.checkpoint_id = checkpoint.id
            node.inputs = [v.model_dump() for v in inputs]
            node.outputs = [v.model_dump() for v in outputs]
            rolls = True
        if body.spec is not None and body.spec != node.spec:
            check_spec(svc.specs, body.spec, svc.gpus)
            node.spec, rolls = body.spec, True
        if body.zones is not None:
            zones = check_zones(body.zones, svc.zones)
            if zones != node.zones:
                node.zones, rolls = zones, True
        if body.fields_set_scaling():
            node.instance_count, node.min_instances, node.max_instances = instance_range(body, node)
        if body.spec is not None or body.fields_set_scaling():
            check_capacity(session, svc, node.spec, node.max_instances, node.id)
        if body.state is not None and body.state != node.state:
            node.state, rolls = body.state, True
        if body.container is not None:
            container = patch_container(session, node, body.container)
            if container != node.container:
                node.container, rolls = container, True
        elif "kernel_image" in body.model_fields_set:
            kernel = store_kernel_image(session, body.kernel_image, node.folder_id) if body.kernel_image else None
            if kernel != node.container:
                node.container, rolls = kernel, True
        elif node.container and node.container.get("registry_password_secret"):
            check_registry_secret(session, node)  # after a move
        if node.type == "docker" and (body.container is not None or body.spec is not None or body.fields_set_scaling()):
            check_container(node.container, node.spec, svc.specs, node.max_instances)
        if body.acl is not None:
            folder = session.get(Folder, node.folder_id)
            assert folder is not None
            node.acl = check_acl(session, body.acl, folder)
        for key in ("description", "timeout", "max_queue", "maintenance_limit"):
            value = getattr(body, key)
            if value is not None:
                setattr(node, key, value)
        if rolls:
            node.generation += 1
            node.rollout_error = ""  # a new roll starts clean
            if node.status == "FAILED":  # the supervisor tries the new generation: no longer failed from now on
                node.status, node.status_message = "UNHEALTHY", "Starting instances of the updated node."
        session.flush()
        out = node_out(session, node)
    svc.supervisor.notify()
    return out


@router.post("/{ref}:suspend", response_model=NodeOut)
def suspend_node(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> NodeOut:
    """Stop the node's instances and keep the node with its settings; requests get 503 until it is resumed."""
    return _set_suspended(svc, caller, ref, folder_id, True)


@router.post("/{ref}:resume", response_model=NodeOut)
def resume_node(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> NodeOut:
    """Start a suspended node's instances again, from its pinned checkpoint."""
    return _set_suspended(svc, caller, ref, folder_id, False)


def _set_suspended(svc: Services, caller: Caller, ref: str, folder_id: str | None, suspended: bool) -> NodeOut:
    with svc.db.session() as session:
        node = find_node(session, svc, caller, ref, folder_id, "developer", "suspend or resume nodes")
        if node.status == "DELETING":
            raise FailedPrecondition(f"Node {node.id!r} is being deleted; it can be neither suspended nor resumed.")
        if not suspended and node.suspended:
            check_capacity(session, svc, node.spec, node.max_instances, node.id)
        node.suspended = suspended
        session.flush()
        out = node_out(session, node)
    svc.supervisor.notify()
    return out


@router.get("/{ref}/logs", response_model=LogList)
def get_node_logs(
    ref: str,
    svc: ServicesDep,
    caller: CallerDep,
    folder_id: str | None = None,
    since: str | None = None,
    instance: str | None = None,
    tail: int = Query(100, ge=1, le=MAX_TAIL),
) -> LogList:
    """The node's instance output (the cell's prints included), oldest first: each line with its time, instance and
    request ID. `since` is an ISO 8601 UTC time such as `2026-11-24T01:50:00Z`."""
    with svc.db.session() as session:
        node = find_node(session, svc, caller, ref, folder_id, "viewer", "read node logs")
    records = read_logs(svc.settings.data_dir / "logs" / node.id, since=since, instance_id=instance, tail=tail)
    return LogList(node_id=node.id, lines=[LogLine(**vars(record)) for record in records])


@router.get("/{ref}/openapi.json")
def get_node_openapi(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> dict[str, Any]:
    """An OpenAPI document for calling this node, with its typed input and output variables."""
    with svc.db.session() as session:
        node = find_node(session, svc, caller, ref, folder_id, "viewer", "read nodes")
        _check_cell_node(node, "an OpenAPI document")
        return node_openapi(node)


@router.get("/{ref}/proto")
def get_node_proto(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> NodeProto:
    """The .proto file of the node's typed gRPC service (one field per variable), for generating a client."""
    from cellnode.exceptions import TypedServiceError
    from cellnode.grpc.typed import TypedNode

    with svc.db.session() as session:
        node = find_node(session, svc, caller, ref, folder_id, "viewer", "read nodes")
        _check_cell_node(node, "a .proto file")
        inputs = {variable["name"]: variable["type"] for variable in node.inputs}
        outputs = {variable["name"]: variable["type"] for variable in node.outputs}
        try:
            typed = TypedNode.build(node.id, node.name, inputs, outputs)
        except TypedServiceError as exc:
            raise FailedPrecondition(str(exc)) from None
        return NodeProto(
            node_id=node.id,
            file_name=typed.file.name,
            service=typed.service_name,
            method=typed.method_path,
            proto=typed.proto_text(),
        )


def _check_cell_node(node: Node, what: str) -> None:
    if node.type != "cell":
        raise FailedPrecondition(
            f"Node {node.id!r} is a docker node: it serves its image's own API, so cellnode has no {what} for it. "
            "Call it with the x-node-id header and the paths its service answers."
        )


def node_out(session: Session, node: Node) -> NodeOut:
    """A node with its instances as the supervisor last observed them."""
    out = NodeOut.model_validate(node)
    out.secrets = secret_names(session, node.secrets)
    shown = container_out(session, node.container)
    out.container, out.kernel_image = (shown, None) if node.type == "docker" else (None, shown)
    if node.type == "docker":
        out.state = None
    rows = session.scalars(select(Instance).where(Instance.node_id == node.id).order_by(Instance.slot))
    out.instances = [InstanceOut.model_validate(row) for row in rows]
    return out


def find_node(
    session: Session, svc: Services, caller: Caller, ref: str, folder_id: str | None, role: Role, action: str
) -> Node:
    """A node by ID, or by name in the folder, once the caller is known to hold `role` on its folder."""
    return find_resource(session, svc, caller, Node, ref, folder_id, role, action)


def _check_fields_of_type(node: Node, body: NodeUpdate) -> None:
    """Refuse an update that gives a docker node a cell node's settings, or the other way round."""
    if node.type == "docker":
        given = [key for key in CELL_ONLY if getattr(body, key) is not None]
        if given:
            raise InvalidArgument(
                f"Node {node.id!r} is a docker node; {given[0]} is a cell node's setting. Change its container "
                "instead (--image, --port, ...)."
            )
    elif body.container is not None:
        raise InvalidArgument(
            f"Node {node.id!r} is a cell node; 'container' is a docker node's setting. A cell node's image is "
            "--kernel-image."
        )


def check_container(container: dict[str, Any] | None, spec_name: str, specs: dict[str, Spec], instances: int) -> None:
    """Refuse a docker node's container that its spec or instance count cannot hold."""
    if container is None:
        return
    memory, spec = container.get("memory_bytes"), specs[spec_name]
    if memory is not None and memory > spec.memory_cap:
        raise InvalidArgument(
            f"container.memory_bytes is {memory} bytes, more than the {spec.ram_gb:g} GB of spec {spec_name!r} an "
            "instance gets. Give at most that (--memory), or a larger spec."
        )
    if container.get("fixed_ports") and instances > 1:
        raise InvalidArgument(
            f"The node's image listens on fixed ports (fixed_ports), so only one of its instances fits on this "
            f"machine, and it asks for up to {instances}. Make the image listen on $PORT and drop --fixed-ports, or "
            "give --instance-count 1."
        )


def check_variables(
    input_decls: list[VariableDecl], output_decls: list[VariableDecl], checkpoint: Checkpoint
) -> tuple[str, bool]:
    """Refuse declarations the deployed cell cannot satisfy; return the transformed cell and whether it uses IPython."""
    inputs = [v.name for v in input_decls]
    outputs = [v.name for v in output_decls]
    for kind, names in (("input", inputs), ("output", outputs)):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidArgument(f"The {kind} variable {duplicates[0]!r} is declared more than once; declare it once.")
    both = sorted(set(inputs) & set(outputs))
    if both:
        raise InvalidArgument(
            f"Variable {both[0]!r} is declared as both an input and an output; a request's input would come back "
            "as its output. Use different names (for example 'x' in, 'x_out' out)."
        )
    cell_code = transform_cell(checkpoint.cell_source)
    analysis = analyze_cell(cell_code)
    where = f"the deployed cell (code cell {checkpoint.cell} of {checkpoint.notebook_name!r})"
    for name in outputs:
        if name not in analysis.assigns:
            raise InvalidArgument(
                f"Output variable {name!r} is never assigned by {where}. Assign it in that cell, "
                "or remove it from --output."
            )
    if analysis.is_complete:
        for name in inputs:
            if name in analysis.assigns and name not in analysis.reads:
                raise InvalidArgument(
                    f"{where.capitalize()} assigns input variable {name!r} before reading it, so a request's value "
                    f"would never be used. Remove the assignment from the cell (declare inputs in an earlier cell), "
                    "or drop the input."
                )
        known = set(inputs) | {v["name"] for v in checkpoint.variables} | set(checkpoint.imports)
        unserializable = {u["name"]: u for u in checkpoint.unserializable}
        for name in sorted(analysis.reads - known):
            if name in unserializable:
                failed = unserializable[name]
                raise InvalidArgument(
                    f"{where.capitalize()} reads {name!r}, which could not be serialized when checkpoint "
                    f"{checkpoint.id!r} was captured ({failed['type']}: {failed['reason']}). Create it inside "
                    "the deployed cell, or make it serializable and capture the checkpoint again."
                )
            raise InvalidArgument(
                f"{where.capitalize()} reads {name!r}, which is neither an input variable nor in checkpoint "
                f"{checkpoint.id!r}. Declare it with --input {name}:TYPE, or define it in an earlier cell and "
                "capture the checkpoint again."
            )
    return cell_code, analysis.uses_ipython


def instance_range(body: NodeCreate | NodeUpdate, node: Node | None) -> tuple[int, int, int]:
    """The (count now, min, max) a request asks for: a fixed count, or a range the count is kept within."""
    if body.instance_count is not None:
        return body.instance_count, body.instance_count, body.instance_count
    low = body.min_instances if body.min_instances is not None else (node.min_instances if node else 1)
    high = body.max_instances if body.max_instances is not None else (node.max_instances if node else max(low, 1))
    if low > high:
        given = "min_instances" if body.min_instances is not None else "max_instances"
        raise InvalidArgument(
            f"{given} would make the range {low}..{high}: min_instances ({low}) must be at most max_instances "
            f"({high}). Give both, for example --min-instances {min(low, high)} --max-instances {max(low, high)}."
        )
    count = node.instance_count if node is not None else low
    return min(max(count, low), high), low, high


def check_zones(zones: list[ZoneDecl] | None, available: tuple[str, ...]) -> list[dict[str, str]]:
    """The zones as stored; every zone of the backend when none is given."""
    if zones is None:
        return [{"zone": zone, "subnet": ""} for zone in available]
    for decl in zones:
        if decl.zone not in available:
            raise InvalidArgument(
                f"Zone {decl.zone!r} is not a zone of this server; its backend has {', '.join(available)}. "
                f"Use --zone {available[0]} (or leave --zone out)."
            )
    return [decl.model_dump() for decl in zones]


def check_capacity(session: Session, svc: Services, spec_name: str, instances: int, node_id: str | None) -> None:
    """With overcommit off, refuse a node whose instances, at their most, do not fit beside the other nodes'."""
    if svc.settings.overcommit:
        return
    spec = svc.specs[spec_name]
    others = session.scalars(
        select(Node).where(Node.suspended.is_(False), Node.status != "DELETING", Node.id != (node_id or ""))
    )
    vcpu = ram = 0.0
    for other in others:
        other_spec = svc.specs.get(other.spec)
        if other_spec is not None:
            vcpu += other_spec.vcpu * other.max_instances
            ram += other_spec.ram_gb * other.max_instances
    cpus, memory = machine_capacity()
    want_vcpu, want_ram = spec.vcpu * instances, spec.ram_gb * instances
    if vcpu + want_vcpu > cpus or ram + want_ram > memory:
        raise FailedPrecondition(
            f"The node needs up to {instances} instance(s) of {spec_name} ({want_vcpu:g} vCPU, {want_ram:g} GB RAM); "
            f"this server has {cpus} CPUs and {memory:.1f} GB, of which other running nodes reserve {vcpu:g} vCPU and "
            f"{ram:g} GB, and overcommit is off (CELLNODE_OVERCOMMIT=false). Choose a smaller spec or fewer "
            "instances, suspend another node, or start the server with CELLNODE_OVERCOMMIT=true."
        )


def _move(session: Session, svc: Services, caller: Caller, node: Node, folder_ref: str) -> None:
    """Move the node to another folder: its name must be free there; usage from now on counts to the new folder."""
    target = resolve_folder(session, svc, caller, folder_ref, "developer", "move nodes into")
    if target.id == node.folder_id:
        return
    taken = session.scalar(select(Node.id).where(Node.folder_id == target.id, Node.name == node.name))
    if taken is not None:
        raise AlreadyExists(
            f"Folder {target.id!r} already has a node named {node.name!r} ({taken}). Rename this node in the same "
            "update (--name), or rename that one first."
        )
    if node.acl == [node.folder_id]:
        node.acl = [target.id]  # the default ACL (its own folder) follows the node
    now = utcnow()
    for open_usage in session.scalars(select(Usage).where(Usage.node_id == node.id, Usage.ended_at.is_(None))):
        open_usage.ended_at = now
        session.add(
            Usage(
                instance_id=open_usage.instance_id,
                node_id=node.id,
                folder_id=target.id,
                spec=open_usage.spec,
                units_per_second=open_usage.units_per_second,
                started_at=now,
                last_seen_at=now,
            )
        )
    node.folder_id = target.id


def check_acl(session: Session, acl: list[str] | None, folder: Folder) -> list[str]:
    if acl is None:
        return [folder.id]
    for folder_id in acl:
        if session.get(Folder, folder_id) is None:
            raise InvalidArgument(
                f"ACL folder {folder_id!r} does not exist. List folder IDs with 'cellnode folder list'."
            )
    return list(dict.fromkeys(acl))
