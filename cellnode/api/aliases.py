"""Aliases: create, list, get, update, delete. A change is in the routing table when its answer comes back."""

from __future__ import annotations

from typing import Any

from anyio import from_thread
from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from cellnode.api.deps import CallerDep, Services, ServicesDep, resolve_folder
from cellnode.api.nodes import check_acl, find_node
from cellnode.api.schemas import AliasCreate, AliasList, AliasOut, AliasUpdate, MirrorStats, ShareDecl, ShareOut
from cellnode.exceptions import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cellnode.iam.access import Role
from cellnode.iam.credentials import Caller
from cellnode.router.alias import Share, serving_shares
from cellnode.store.models import Alias, Folder, Node
from cellnode.supervisor.aliases import alias_route, routing_name

router = APIRouter(prefix="/cellnode/v1/aliases", tags=["aliases"])


@router.post("", response_model=AliasOut)
def create_alias(body: AliasCreate, svc: ServicesDep, caller: CallerDep) -> AliasOut:
    """Create an alias. Its nodes must be ones you may change (`developer` on their folders): the alias exposes them
    to whoever may call it."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, body.folder_id, "developer", "create aliases")
        prefix = _check_prefix(svc, body.prefix)
        taken = session.scalar(select(Alias).where(Alias.prefix == prefix, Alias.name == body.name))
        if taken is not None:
            whose = f" ({taken.id}, in folder {taken.folder_id})" if svc.access.role(caller, taken.folder_id) else ""
            raise AlreadyExists(
                f"Alias name {prefix}.{body.name} is taken{whose}: an alias name is a routing key, unique per prefix "
                "across the server. Choose another name."
            )
        nodes = _resolve(session, svc, caller, body.nodes, folder.id)
        mirrors = _resolve(session, svc, caller, body.mirrors or [], folder.id)
        _check_mirrors(nodes, mirrors)
        _check_kinds(session, nodes, mirrors)
        row = Alias(
            folder_id=folder.id,
            prefix=prefix,
            name=body.name,
            description=body.description or "",
            nodes=nodes,
            mirrors=mirrors,
            meta=body.metadata or {},
            public=bool(body.public),
            acl=[] if body.public else check_acl(session, body.acl, folder),
            rollback_error_rate=body.rollback_error_rate,
            rollback_window=body.rollback_window,
            rollback_min_requests=body.rollback_min_requests or 10,
            events=[],
            created_by=caller.principal_id,
        )
        session.add(row)
        session.flush()
        route = alias_route(row)
        out = alias_out(session, svc, row)
    from_thread.run_sync(svc.table.put_alias, route)  # committed: in force from now on, written on the loop
    return out


@router.get("", response_model=AliasList)
def list_aliases(svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> AliasList:
    """The aliases of a folder."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, folder_id, "viewer", "list aliases")
        rows = session.scalars(select(Alias).where(Alias.folder_id == folder.id).order_by(Alias.created_at))
        return AliasList(aliases=[alias_out(session, svc, row) for row in rows])


@router.get("/{ref}", response_model=AliasOut)
def get_alias(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> AliasOut:
    """One alias, by ID, routing name (`datasphere.user.NAME`) or name: its nodes and what they serve now, its
    mirror comparisons and its rollbacks."""
    with svc.db.session() as session:
        return alias_out(session, svc, find_alias(session, svc, caller, ref, folder_id, "viewer", "read aliases"))


@router.patch("/{ref}", response_model=AliasOut)
def update_alias(
    ref: str, body: AliasUpdate, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None
) -> AliasOut:
    """Change an alias; `nodes` and `mirrors` replace the lists whole. The new routing table replaces the old in one
    step: requests under way finish on the node they started on, and the next request routes by the new one."""
    try:
        with svc.db.session() as session, session.no_autoflush:  # one UPDATE, so one version step
            row = find_alias(session, svc, caller, ref, folder_id, "developer", "change aliases")
            if body.folder_id is not None:
                target = resolve_folder(session, svc, caller, body.folder_id, "developer", "move aliases into")
                if row.acl == [row.folder_id]:
                    row.acl = [target.id]  # the default ACL (its own folder) follows the alias
                row.folder_id = target.id
            if body.nodes is not None:
                row.nodes = _resolve(session, svc, caller, body.nodes, row.folder_id)
            if body.mirrors is not None:
                row.mirrors = _resolve(session, svc, caller, body.mirrors, row.folder_id)
            if body.nodes is not None or body.mirrors is not None:
                _check_mirrors(row.nodes, row.mirrors)
                _check_kinds(session, row.nodes, row.mirrors)
            if body.public is not None:
                row.public = body.public
                if body.public:
                    row.acl = []
            if body.acl is not None or (body.public is False and not row.acl):
                if row.public:
                    raise InvalidArgument(
                        f"Alias {routing_name(row)!r} is public, so it takes no ACL; give --private with --acl."
                    )
                folder = session.get(Folder, row.folder_id)
                assert folder is not None
                row.acl = check_acl(session, body.acl, folder)
            widens = body.public is not None or body.acl is not None or body.folder_id is not None
            if widens and body.nodes is None:
                # Who may call the alias changes: only someone who may change all its nodes may expose them anew.
                _resolve(session, svc, caller, [_decl(share) for share in row.nodes], row.folder_id)
            if widens and body.mirrors is None:
                _resolve(session, svc, caller, [_decl(share) for share in row.mirrors], row.folder_id)
            if body.description is not None:
                row.description = body.description
            if body.metadata is not None:
                row.meta = body.metadata
            if body.rollback_off:
                row.rollback_error_rate = row.rollback_window = None
            elif body.rollback_error_rate is not None:
                row.rollback_error_rate, row.rollback_window = body.rollback_error_rate, body.rollback_window
            if body.rollback_min_requests is not None:
                row.rollback_min_requests = body.rollback_min_requests
            session.flush()  # bumps the version, or raises StaleDataError if another change landed meanwhile
            route = alias_route(row)
            out = alias_out(session, svc, row)
    except StaleDataError:
        raise FailedPrecondition(
            f"Alias {ref!r} was changed by someone else (or rolled back automatically) while this update ran; "
            "'cellnode alias get' shows it now. Repeat the update."
        ) from None
    from_thread.run_sync(svc.table.put_alias, route)
    return out


@router.delete("/{ref}", response_model=AliasOut)
def delete_alias(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> AliasOut:
    """Delete an alias; its nodes stay as they are. Callers of its name get 404 from now on."""
    try:
        with svc.db.session() as session:
            row = find_alias(session, svc, caller, ref, folder_id, "developer", "delete aliases")
            out = alias_out(session, svc, row)
            name = routing_name(row)
            session.delete(row)
    except StaleDataError:
        raise FailedPrecondition(
            f"Alias {ref!r} was changed by someone else (or rolled back automatically) while it was being deleted; "
            "'cellnode alias get' shows it now. Repeat the delete."
        ) from None

    def forget() -> None:
        svc.table.remove_alias(name)
        svc.metrics.forget_alias(name)

    from_thread.run_sync(forget)
    return out


def find_alias(
    session: Session, svc: Services, caller: Caller, ref: str, folder_id: str | None, role: Role, action: str
) -> Alias:
    """An alias by ID, routing name, or name in the folder, once the caller is known to hold `role` on its folder.
    One in a folder the caller has no role on is not found, as an ID that does not exist."""
    found = session.get(Alias, ref)
    if found is None and "." in ref:
        prefix, _, name = ref.rpartition(".")
        found = session.scalar(select(Alias).where(Alias.prefix == prefix, Alias.name == name))
    if found is not None and svc.access.role(caller, found.folder_id) is None:
        found = None
    if found is None:
        folder = resolve_folder(session, svc, caller, folder_id, "viewer", "look up aliases")
        named = list(session.scalars(select(Alias).where(Alias.folder_id == folder.id, Alias.name == ref)))
        if len(named) > 1:
            names = ", ".join(routing_name(row) for row in named)
            raise InvalidArgument(
                f"Folder {folder.id!r} has several aliases named {ref!r} ({names}); name one of them."
            )
        if not named:
            raise NotFound(
                f"Alias {ref!r} not found in folder {folder.id!r} by ID, routing name or name. "
                "'cellnode alias list' shows the aliases."
            )
        found = named[0]
    svc.access.require(caller, found.folder_id, role, action)
    return found


def alias_out(session: Session, svc: Services, row: Alias) -> AliasOut:
    """The alias as stored, with its nodes' statuses and shares now, and what this server has seen of it."""
    route = svc.table.find_alias(routing_name(row))
    nodes = {node.id: node for node in session.scalars(select(Node).where(Node.id.in_(_node_ids(row))))}
    out = AliasOut(
        id=row.id,
        folder_id=row.folder_id,
        prefix=row.prefix,
        name=row.name,
        routing_name=routing_name(row),
        description=row.description,
        nodes=_shares_out(svc, row.nodes, nodes, primary=True),
        mirrors=_shares_out(svc, row.mirrors, nodes, primary=False),
        metadata=row.meta,
        public=row.public,
        acl=row.acl,
        rollback_error_rate=row.rollback_error_rate,
        rollback_window=row.rollback_window,
        rollback_min_requests=row.rollback_min_requests,
        rollbacks=row.events,
        version=row.version,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
        warnings=_warnings(row, nodes),
    )
    if route is not None:
        out.mirror_stats = [
            MirrorStats(
                node_id=node_id,
                requests=totals.requests,
                agree=totals.agree,
                differ=totals.differ,
                error=totals.error,
                mean_primary_ms=round(totals.primary_ms / totals.requests, 3) if totals.requests else 0.0,
                mean_shadow_ms=round(totals.shadow_ms / totals.requests, 3) if totals.requests else 0.0,
            )
            for node_id, totals in list(route.stats.mirrors.items())  # one C call: the loop may be adding to it
        ]
        out.mirrored = [record.as_dict() for record in list(route.stats.records)]
    return out


def _shares_out(
    svc: Services, shares: list[dict[str, Any]], nodes: dict[str, Node], *, primary: bool
) -> list[ShareOut]:
    parsed = [Share(str(s["node_id"]), int(s["percent"])) for s in shares]
    serving = [s.node_id for s in serving_shares(parsed, svc.table.serving)] if primary else []
    total = sum(s.percent for s in parsed if s.node_id in serving)
    result = []
    for share in parsed:
        node, route = nodes.get(share.node_id), svc.table.find(share.node_id)
        status = route.status if route is not None else (node.status if node is not None else "ABSENT")
        result.append(
            ShareOut(
                node_id=share.node_id,
                node_name=node.name if node is not None else "",
                percent=share.percent,
                status=status,
                serving=svc.table.serving(share.node_id),
                effective_percent=round(100 * share.percent / total, 2) if share.node_id in serving else 0.0,
            )
        )
    return result


def _warnings(row: Alias, nodes: dict[str, Node]) -> list[str]:
    """Differences between the alias's nodes that a caller would notice: variables, their types."""
    found = [nodes[share["node_id"]] for share in (*row.nodes, *row.mirrors) if share["node_id"] in nodes]
    if len(found) < 2:
        return []
    first, warnings = found[0], []
    for other in found[1:]:
        for kind in ("inputs", "outputs"):
            mine = {v["name"]: v["type"] for v in getattr(first, kind)}
            theirs = {v["name"]: v["type"] for v in getattr(other, kind)}
            if mine != theirs:
                warnings.append(
                    f"Nodes {first.name!r} and {other.name!r} declare different {kind} ({_signature(mine)} vs "
                    f"{_signature(theirs)}): a caller of the alias gets one or the other at random."
                )
    return warnings


def _signature(variables: dict[str, str]) -> str:
    return ", ".join(f"{name}:{kind}" for name, kind in variables.items()) or "none"


def _node_ids(row: Alias) -> list[str]:
    return [share["node_id"] for share in (*row.nodes, *row.mirrors)]


def _check_prefix(svc: Services, prefix: str | None) -> str:
    allowed = svc.settings.prefixes
    if prefix is None:
        return allowed[0]
    if prefix not in allowed:
        raise InvalidArgument(
            f"Alias prefix {prefix!r} is not one of this server's ({', '.join(allowed)}); use --prefix {allowed[0]}, "
            "or ask the server's operator to add it to CELLNODE_ALIAS_PREFIXES."
        )
    return prefix


def _resolve(
    session: Session, svc: Services, caller: Caller, shares: list[ShareDecl], folder_id: str
) -> list[dict[str, Any]]:
    """The shares with their nodes found (by ID, or by name in the alias's folder), each one the caller may change."""
    resolved: list[dict[str, Any]] = []
    for share in shares:
        node = find_node(session, svc, caller, share.node, folder_id, "developer", "route an alias to nodes")
        if node.status == "DELETING":
            raise FailedPrecondition(f"Node {node.id!r} ({node.name}) is being deleted; an alias cannot name it.")
        resolved.append({"node_id": node.id, "percent": share.percent})
    ids = [share["node_id"] for share in resolved]
    twice = sorted({node_id for node_id in ids if ids.count(node_id) > 1})
    if twice:
        raise InvalidArgument(f"Node {twice[0]!r} is listed twice (once by ID, once by name); list each node once.")
    return resolved


def _decl(share: dict[str, Any]) -> ShareDecl:
    return ShareDecl(node=share["node_id"], percent=share["percent"])


def _check_mirrors(nodes: list[dict[str, Any]], mirrors: list[dict[str, Any]]) -> None:
    weighted = {str(share["node_id"]) for share in nodes if share["percent"]}
    for mirror in mirrors:
        if mirror["node_id"] in weighted:
            raise InvalidArgument(
                f"Node {mirror['node_id']!r} takes a share of the alias's requests, so it cannot also shadow them: "
                "a copy of a request would often go to the node that answers it. Give it 0 in --node, or mirror "
                "another node."
            )


def _check_kinds(session: Session, nodes: list[dict[str, Any]], mirrors: list[dict[str, Any]]) -> None:
    """An alias's callers speak one API: its nodes are all cell nodes, or all docker nodes of one protocol (HTTP,
    or gRPC); and only cell nodes' answers can be compared, so only they can be mirrored."""
    found = {node.id: node for node in session.scalars(select(Node).where(Node.id.in_(_ids(nodes, mirrors))))}

    def kind(share: dict[str, Any]) -> str:
        node = found[share["node_id"]]
        if node.type != "docker":
            return "cell node"
        return "gRPC docker node" if (node.container or {}).get("endpoint") == "grpc" else "HTTP docker node"

    first = nodes[0]
    for share in (*nodes[1:], *mirrors):
        if kind(share) != kind(first):
            raise InvalidArgument(
                f"Node {found[share['node_id']].name!r} is a {kind(share)} and {found[first['node_id']].name!r} a "
                f"{kind(first)}: an alias's callers speak one API, so its nodes must be of one kind. Make an alias "
                "for each kind."
            )
    if mirrors and kind(first) != "cell node":
        raise InvalidArgument(
            "Mirrors compare the outputs of cell nodes; a docker node's answers are its service's own, so an alias of "
            "docker nodes takes no --mirror. Drop the mirrors."
        )


def _ids(*share_lists: list[dict[str, Any]]) -> list[str]:
    return [share["node_id"] for shares in share_lists for share in shares]
