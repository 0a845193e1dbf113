"""Folders (minimal: the IAM issue adds create, update, delete)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from cellnode.api.deps import CallerDep, ServicesDep
from cellnode.api.schemas import FolderList, FolderOut
from cellnode.store.models import Folder

router = APIRouter(prefix="/cellnode/v1/folders", tags=["folders"])


@router.get("", response_model=FolderList)
def list_folders(svc: ServicesDep, caller: CallerDep) -> FolderList:
    """The folders where the caller holds a role (a server admin: every folder)."""
    visible = svc.access.folders(caller)
    with svc.db.session() as session:
        folders = session.scalars(select(Folder).order_by(Folder.created_at))
        return FolderList(
            folders=[
                FolderOut.model_validate(f, from_attributes=True) for f in folders if visible is None or f.id in visible
            ]
        )
