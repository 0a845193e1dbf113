"""The supervisor's writes and reads of the store: instance rows, their uptime, node statuses and counts.

Each method is one short transaction, called in a worker thread (`asyncio.to_thread`). `statuses` mirrors the live
instances' statuses for `/metrics` without a query.
"""

from __future__ import annotations

import socket
from typing import Any

from sqlalchemy import delete, select, update

from cellnode.store.db import Database
from cellnode.store.models import Instance as InstanceRow, Node, Usage, utcnow
from cellnode.supervisor.specs import Spec

HOST = socket.gethostname()


class Records:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.statuses: dict[str, tuple[str, str]] = {}  # instance_id -> (node_id, status)

    def mark_restarting(self) -> list[tuple[str, int | None, str]]:
        """Statuses left by a previous server say nothing of instances that no longer exist: its instances turn
        UNDEFINED until they are confirmed gone. Returns them as (instance ID, pid, host)."""
        with self._db.session() as session:
            previous = [(row.id, row.pid, row.host) for row in session.scalars(select(InstanceRow))]
            session.execute(
                update(InstanceRow).values(
                    status="UNDEFINED",
                    status_since=utcnow(),
                    last_error="Left by a previous run of the server; waiting for its process to end.",
                )
            )
            # Its instances' uptime ended, at the latest, when that server was last seen alive.
            session.execute(update(Usage).where(Usage.ended_at.is_(None)).values(ended_at=Usage.last_seen_at))
            session.execute(
                update(Node)
                .where(Node.status.in_(("HEALTHY", "UNHEALTHY")))
                .values(status="UNHEALTHY", status_message="The server started again; starting instances.")
            )
        return previous

    def has_docker_nodes(self) -> bool:
        with self._db.session() as session:
            return session.scalar(select(Node.id).where(Node.container.is_not(None)).limit(1)) is not None

    def load_nodes(self) -> list[Node]:
        with self._db.session() as session:
            return list(session.scalars(select(Node)))

    def touch_usage(self) -> None:
        with self._db.session() as session:
            session.execute(update(Usage).where(Usage.ended_at.is_(None)).values(last_seen_at=utcnow()))

    def create_instance(
        self, node: Node, instance_id: str, spec: Spec, *, slot: int, zone: str, restarts: int, last_error: str
    ) -> None:
        """In one transaction: the new instance's row (CREATED; the slot's FAILED row of a last attempt goes), and
        the start of its uptime. Nothing if the node was deleted meanwhile."""
        with self._db.session() as session:
            if session.get(Node, node.id) is None:
                return
            session.execute(
                delete(InstanceRow).where(
                    InstanceRow.node_id == node.id, InstanceRow.slot == slot, InstanceRow.status == "FAILED"
                )
            )
            session.add(
                InstanceRow(
                    id=instance_id,
                    node_id=node.id,
                    slot=slot,
                    host=HOST,
                    zone=zone,
                    status="CREATED",
                    status_since=utcnow(),
                    restarts=restarts,
                    last_error=last_error,
                    generation=node.generation,
                )
            )
            session.add(
                Usage(
                    instance_id=instance_id,
                    node_id=node.id,
                    folder_id=node.folder_id,
                    spec=spec.name,
                    units_per_second=spec.units_per_second,
                )
            )
        self.statuses[instance_id] = (node.id, "CREATED")

    def write_failed(self, instance_id: str, reason: str) -> None:
        """The instance could not start: keep its row, FAILED with the reason, and end its uptime."""
        with self._db.session() as session:
            session.execute(
                update(InstanceRow)
                .where(InstanceRow.id == instance_id)
                .values(status="FAILED", status_since=utcnow(), last_error=reason, pid=None)
            )
            session.execute(
                update(Usage)
                .where(Usage.instance_id == instance_id, Usage.ended_at.is_(None))
                .values(ended_at=utcnow())
            )
        self.statuses.pop(instance_id, None)

    def write_count(self, node_id: str, count: int) -> bool:
        """The autoscaler's count, unless the node's range changed meanwhile so that it no longer fits."""
        with self._db.session() as session:
            result = session.execute(
                update(Node)
                .where(
                    Node.id == node_id,
                    Node.min_instances <= count,
                    Node.max_instances >= count,
                    Node.suspended.is_(False),
                )
                .values(instance_count=count)
            )
            return bool(getattr(result, "rowcount", 0))

    def write_rollout_error(self, node_id: str, error: str) -> None:
        with self._db.session() as session:
            session.execute(update(Node).where(Node.id == node_id).values(rollout_error=error))

    def write_instance_status(
        self, instance_id: str, status: str, pid: int | None = None, error: str | None = None
    ) -> None:
        values: dict[str, Any] = {"status": status, "status_since": utcnow()}
        if pid is not None:
            values["pid"] = pid
        if error is not None:
            values["last_error"] = error
        with self._db.session() as session:
            session.execute(update(InstanceRow).where(InstanceRow.id == instance_id).values(**values))
        known = self.statuses.get(instance_id)
        if known is not None:
            self.statuses[instance_id] = (known[0], status)

    def drop_instance(self, instance_id: str) -> None:
        """The instance is gone: forget its row and end its uptime."""
        self.statuses.pop(instance_id, None)
        with self._db.session() as session:
            session.execute(delete(InstanceRow).where(InstanceRow.id == instance_id))
            session.execute(
                update(Usage)
                .where(Usage.instance_id == instance_id, Usage.ended_at.is_(None))
                .values(ended_at=utcnow())
            )

    def write_node_status(self, node_id: str, status: str, message: str) -> None:
        # One conditional UPDATE: a delete that lands meanwhile is never overwritten.
        with self._db.session() as session:
            session.execute(
                update(Node)
                .where(Node.id == node_id, Node.status != "DELETING")
                .values(status=status, status_message=message, updated_at=utcnow())
            )

    def drop_node(self, node_id: str) -> None:
        with self._db.session() as session:
            session.execute(delete(InstanceRow).where(InstanceRow.node_id == node_id))
            node = session.get(Node, node_id)
            if node is not None:
                session.delete(node)
