"""What route handlers share: the server's services and the authenticated caller."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.types import Scope

from cellnode.checkpoint.blobs import BlobStore
from cellnode.config import Settings
from cellnode.exceptions import NotFound, PermissionDenied
from cellnode.iam.access import Access, Role
from cellnode.iam.audit import AuditLog
from cellnode.iam.credentials import Authenticator, Caller
from cellnode.iam.secrets import SecretBox
from cellnode.router.table import RoutingTable
from cellnode.store.db import Database
from cellnode.store.models import Checkpoint, Folder, Node, Secret
from cellnode.supervisor.specs import Spec
from cellnode.supervisor.supervisor import Supervisor
from cellnode.telemetry.metrics import Metrics


@dataclass
class Services:
    """Everything a running server holds; built by the lifespan, reached from `app.state.services`."""

    settings: Settings
    db: Database
    auth: Authenticator
    access: Access
    blobs: BlobStore
    table: RoutingTable
    supervisor: Supervisor
    default_folder_id: str
    captures: ThreadPoolExecutor  # capture kernels run here, at most `max_captures` at once
    blob_lock: threading.Lock  # held while blobs move in or are collected
    metrics: Metrics
    specs: dict[str, Spec]  # the instance spec table in force
    gpus: int  # GPUs on this machine, counted at start
    zones: tuple[str, ...]  # of the backend
    audit: AuditLog  # management actions and denied requests; see cellnode/iam/audit.py
    secret_box: SecretBox  # encrypts secret values under the master key


def services(request: Request) -> Services:
    result: Services = request.app.state.services
    return result


def caller(request: Request) -> Caller:
    """The authenticated caller (401 otherwise), with the role cache fresh for the checks the route makes.

    The execute front authenticates every `/cellnode/v1/` request before FastAPI reads its body, and leaves the caller
    in `request.state.caller` (which the audit log reads too); other routes (`/metrics`) authenticate here.
    """
    svc = services(request)
    who = getattr(request.state, "caller", None)
    if not isinstance(who, Caller):
        who = svc.auth.authenticate_sync(request.headers.get("authorization"), client_of(request.scope))
        request.state.caller = who
    svc.access.refresh()
    return who


def client_of(scope: Scope) -> str:
    """The client's address, as the connection gives it (no proxy header is trusted); empty when unknown."""
    client = scope.get("client")
    return str(client[0]) if client else ""


Resource = TypeVar("Resource", Checkpoint, Node, Secret)
ServicesDep = Annotated[Services, Depends(services)]
CallerDep = Annotated[Caller, Depends(caller)]


def resolve_folder(
    session: Session, svc: Services, who: Caller, folder_id: str | None, role: Role, action: str
) -> Folder:
    """The folder a request names (by ID or name), or the caller's own (a service account's folder, else the
    default one), once the caller is known to hold `role` on it."""
    wanted = folder_id or who.folder_id or svc.default_folder_id
    folder = session.get(Folder, wanted) or session.scalar(select(Folder).where(Folder.name == wanted))
    if folder is None:
        raise NotFound(f"Folder {wanted!r} not found. 'cellnode folder list' shows the folders you can see.")
    if folder_id is None and svc.access.role(who, folder.id) is None:
        raise PermissionDenied(
            f"The request names no folder, and you have no role on folder {folder.id!r} ({folder.name}), the one it "
            "would use. Name a folder you work in (--folder, or 'folder_id'); 'cellnode folder list' shows them."
        )
    svc.access.require(who, folder.id, role, action)
    return folder


def find_resource(
    session: Session,
    svc: Services,
    who: Caller,
    model: type[Resource],
    ref: str,
    folder_id: str | None,
    role: Role,
    action: str,
) -> Resource:
    """A resource by ID (in any folder), or by name in the folder the request names (or the caller's own), once
    the caller is known to hold `role` on its folder. One in a folder the caller has no role on is not found."""
    noun = model.__name__.lower()
    found = session.get(model, ref)
    if found is not None and svc.access.role(who, found.folder_id) is None:
        found = None  # Its existence is not the caller's to learn: answer as for an ID that does not exist.
    if found is None:
        folder = resolve_folder(session, svc, who, folder_id, "viewer", f"look up {noun}s")
        found = session.scalar(select(model).where(model.folder_id == folder.id, model.name == ref))
        if found is None:
            raise NotFound(
                f"{model.__name__} {ref!r} not found in folder {folder.id!r} by ID or name. "
                f"'cellnode {noun} list' shows the {noun}s."
            )
    svc.access.require(who, found.folder_id, role, action)
    return found
