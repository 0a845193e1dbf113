"""Statuses the supervisor writes when a server starts again."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from cellnode.backends.local import LocalBackend
from cellnode.checkpoint.blobs import BlobStore
from cellnode.router.table import RoutingTable
from cellnode.store.db import Database
from cellnode.store.models import Folder, Node
from cellnode.supervisor.supervisor import Supervisor


def test_a_restart_forgets_the_last_runs_health(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.migrate()
    with db.session() as session:
        folder = Folder(name="f")
        session.add(folder)
        session.flush()
        for name, status in (
            ("a", "HEALTHY"),
            ("b", "UNHEALTHY"),
            ("c", "FAILED"),
            ("d", "CREATED"),
            ("e", "DELETING"),
        ):
            session.add(
                Node(
                    folder_id=folder.id,
                    name=name,
                    inputs=[],
                    outputs=[],
                    acl=[folder.id],
                    timeout=1.0,
                    cell_code="",
                    created_by="x",
                    status=status,
                    status_message="old",
                )
            )
    supervisor = Supervisor(
        db, LocalBackend(), BlobStore(tmp_path / "blobs"), RoutingTable(), logs_dir=tmp_path, start_timeout=1
    )
    supervisor._mark_restarting()
    with db.session() as session:
        statuses = {node.name: (node.status, node.status_message) for node in session.scalars(select(Node))}
    restarted = ("UNHEALTHY", "The server started again; starting instances.")
    assert statuses == {
        "a": restarted,
        "b": restarted,
        "c": ("FAILED", "old"),
        "d": ("CREATED", "old"),
        "e": ("DELETING", "old"),
    }
    db.close()
