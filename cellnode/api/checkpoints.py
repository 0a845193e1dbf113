"""Checkpoints: capture a notebook's state in a kernel, list, get, pin, unpin, delete.

Limits from the reference platform: at most 10 pinned and 10 unpinned checkpoints per folder; an 11th unpinned
one evicts the oldest unpinned one; only pinned checkpoints back nodes, and a checkpoint that backs a node can be
neither unpinned nor deleted.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cellnode.api.deps import CallerDep, Services, ServicesDep, find_resource, resolve_folder
from cellnode.api.schemas import CheckpointCreate, CheckpointList, CheckpointOut, PinRequest
from cellnode.checkpoint.capture import Capture, capture
from cellnode.checkpoint.notebook import read_notebook
from cellnode.exceptions import AlreadyExists, FailedPrecondition
from cellnode.iam.access import Role
from cellnode.iam.credentials import Caller
from cellnode.store.models import Checkpoint, Folder, Node

router = APIRouter(prefix="/cellnode/v1/checkpoints", tags=["checkpoints"])

MAX_PINNED = 10
MAX_UNPINNED = 10


@router.post("", response_model=CheckpointOut)
async def create_checkpoint(body: CheckpointCreate, svc: ServicesDep, caller: CallerDep) -> CheckpointOut:
    """Run code cells 1..K of the notebook in a fresh kernel and save its user namespace as a checkpoint."""
    folder = await asyncio.to_thread(_folder_for_create, svc, caller, body)
    notebook = await asyncio.to_thread(read_notebook, body.notebook.encode(), body.notebook_name)
    tmp_root = svc.settings.data_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Staging beside the blobs (one filesystem, so blobs move in by rename); the kernel's working directory
    # outside the data directory.
    staging = Path(tempfile.mkdtemp(prefix="capture-", dir=tmp_root))
    workdir = Path(tempfile.mkdtemp(prefix="cellnode-kernel-"))
    try:
        # On its own event loop, on a bounded pool of capture threads: nbclient replaces the process's
        # SIGINT/SIGTERM handlers when it runs on the main thread (leaving the defaults behind, which kills graceful
        # shutdown); the kernel's traffic stays off the loop that serves requests; and captures never take the
        # threads that credential lookups and status writes need.
        run = functools.partial(
            capture,
            notebook,
            cell=body.cell,
            staging_dir=staging,
            timeout=svc.settings.capture_timeout,
            cwd=workdir,
            env=kernel_env(),
        )
        result = await asyncio.get_running_loop().run_in_executor(svc.captures, lambda: asyncio.run(run()))
        return await asyncio.to_thread(_store, svc, caller, folder.id, body, result)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


@router.get("", response_model=CheckpointList)
def list_checkpoints(svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> CheckpointList:
    """The checkpoints of a folder, newest first."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, folder_id, "viewer", "list checkpoints")
        rows = session.scalars(
            select(Checkpoint).where(Checkpoint.folder_id == folder.id).order_by(Checkpoint.created_at.desc())
        )
        return CheckpointList(checkpoints=[_out(row) for row in rows])


@router.get("/{ref}", response_model=CheckpointOut)
def get_checkpoint(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> CheckpointOut:
    """One checkpoint, by ID or pinned name."""
    with svc.db.session() as session:
        return _out(find_checkpoint(session, svc, caller, ref, folder_id, "viewer", "read checkpoints"))


@router.post("/{ref}:pin", response_model=CheckpointOut)
def pin_checkpoint(
    ref: str, body: PinRequest, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None
) -> CheckpointOut:
    """Pin a checkpoint under a name (or rename a pinned one); pinned checkpoints are never evicted."""
    with svc.db.session() as session:
        checkpoint = find_checkpoint(session, svc, caller, ref, folder_id, "developer", "pin checkpoints")
        if checkpoint.name != body.name:
            _check_name_free(session, checkpoint.folder_id, body.name)
        if checkpoint.pinned_at is None:
            _check_pinned_room(session, checkpoint.folder_id)
            checkpoint.pinned_at = datetime.now(UTC)
        checkpoint.name = body.name
        session.flush()
        return _out(checkpoint)


@router.post("/{ref}:unpin", response_model=CheckpointOut)
def unpin_checkpoint(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> CheckpointOut:
    """Unpin a checkpoint; refused while it backs a node. If that makes 11 unpinned, the oldest other one goes."""
    with svc.db.session() as session:
        checkpoint = find_checkpoint(session, svc, caller, ref, folder_id, "developer", "unpin checkpoints")
        _check_unused(session, checkpoint, "unpinned")
        checkpoint.name, checkpoint.pinned_at = None, None
        session.flush()
        evicted, shas = _evict(session, checkpoint.folder_id, keep=checkpoint.id)
        out = _out(checkpoint, evicted)
    collect_blobs(svc, shas)
    return out


@router.delete("/{ref}", response_model=CheckpointOut)
def delete_checkpoint(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> CheckpointOut:
    """Delete a checkpoint and the blobs no other checkpoint uses; refused while it backs a node."""
    with svc.db.session() as session:
        checkpoint = find_checkpoint(session, svc, caller, ref, folder_id, "developer", "delete checkpoints")
        _check_unused(session, checkpoint, "deleted")
        out = _out(checkpoint)
        shas = {v["sha256"] for v in checkpoint.variables}
        session.delete(checkpoint)
    collect_blobs(svc, shas)
    return out


def find_checkpoint(
    session: Session, svc: Services, caller: Caller, ref: str, folder_id: str | None, role: Role, action: str
) -> Checkpoint:
    """A checkpoint by ID, or by pinned name in the folder."""
    return find_resource(session, svc, caller, Checkpoint, ref, folder_id, role, action)


def kernel_env() -> dict[str, str]:
    """The capture kernel's environment: the server's, less its own settings and credentials."""
    return {key: value for key, value in os.environ.items() if not key.startswith("CELLNODE_")}


def _folder_for_create(svc: Services, caller: Caller, body: CheckpointCreate) -> Folder:
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, body.folder_id, "developer", "create checkpoints")
        if body.name is not None:
            _check_name_free(session, folder.id, body.name)
            _check_pinned_room(session, folder.id)
        return folder


def _store(svc: Services, caller: Caller, folder_id: str, body: CheckpointCreate, result: Capture) -> CheckpointOut:
    """Move the blobs in and save the row, under the blob lock, so that no collection can take the blobs between."""
    shas = {v.sha256 for v in result.variables}
    with svc.blob_lock:
        # Variables with equal values share one blob: move each distinct blob in once.
        for sha256, path in {v.sha256: v.path for v in result.variables}.items():
            svc.blobs.put_file(path, sha256)
        try:
            out, evicted_shas = _save(svc, caller, folder_id, body, result)
        except BaseException:
            _collect_unlocked(svc, shas)  # the blobs this capture brought and nothing else uses
            raise
        _collect_unlocked(svc, evicted_shas)
    return out


def _save(
    svc: Services, caller: Caller, folder_id: str, body: CheckpointCreate, result: Capture
) -> tuple[CheckpointOut, set[str]]:
    with svc.db.session() as session:
        if body.name is not None:
            # Checked again: another request may have taken the name while the kernel ran.
            _check_name_free(session, folder_id, body.name)
            _check_pinned_room(session, folder_id)
        checkpoint = Checkpoint(
            folder_id=folder_id,
            name=body.name,
            notebook_name=body.notebook_name,
            cell=result.cell,
            cell_source=result.cell_source,
            variables=[{"name": v.name, "type": v.type, "size": v.size, "sha256": v.sha256} for v in result.variables],
            imports=dict(result.imports),
            unserializable=[{"name": u.name, "type": u.type, "reason": u.reason} for u in result.unserializable],
            python_version=result.python_version,
            packages=list(result.packages),
            stdout=result.stdout,
            created_by=caller.principal_id,
            pinned_at=datetime.now(UTC) if body.name else None,
        )
        session.add(checkpoint)
        session.flush()
        evicted, shas = _evict(session, folder_id, keep=checkpoint.id)
        return _out(checkpoint, evicted), shas


def _evict(session: Session, folder_id: str, *, keep: str) -> tuple[list[str], set[str]]:
    """Delete the oldest unpinned checkpoints past the limit, never `keep`; their IDs and blobs to collect."""
    unpinned = list(
        session.scalars(
            select(Checkpoint)
            .where(Checkpoint.folder_id == folder_id, Checkpoint.pinned_at.is_(None), Checkpoint.id != keep)
            .order_by(Checkpoint.created_at.desc())
        )
    )
    is_kept_unpinned = session.scalar(
        select(Checkpoint.id).where(Checkpoint.id == keep, Checkpoint.pinned_at.is_(None))
    )
    evicted = unpinned[MAX_UNPINNED - (1 if is_kept_unpinned else 0) :]
    shas: set[str] = set()
    for old in evicted:
        shas.update(v["sha256"] for v in old.variables)
        session.delete(old)
    return [old.id for old in evicted], shas


def collect_blobs(svc: Services, shas: set[str]) -> None:
    """After a commit: delete the blobs among `shas` that no checkpoint uses any more."""
    if shas:
        with svc.blob_lock:
            _collect_unlocked(svc, shas)


def _collect_unlocked(svc: Services, shas: set[str]) -> None:
    if not shas:
        return
    with svc.db.session() as session:
        rows: list[list[Any]] = list(session.scalars(select(Checkpoint.variables)))
    in_use = {v["sha256"] for variables in rows for v in variables}
    for sha in shas - in_use:
        svc.blobs.delete(sha)


def _check_name_free(session: Session, folder_id: str, name: str) -> None:
    taken = session.scalar(select(Checkpoint.id).where(Checkpoint.folder_id == folder_id, Checkpoint.name == name))
    if taken is not None:
        raise AlreadyExists(
            f"Folder {folder_id!r} already has a checkpoint named {name!r} ({taken}). Choose another name, "
            f"or unpin or delete {taken} first."
        )


def _check_pinned_room(session: Session, folder_id: str) -> None:
    count = session.scalar(
        select(func.count())
        .select_from(Checkpoint)
        .where(Checkpoint.folder_id == folder_id, Checkpoint.pinned_at.is_not(None))
    )
    if (count or 0) >= MAX_PINNED:
        raise FailedPrecondition(
            f"Folder {folder_id!r} already has {MAX_PINNED} pinned checkpoints, the limit. "
            "Unpin or delete one first ('cellnode checkpoint list')."
        )


def _check_unused(session: Session, checkpoint: Checkpoint, action: str) -> None:
    nodes = list(session.scalars(select(Node).where(Node.checkpoint_id == checkpoint.id)))
    if nodes:
        names = ", ".join(f"{n.name} ({n.id})" for n in nodes)
        raise FailedPrecondition(
            f"Checkpoint {checkpoint.id!r} backs node(s) {names}, so it cannot be {action}. Delete the node(s) first."
        )


def _out(checkpoint: Checkpoint, evicted: list[str] | None = None) -> CheckpointOut:
    out = CheckpointOut.model_validate(
        {
            **{c.key: getattr(checkpoint, c.key) for c in Checkpoint.__table__.columns},
            "pinned": bool(checkpoint.pinned_at),
        }
    )
    out.evicted = evicted or []
    return out
