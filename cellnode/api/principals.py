"""Principals and their credentials: users, service accounts, API keys.

Users are the server's (server admins manage them); a service account lives in a folder (that folder's admins manage
it). A principal's API keys are shown once, at creation, and stored only as hashes; a revoked key stops working at
once on this server, and so do the IAM tokens made from it. Deleting a principal revokes its keys and removes its
access bindings. The last server admin cannot be deleted.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cellnode.api.deps import CallerDep, Services, ServicesDep, resolve_folder
from cellnode.api.schemas import ResourceName
from cellnode.exceptions import AlreadyExists, FailedPrecondition, NotFound
from cellnode.iam.credentials import Caller, digest, new_api_key
from cellnode.store.models import AccessBinding, ApiKey, IamToken, Principal, utcnow

router = APIRouter(prefix="/cellnode/v1/iam", tags=["iam"])


class UserCreate(BaseModel):
    name: ResourceName
    description: str = Field("", max_length=1024)
    server_admin: bool = Field(False, description="Admin on every folder; manages folders and users.")


class ServiceAccountCreate(BaseModel):
    name: ResourceName
    folder_id: str | None = Field(None, description="The folder it lives in; default: the caller's.")
    description: str = Field("", max_length=1024)


class PrincipalOut(BaseModel):
    id: str
    kind: str
    subject: str = Field(description="How access bindings name it: serviceAccount:ID or user:ID.")
    name: str
    folder_id: str | None
    description: str
    server_admin: bool
    created_at: datetime


class PrincipalList(BaseModel):
    principals: list[PrincipalOut]


class WhoAmI(PrincipalOut):
    roles: dict[str, str] = Field(description="Folder ID -> the highest role held there.")


class ApiKeyCreate(BaseModel):
    principal_id: str | None = Field(None, description="Whose key; default: the caller's own.")
    description: str = Field("", max_length=1024)


class ApiKeyOut(BaseModel):
    id: str
    principal_id: str
    description: str
    created_at: datetime
    revoked_at: datetime | None


class NewApiKey(ApiKeyOut):
    secret: str = Field(description="The key itself: shown this once, never again. Send it as 'Api-Key <secret>'.")


class ApiKeyList(BaseModel):
    api_keys: list[ApiKeyOut]


@router.get("/whoami", response_model=WhoAmI)
def whoami(svc: ServicesDep, caller: CallerDep) -> WhoAmI:
    """The caller, and its roles."""
    with svc.db.session() as session:
        principal = session.get(Principal, caller.principal_id)
        assert principal is not None, "an authenticated caller exists"
        folders = svc.access.folders(caller)
        roles: dict[str, str] = {}
        for folder in sorted(folders if folders is not None else []):
            roles[folder] = svc.access.role(caller, folder) or ""
        return WhoAmI(**_out(principal).model_dump(), roles=roles)


@router.post("/users", response_model=PrincipalOut)
def create_user(body: UserCreate, svc: ServicesDep, caller: CallerDep) -> PrincipalOut:
    """Create a user (server admins only); give it an API key and access bindings next."""
    svc.access.require_server_admin(caller, "create users")
    with svc.db.session() as session:
        taken = session.scalar(select(Principal.id).where(Principal.kind == "user", Principal.name == body.name))
        if taken is not None:
            raise AlreadyExists(f"A user named {body.name!r} already exists ({taken}); choose another name.")
        user = Principal(kind="user", name=body.name, description=body.description, server_admin=body.server_admin)
        session.add(user)
        session.flush()
        out = _out(user)
    svc.access.invalidate()
    return out


@router.get("/users", response_model=PrincipalList)
def list_users(svc: ServicesDep, caller: CallerDep) -> PrincipalList:
    """The users of this server (server admins only)."""
    svc.access.require_server_admin(caller, "list users")
    with svc.db.session() as session:
        rows = session.scalars(select(Principal).where(Principal.kind == "user").order_by(Principal.created_at))
        return PrincipalList(principals=[_out(row) for row in rows])


@router.delete("/users/{user_id}", response_model=PrincipalOut)
def delete_user(user_id: str, svc: ServicesDep, caller: CallerDep) -> PrincipalOut:
    """Delete a user (server admins only): its keys and tokens stop working and its bindings go."""
    svc.access.require_server_admin(caller, "delete users")
    with svc.db.session() as session:
        user = session.get(Principal, user_id)
        if user is None or user.kind != "user":
            raise NotFound(f"No user has the ID {user_id!r}. 'cellnode iam list-users' shows them.")
        return _delete(session, svc, user)


@router.post("/service-accounts", response_model=PrincipalOut)
def create_service_account(body: ServiceAccountCreate, svc: ServicesDep, caller: CallerDep) -> PrincipalOut:
    """Create a service account in a folder (the folder's admins). It may call the folder's nodes at once."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, body.folder_id, "admin", "create service accounts")
        taken = session.scalar(
            select(Principal.id).where(
                Principal.kind == "serviceAccount", Principal.folder_id == folder.id, Principal.name == body.name
            )
        )
        if taken is not None:
            raise AlreadyExists(
                f"Folder {folder.id!r} already has a service account named {body.name!r} ({taken}); choose another."
            )
        account = Principal(kind="serviceAccount", name=body.name, folder_id=folder.id, description=body.description)
        session.add(account)
        session.flush()
        return _out(account)


@router.get("/service-accounts", response_model=PrincipalList)
def list_service_accounts(svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> PrincipalList:
    """The service accounts that live in a folder."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, folder_id, "viewer", "list service accounts")
        rows = session.scalars(
            select(Principal)
            .where(Principal.kind == "serviceAccount", Principal.folder_id == folder.id)
            .order_by(Principal.created_at)
        )
        return PrincipalList(principals=[_out(row) for row in rows])


@router.delete("/service-accounts/{account_id}", response_model=PrincipalOut)
def delete_service_account(account_id: str, svc: ServicesDep, caller: CallerDep) -> PrincipalOut:
    """Delete a service account (its folder's admins): its keys and tokens stop working and its bindings go."""
    with svc.db.session() as session:
        account = _find_account(session, svc, caller, account_id)
        svc.access.require(caller, str(account.folder_id), "admin", "delete service accounts")
        return _delete(session, svc, account)


@router.post("/api-keys", response_model=NewApiKey)
def create_api_key(body: ApiKeyCreate, svc: ServicesDep, caller: CallerDep) -> NewApiKey:
    """A new API key for the caller, or for a principal the caller manages; the secret is in this answer only."""
    with svc.db.session() as session:
        owner = _manageable(session, svc, caller, body.principal_id or caller.principal_id, "create API keys for")
        secret = new_api_key()
        key = ApiKey(principal_id=owner.id, secret_hash=digest(secret), description=body.description)
        session.add(key)
        session.flush()
        return NewApiKey(**_key_out(key).model_dump(), secret=secret)


@router.get("/api-keys", response_model=ApiKeyList)
def list_api_keys(svc: ServicesDep, caller: CallerDep, principal_id: str | None = None) -> ApiKeyList:
    """The API keys of the caller, or of a principal the caller manages (never their secrets)."""
    with svc.db.session() as session:
        owner = _manageable(session, svc, caller, principal_id or caller.principal_id, "list the API keys of")
        rows = session.scalars(select(ApiKey).where(ApiKey.principal_id == owner.id).order_by(ApiKey.created_at))
        return ApiKeyList(api_keys=[_key_out(row) for row in rows])


@router.delete("/api-keys/{key_id}", response_model=ApiKeyOut)
def revoke_api_key(key_id: str, svc: ServicesDep, caller: CallerDep) -> ApiKeyOut:
    """Revoke an API key, and with it every IAM token made from it."""
    with svc.db.session() as session:
        key = session.get(ApiKey, key_id)
        if key is None:
            raise NotFound(f"No API key has the ID {key_id!r}. 'cellnode iam list-api-keys' shows yours.")
        _manageable(session, svc, caller, key.principal_id, "revoke the API keys of")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
        session.flush()
        out = _key_out(key)
    svc.auth.forget()
    return out


def _manageable(session: Session, svc: Services, caller: Caller, principal_id: str, action: str) -> Principal:
    """The principal, if the caller is it or manages it: a server admin manages everyone, a folder's admin the
    service accounts that live there."""
    principal = session.get(Principal, principal_id)
    if principal is None:
        raise NotFound(f"No user or service account has the ID {principal_id!r}.")
    if principal.id == caller.principal_id or svc.access.is_server_admin(caller):
        return principal
    if principal.kind == "serviceAccount" and principal.folder_id is not None:
        svc.access.require(caller, principal.folder_id, "admin", f"{action} service accounts")
        return principal
    svc.access.require_server_admin(caller, f"{action} other users")
    return principal


def _find_account(session: Session, svc: Services, caller: Caller, account_id: str) -> Principal:
    account = session.get(Principal, account_id)
    if account is None or account.kind != "serviceAccount" or svc.access.role(caller, str(account.folder_id)) is None:
        raise NotFound(
            f"No service account has the ID {account_id!r} in a folder you can see. "
            "'cellnode iam list-service-accounts --folder F' shows them."
        )
    return account


def _delete(session: Session, svc: Services, principal: Principal) -> PrincipalOut:
    if principal.server_admin:
        admins = session.scalars(select(Principal.id).where(Principal.server_admin.is_(True))).all()
        if admins == [principal.id]:
            raise FailedPrecondition(
                f"{subject_of(principal)} is the last server admin; make another one first "
                "('cellnode iam create-user NAME --server-admin')."
            )
    out = _out(principal)
    key_ids = select(ApiKey.id).where(ApiKey.principal_id == principal.id)
    session.execute(delete(IamToken).where(IamToken.principal_id == principal.id))
    session.execute(delete(IamToken).where(IamToken.api_key_id.in_(key_ids)))
    session.execute(delete(ApiKey).where(ApiKey.principal_id == principal.id))
    session.execute(delete(AccessBinding).where(AccessBinding.principal_id == principal.id))
    session.delete(principal)
    session.flush()
    svc.auth.forget()
    svc.access.invalidate()
    return out


def subject_of(principal: Principal) -> str:
    return f"{principal.kind}:{principal.id}"


def _out(principal: Principal) -> PrincipalOut:
    return PrincipalOut(
        id=principal.id,
        kind=principal.kind,
        subject=subject_of(principal),
        name=principal.name,
        folder_id=principal.folder_id,
        description=principal.description,
        server_admin=principal.server_admin,
        created_at=principal.created_at,
    )


def _key_out(key: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(
        id=key.id,
        principal_id=key.principal_id,
        description=key.description,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
    )
