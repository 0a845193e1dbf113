"""Statuses the supervisor writes when a server starts again."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from cellnode.backends.local import LocalBackend
from cellnode.checkpoint.blobs import BlobStore
from cellnode.router.table import RoutingTable
from cellnode.store.db import Database
from cellnode.store.models import Folder, Node
from cellnode.supervisor.records import Records
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
    Records(db).mark_restarting()
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


def test_a_previous_runs_instances_are_undefined_until_their_processes_end(tmp_path: Path) -> None:
    import asyncio
    import subprocess

    from cellnode.store.models import Instance
    from cellnode.supervisor.records import HOST

    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.migrate()
    lingering = subprocess.Popen(["sleep", "30"])
    with db.session() as session:
        folder = Folder(name="f")
        session.add(folder)
        session.flush()
        node = Node(
            folder_id=folder.id, name="a", inputs=[], outputs=[], acl=[], timeout=1.0, cell_code="", created_by="x"
        )
        session.add(node)
        session.flush()
        session.add(Instance(id="gone", node_id=node.id, slot=0, status="HEALTHY", pid=None, host=HOST))
        session.add(Instance(id="lingering", node_id=node.id, slot=1, status="HEALTHY", pid=lingering.pid, host=HOST))
    supervisor = Supervisor(
        db, LocalBackend(), BlobStore(tmp_path / "blobs"), RoutingTable(), logs_dir=tmp_path, start_timeout=1
    )
    previous = supervisor._records.mark_restarting()
    with db.session() as session:
        rows = {row.id: (row.status, row.last_error) for row in session.scalars(select(Instance))}
    assert {status for status, _ in rows.values()} == {"UNDEFINED"}
    assert "previous run" in rows["lingering"][1]

    async def forget() -> set[str]:
        task = asyncio.create_task(supervisor._forget_previous(previous))
        await asyncio.sleep(0.5)
        with db.session() as session:
            left = {row.id for row in session.scalars(select(Instance))}
        lingering.kill()
        lingering.wait()
        await task
        return left

    assert asyncio.run(forget()) == {"lingering"}, "the row stays while its process runs"
    with db.session() as session:
        assert list(session.scalars(select(Instance))) == []
    db.close()
