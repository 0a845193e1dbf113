"""Aliases between the store and the routing table: building routes from rows, and writing automatic rollbacks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from cellnode.router.alias import ROLLBACK_EVENTS, AliasRoute, RollbackPolicy, Share
from cellnode.store.db import Database
from cellnode.store.models import Alias


def routing_name(row: Alias) -> str:
    return f"{row.prefix}.{row.name}"


def alias_route(row: Alias) -> AliasRoute:
    """What the front needs of an alias row."""
    rollback = None
    if row.rollback_error_rate is not None and row.rollback_window is not None:
        rollback = RollbackPolicy(row.rollback_error_rate, row.rollback_window, row.rollback_min_requests)
    return AliasRoute(
        alias_id=row.id,
        name=routing_name(row),
        folder_id=row.folder_id,
        public=row.public,
        acl=frozenset(row.acl),
        shares=tuple(Share(s["node_id"], s["percent"]) for s in row.nodes),
        mirrors=tuple(Share(s["node_id"], s["percent"]) for s in row.mirrors),
        rollback=rollback,
        version=row.version,
    )


def load_alias_routes(db: Database) -> list[AliasRoute]:
    with db.session() as session:
        return [alias_route(row) for row in session.scalars(select(Alias))]


def aliases_naming(session: Session, node_id: str) -> list[Alias]:
    """The aliases that send a node requests or copies of them (any share, 0 % included)."""
    return [
        row
        for row in session.scalars(select(Alias).order_by(Alias.created_at))
        if any(share["node_id"] == node_id for share in (*row.nodes, *row.mirrors))
    ]


def write_rollback(
    db: Database,
    alias_id: str,
    version: int,
    *,
    before: list[Share],
    after: list[Share],
    node_id: str,
    error_rate: float,
    requests: int,
) -> AliasRoute | None:
    """Write the shares a rollback decided on `version` of the alias, with its event; the new route, or None when
    the alias has changed since (or is gone): an owner's change made meanwhile is never overwritten."""
    try:
        with db.session() as session:
            row = session.get(Alias, alias_id)
            if row is None or row.version != version:
                return None
            event: dict[str, Any] = {
                "at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                "node_id": node_id,
                "error_rate": round(error_rate, 4),
                "requests": requests,
                "window": row.rollback_window,
                "before": {share.node_id: share.percent for share in before},
                "after": {share.node_id: share.percent for share in after},
            }
            row.nodes = [{"node_id": share.node_id, "percent": share.percent} for share in after]
            row.events = [*row.events, event][-ROLLBACK_EVENTS:]
            session.flush()  # the UPDATE checks the version once more
            return alias_route(row)
    except StaleDataError:
        return None
