"""Aliases between the store and the routing table: building routes from rows, syncing them, and automatic
rollbacks."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from cellnode.router.alias import ROLLBACK_EVENTS, AliasRoute, RollbackPolicy, Share, shift_away
from cellnode.router.table import RoutingTable
from cellnode.store.db import Database
from cellnode.store.models import Alias
from cellnode.telemetry.metrics import Metrics

logger = logging.getLogger("cellnode.supervisor")


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


class AliasKeeper:
    """Keeps the routing table's aliases in line with the store, and takes a node out of an alias whose rollback
    policy it breaks: at once in the table, then in the store in the background."""

    def __init__(
        self, db: Database, table: RoutingTable, metrics: Metrics | None, spawn: Callable[[Any, str], object]
    ) -> None:
        self._db, self._table, self._metrics, self._spawn = db, table, metrics, spawn

    async def sync(self) -> None:
        """The routing table's aliases as the store has them (another server's changes included)."""
        changes = self._table.alias_changes
        routes = await asyncio.to_thread(load_alias_routes, self._db)
        for name in self._table.sync_aliases(routes, changes):
            if self._metrics is not None:
                self._metrics.forget_alias(name)

    def roll_back(self, alias: AliasRoute, node_id: str, error_rate: float) -> None:
        """Take `node_id` out of the alias at once, for an error rate past the alias's limit, and write it to the
        store in the background. Its share goes to nodes that serve now, are not mirrors, and are within the limit
        themselves; with none, the shares stay and the server logs why. Called on the event loop."""
        policy, stats = alias.rollback, alias.stats
        assert policy is not None, "only an alias with a rollback policy counts errors"
        now = time.monotonic()
        window = stats.windows.get(node_id)
        requests = window.requests if window is not None else 0
        mirrors = {share.node_id for share in alias.mirrors}

        def eligible(other: str) -> bool:
            return other not in mirrors and self._table.serving(other) and stats.may_take_over(policy, other, now)

        moved = shift_away(alias.shares, node_id, eligible)
        if moved is None:
            logger.warning(
                "Alias %s: node %s has an error rate of %.1f%% over %g s, but no other node can take its share (none "
                "serves that is not a mirror, within the limit, and not rolled back itself); the shares stay.",
                alias.name,
                node_id,
                error_rate * 100,
                policy.window,
            )
            stats.forget(node_id)  # a fresh window: warned again only after as many requests
            return
        stats.rolled_back_at[node_id] = now
        # In force now, marked so that a reload of the same version cannot undo it before the store has it.
        self._table.put_alias(dataclasses.replace(alias, shares=tuple(moved), pending_rollback=True))
        self._spawn(self._write(alias, node_id, moved, error_rate, requests), f"rollback-{alias.alias_id}")

    async def _write(
        self, alias: AliasRoute, node_id: str, moved: list[Share], error_rate: float, requests: int
    ) -> None:
        policy = alias.rollback
        window = policy.window if policy is not None else 0
        try:
            route = await asyncio.to_thread(
                write_rollback,
                self._db,
                alias.alias_id,
                alias.version,
                before=list(alias.shares),
                after=moved,
                node_id=node_id,
                error_rate=error_rate,
                requests=requests,
            )
        except Exception:
            logger.exception(
                "Alias %s: writing the rollback of node %s failed; it holds on this server only.", alias.name, node_id
            )
            return
        finally:
            alias.stats.forget(node_id)
        if route is None:
            logger.warning(
                "Alias %s: node %s was not rolled back in the store: the alias changed meanwhile, and that change "
                "stands.",
                alias.name,
                node_id,
            )
            return
        self._table.put_alias(route)
        if self._metrics is not None:
            self._metrics.rollbacks.labels(alias.name, node_id).inc()
        shares = ", ".join(f"{share.node_id}={share.percent}" for share in route.shares)
        logger.warning(
            "Alias %s: rolled back node %s, whose error rate was %.1f%% over the last %g s (%d requests); "
            "the alias now sends %s.",
            alias.name,
            node_id,
            error_rate * 100,
            window,
            requests,
            shares,
        )
