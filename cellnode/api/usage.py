"""Usage and specs: what instances ran, for how long, and what that costs in units."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime

from fastapi import APIRouter
from sqlalchemy import or_, select

from cellnode.api.deps import CallerDep, ServicesDep, resolve_folder
from cellnode.api.schemas import SpecOut, SpecTable, UsageList, UsageOut
from cellnode.store.models import Usage
from cellnode.supervisor.specs import count_cpus

router = APIRouter(prefix="/cellnode/v1", tags=["usage"])

LIMITS = (
    "Each instance gets min(vCPU, this machine's CPUs) threads for OpenMP, BLAS and friends, and is replaced if its "
    "resident memory passes its spec's RAM. A spec needing more GPUs than this machine has is refused at node "
    "creation, and an instance sees only its spec's GPUs (CUDA_VISIBLE_DEVICES)."
)
OVERCOMMIT = {
    True: "CPU and memory are overcommitted: nodes' specs may add up to more than this machine has "
    "(CELLNODE_OVERCOMMIT=true).",
    False: "CPU and memory are not overcommitted: a node whose instances, at their maximum count, would not fit "
    "beside the other running nodes is refused (CELLNODE_OVERCOMMIT=false).",
}


@router.get("/specs", response_model=SpecTable)
def list_specs(svc: ServicesDep, _caller: CallerDep) -> SpecTable:
    """The instance specs this server offers, and how they become limits here."""
    specs = [SpecOut(**vars(spec)) for spec in svc.specs.values()]
    policy = f"{OVERCOMMIT[svc.settings.overcommit]} {LIMITS}"
    return SpecTable(specs=specs, cpus=count_cpus(), gpus=svc.gpus, policy=policy, zones=list(svc.zones))


@router.get("/usage", response_model=UsageList)
def get_usage(
    svc: ServicesDep,
    caller: CallerDep,
    folder_id: str | None = None,
    node_id: str | None = None,
    since: datetime | None = None,
) -> UsageList:
    """Instance uptime per node of a folder, rounded up to whole seconds per instance, and its units."""
    now = datetime.now(UTC)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, folder_id, "viewer", "read usage")
        query = select(Usage).where(Usage.folder_id == folder.id)
        if node_id:
            query = query.where(Usage.node_id == node_id)
        if since is not None:
            query = query.where(or_(Usage.ended_at.is_(None), Usage.ended_at > since))
        rows = list(session.scalars(query))
    totals: dict[tuple[str, str], UsageOut] = {}
    units: dict[tuple[str, str], float] = defaultdict(float)
    for row in rows:
        start = max(row.started_at, since) if since is not None else row.started_at
        seconds = math.ceil(max(0.0, ((row.ended_at or now) - start).total_seconds()))
        key = (row.node_id, row.spec)
        out = totals.setdefault(
            key, UsageOut(node_id=row.node_id, folder_id=row.folder_id, spec=row.spec, instances=0, seconds=0, units=0)
        )
        out.instances += 1
        out.seconds += seconds
        units[key] += seconds * row.units_per_second
    for key, out in totals.items():
        out.units = units[key]
    return UsageList(since=since, usage=sorted(totals.values(), key=lambda u: (u.node_id, u.spec)))
