"""Folders, the unit of ownership, and the access bindings that grant roles on them.

Server admins create and delete folders; a folder's admins rename it and manage who holds which role there. A folder
is deleted only once it holds nothing (the refusal names what is left), and the default folder made at first start
stays.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from cellnode.api.deps import CallerDep, ServicesDep, resolve_folder
from cellnode.api.schemas import FolderList, FolderOut, ResourceName
from cellnode.exceptions import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cellnode.iam.access import Role
from cellnode.store.models import AccessBinding, Alias, Checkpoint, Folder, Node, Principal, Secret, utcnow

router = APIRouter(prefix="/cellnode/v1/folders", tags=["folders"])


class FolderCreate(BaseModel):
    name: ResourceName
    description: str = Field("", max_length=1024)


class FolderUpdate(BaseModel):
    name: ResourceName | None = None
    description: str | None = Field(None, max_length=1024)


class BindingIn(BaseModel):
    role: Role = Field(description="viewer, developer or admin.")
    subject: str = Field(description="serviceAccount:ID or user:ID.", max_length=64)


class BindingOut(BaseModel):
    folder_id: str
    role: str
    subject: str
    name: str = Field(description="The principal's name.")
    created_at: datetime | None


class BindingList(BaseModel):
    bindings: list[BindingOut]


@router.get("", response_model=FolderList)
def list_folders(svc: ServicesDep, caller: CallerDep) -> FolderList:
    """The folders where the caller holds a role (a server admin: every folder)."""
    visible = svc.access.folders(caller)
    with svc.db.session() as session:
        folders = session.scalars(select(Folder).order_by(Folder.created_at))
        return FolderList(folders=[FolderOut.model_validate(f) for f in folders if visible is None or f.id in visible])


@router.post("", response_model=FolderOut)
def create_folder(body: FolderCreate, svc: ServicesDep, caller: CallerDep) -> FolderOut:
    """Create a folder (server admins only). Grant roles on it with access bindings."""
    svc.access.require_server_admin(caller, "create folders")
    with svc.db.session() as session:
        _check_name_free(session, body.name)
        folder = Folder(name=body.name, description=body.description)
        session.add(folder)
        session.flush()
        return FolderOut.model_validate(folder)


@router.get("/{ref}", response_model=FolderOut)
def get_folder(ref: str, svc: ServicesDep, caller: CallerDep) -> FolderOut:
    """One folder, by ID or name."""
    with svc.db.session() as session:
        return FolderOut.model_validate(resolve_folder(session, svc, caller, ref, "viewer", "read folders"))


@router.patch("/{ref}", response_model=FolderOut)
def update_folder(ref: str, body: FolderUpdate, svc: ServicesDep, caller: CallerDep) -> FolderOut:
    """Rename a folder or change its description (its admins)."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, ref, "admin", "change folders")
        if body.name is not None and body.name != folder.name:
            _check_name_free(session, body.name)
            folder.name = body.name
        if body.description is not None:
            folder.description = body.description
        session.flush()
        return FolderOut.model_validate(folder)


@router.delete("/{ref}", response_model=FolderOut)
def delete_folder(ref: str, svc: ServicesDep, caller: CallerDep) -> FolderOut:
    """Delete an empty folder (server admins only); its access bindings go with it."""
    svc.access.require_server_admin(caller, "delete folders")
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, ref, "admin", "delete folders")
        if folder.id == svc.default_folder_id:
            raise FailedPrecondition(f"Folder {folder.id!r} ({folder.name}) is the default folder; it stays.")
        held = _contents(session, folder.id)
        if held:
            raise FailedPrecondition(
                f"Folder {folder.id!r} ({folder.name}) still holds {'; '.join(held)}. Delete or move them first."
            )
        out = FolderOut.model_validate(folder)
        session.execute(delete(AccessBinding).where(AccessBinding.folder_id == folder.id))
        session.delete(folder)
    svc.access.invalidate()
    return out


@router.get("/{ref}/access-bindings", response_model=BindingList)
def list_access_bindings(ref: str, svc: ServicesDep, caller: CallerDep) -> BindingList:
    """Who holds which role on the folder."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, ref, "viewer", "list access bindings")
        rows = session.execute(
            select(AccessBinding, Principal)
            .join(Principal, Principal.id == AccessBinding.principal_id)
            .where(AccessBinding.folder_id == folder.id)
            .order_by(AccessBinding.id)
        )
        return BindingList(bindings=[_binding_out(binding, principal) for binding, principal in rows])


@router.post("/{ref}/access-bindings", response_model=BindingOut)
def add_access_binding(ref: str, body: BindingIn, svc: ServicesDep, caller: CallerDep) -> BindingOut:
    """Grant a role on the folder to a user or service account (the folder's admins)."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, ref, "admin", "manage access bindings")
        principal = find_subject(session, body.subject)
        existing = session.scalar(
            select(AccessBinding).where(
                AccessBinding.folder_id == folder.id,
                AccessBinding.role == body.role,
                AccessBinding.principal_id == principal.id,
            )
        )
        binding = existing or AccessBinding(
            folder_id=folder.id, role=body.role, principal_id=principal.id, created_at=utcnow()
        )
        session.add(binding)
        session.flush()
        out = _binding_out(binding, principal)
    svc.access.invalidate()
    return out


@router.delete("/{ref}/access-bindings", response_model=BindingOut)
def remove_access_binding(ref: str, role: Role, subject: str, svc: ServicesDep, caller: CallerDep) -> BindingOut:
    """Take a role on the folder away from a user or service account (the folder's admins)."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, ref, "admin", "manage access bindings")
        principal = find_subject(session, subject)
        binding = session.scalar(
            select(AccessBinding).where(
                AccessBinding.folder_id == folder.id,
                AccessBinding.role == role,
                AccessBinding.principal_id == principal.id,
            )
        )
        if binding is None:
            raise NotFound(
                f"{subject} holds no {role!r} binding on folder {folder.id!r}. "
                f"'cellnode folder list-access-bindings {folder.id}' shows them."
            )
        out = _binding_out(binding, principal)
        session.delete(binding)
    svc.access.invalidate()
    return out


def find_subject(session: Session, subject: str) -> Principal:
    """The principal a `serviceAccount:ID` or `user:ID` subject names."""
    kind, _, principal_id = subject.partition(":")
    if kind not in ("serviceAccount", "user") or not principal_id:
        raise InvalidArgument(
            f"Subject {subject!r} is not 'serviceAccount:ID' or 'user:ID'. "
            "'cellnode iam list-users' and 'cellnode iam list-service-accounts' show the IDs."
        )
    principal = session.get(Principal, principal_id)
    if principal is None or principal.kind != kind:
        raise NotFound(f"No {kind} has the ID {principal_id!r}.")
    return principal


def _binding_out(binding: AccessBinding, principal: Principal) -> BindingOut:
    return BindingOut(
        folder_id=binding.folder_id,
        role=binding.role,
        subject=f"{principal.kind}:{principal.id}",
        name=principal.name,
        created_at=binding.created_at,
    )


def _check_name_free(session: Session, name: str) -> None:
    taken = session.scalar(select(Folder.id).where(Folder.name == name))
    if taken is not None:
        raise AlreadyExists(f"A folder named {name!r} already exists ({taken}); choose another name.")


def _contents(session: Session, folder_id: str) -> list[str]:
    """What the folder still holds, as 'N nodes (a, b)' phrases."""
    held = []
    for model, column, noun in (
        (Node, Node.name, "node"),
        (Checkpoint, Checkpoint.id, "checkpoint"),
        (Secret, Secret.name, "secret"),
        (Alias, Alias.name, "alias"),
    ):
        names = list(session.scalars(select(column).where(model.folder_id == folder_id).limit(5)))
        if names:
            total = session.scalar(select(func.count()).select_from(model).where(model.folder_id == folder_id))
            shown = ", ".join(str(n) for n in names) + (", ..." if (total or 0) > len(names) else "")
            held.append(f"{total} {noun}(s) ({shown})")
    accounts = list(
        session.scalars(
            select(Principal.name).where(Principal.folder_id == folder_id, Principal.kind == "serviceAccount")
        )
    )
    if accounts:
        held.append(f"{len(accounts)} service account(s) ({', '.join(accounts[:5])})")
    return held
