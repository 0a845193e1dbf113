"""Secrets: create, list, get, update and delete a folder's secrets; the value goes in once and never comes back out.

A secret is a name and a text value in a folder. Its name is what a node's instances see it as, an environment
variable, so it is written like one: 1-63 uppercase letters, digits and underscores, not starting with a digit
(`DB_PASSWORD`). Names of variables the server itself sets in instances (`PATH`, `OMP_NUM_THREADS`, ...) and the
prefixes `CELLNODE_`, `PYTHON` and `LD_` are refused, since such a secret would be overwritten or would change how the
interpreter starts. The value is UTF-8 text of at most 64 KiB, without NUL (an environment cannot hold one).

Roles: `developer` on the folder lists and reads secrets (metadata only) and gives them to nodes; `admin` creates,
changes and deletes them. Every response shows the value as `***`; an update with a new value bumps `version`.

The value must not appear in any error either. FastAPI's validation errors quote the input they refused, so the two
bodies that carry a value are read here instead (`read_body`): errors name the field and the rule, never the value.
A secret that a node uses cannot be deleted (409 naming the nodes). A changed value reaches the instances started
after the change: a node picks it up at its next roll (`cellnode node update NODE --roll`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from cellnode.api.deps import CallerDep, ServicesDep, find_resource, resolve_folder
from cellnode.backends.zygote import PASSED_ENV
from cellnode.exceptions import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cellnode.store.models import Node, Secret, new_id
from cellnode.supervisor.specs import THREAD_VARIABLES

router = APIRouter(prefix="/cellnode/v1/secrets", tags=["secrets"])

SECRET_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,62}$")
RESERVED_NAMES = frozenset({*PASSED_ENV, *THREAD_VARIABLES, "CUDA_VISIBLE_DEVICES"})
RESERVED_PREFIXES = ("CELLNODE_", "PYTHON", "LD_")
MAX_VALUE_BYTES = 64 * 1024
Body = TypeVar("Body", bound=BaseModel)


def _secret_name(value: str) -> str:
    if not SECRET_NAME.match(value):
        hint = f"; did you mean {value.upper()!r}?" if SECRET_NAME.match(value.upper()) else ""
        raise ValueError(
            f"secret name {value!r} is not allowed: it is the name of an environment variable, so use 1-63 uppercase "
            f"letters, digits and underscores, not starting with a digit (for example 'DB_PASSWORD'){hint}"
        )
    if value in RESERVED_NAMES or value.startswith(RESERVED_PREFIXES):
        raise ValueError(
            f"secret name {value!r} is reserved: the server sets {value} (or its prefix) in instances, or it changes "
            f"how the interpreter starts; choose another name, for example 'APP_{value}'"
        )
    return value


def _secret_value(value: SecretStr | None) -> SecretStr | None:
    # The messages say what is wrong with the value, never what it is.
    if value is None:
        return None
    size = len(value.get_secret_value().encode())
    if size > MAX_VALUE_BYTES:
        raise ValueError(
            f"the value is {size} bytes of UTF-8; a secret value may be at most {MAX_VALUE_BYTES} (64 KiB)"
        )
    if "\x00" in value.get_secret_value():
        raise ValueError("the value contains a NUL character, which an environment variable cannot hold")
    return value


class _SecretBody(BaseModel):
    model_config = ConfigDict(hide_input_in_errors=True)


class SecretCreate(_SecretBody):
    name: str = Field(description="1-63 of A-Z, 0-9 and _, not starting with a digit: the variable nodes see.")
    value: SecretStr = Field(description="UTF-8 text, at most 64 KiB; never returned.")
    description: str = Field("", max_length=1024)
    folder_id: str | None = Field(None, description="Folder ID or name. Default: the caller's own.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _secret_name(value)

    @field_validator("value")
    @classmethod
    def _value(cls, value: SecretStr) -> SecretStr | None:
        return _secret_value(value)


class SecretUpdate(_SecretBody):
    """A new value (bumps `version`), a new description, or both."""

    value: SecretStr | None = Field(None, description="The new value: UTF-8 text, at most 64 KiB.")
    description: str | None = Field(None, max_length=1024)

    @field_validator("value")
    @classmethod
    def _value(cls, value: SecretStr | None) -> SecretStr | None:
        return _secret_value(value)


class SecretOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    folder_id: str
    name: str
    description: str
    value: Literal["***"] = Field("***", description="Always '***': a value is never returned after creation.")
    version: int = Field(description="1 at creation; one more at each new value.")
    created_by: str
    created_at: datetime
    updated_at: datetime


class SecretList(BaseModel):
    secrets: list[SecretOut]


async def read_body(request: Request, model: type[Body]) -> Body:
    """The request body as `model`; InvalidArgument naming each bad field and the rule, never the input."""
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidArgument("The request body is not valid JSON; send a JSON object.") from None
    if not isinstance(data, dict):
        raise InvalidArgument(
            'The request body is not a JSON object; send one, such as {"name": "DB_PASSWORD", "value": "..."}.'
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # Not `from exc`: a ValidationError holds the input, and a chained exception may end up in a log.
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(f"Invalid request: {problems}.") from None


async def _create_body(request: Request) -> SecretCreate:
    return await read_body(request, SecretCreate)


async def _update_body(request: Request) -> SecretUpdate:
    return await read_body(request, SecretUpdate)


def _documented(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its body itself."""
    schema = {"application/json": {"schema": model.model_json_schema()}}
    return {"requestBody": {"required": True, "content": schema}}


@router.post("", response_model=SecretOut, openapi_extra=_documented(SecretCreate))
def create_secret(
    svc: ServicesDep, caller: CallerDep, body: Annotated[SecretCreate, Depends(_create_body)]
) -> SecretOut:
    """Create a secret in a folder (`admin` there). The response shows the value as `***`, as every later one does."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, body.folder_id, "admin", "create secrets")
        taken = session.scalar(select(Secret.id).where(Secret.folder_id == folder.id, Secret.name == body.name))
        if taken is not None:
            raise AlreadyExists(
                f"Folder {folder.id!r} already has a secret named {body.name!r} ({taken}). Give it a new value with "
                f"'cellnode secret update {body.name} --value-file FILE', or choose another name."
            )
        secret = Secret(
            id=new_id(),
            folder_id=folder.id,
            name=body.name,
            description=body.description,
            version=1,
            created_by=caller.principal_id,
        )
        secret.nonce, secret.ciphertext = svc.secret_box.encrypt(secret.id, folder.id, body.value.get_secret_value())
        session.add(secret)
        session.flush()
        return SecretOut.model_validate(secret)


@router.get("", response_model=SecretList)
def list_secrets(svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> SecretList:
    """The secrets of a folder, without their values (`developer` there)."""
    with svc.db.session() as session:
        folder = resolve_folder(session, svc, caller, folder_id, "developer", "list secrets")
        rows = session.scalars(select(Secret).where(Secret.folder_id == folder.id).order_by(Secret.name))
        return SecretList(secrets=[SecretOut.model_validate(row) for row in rows])


@router.get("/{ref}", response_model=SecretOut)
def get_secret(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> SecretOut:
    """One secret's metadata, by ID or name (`developer` on its folder)."""
    with svc.db.session() as session:
        return SecretOut.model_validate(
            find_resource(session, svc, caller, Secret, ref, folder_id, "developer", "read secrets")
        )


@router.patch("/{ref}", response_model=SecretOut, openapi_extra=_documented(SecretUpdate))
def update_secret(
    ref: str,
    svc: ServicesDep,
    caller: CallerDep,
    body: Annotated[SecretUpdate, Depends(_update_body)],
    folder_id: str | None = None,
) -> SecretOut:
    """Give a secret a new value (bumps `version`) or description (`admin` on its folder). Instances that run keep the
    value they started with; those started from now on get the new one ('cellnode node update NODE --roll')."""
    if body.value is None and body.description is None:
        raise InvalidArgument("The update changes nothing; give a new 'value', a new 'description', or both.")
    with svc.db.session() as session:
        secret = find_resource(session, svc, caller, Secret, ref, folder_id, "admin", "change secrets")
        if body.value is not None:
            value = body.value.get_secret_value()
            secret.nonce, secret.ciphertext = svc.secret_box.encrypt(secret.id, secret.folder_id, value)
            secret.version += 1
        if body.description is not None:
            secret.description = body.description
        session.flush()
        return SecretOut.model_validate(secret)


@router.delete("/{ref}", response_model=SecretOut)
def delete_secret(ref: str, svc: ServicesDep, caller: CallerDep, folder_id: str | None = None) -> SecretOut:
    """Delete a secret (`admin` on its folder); refused while a node uses it."""
    with svc.db.session() as session:
        secret = find_resource(session, svc, caller, Secret, ref, folder_id, "admin", "delete secrets")
        users = nodes_using(session, secret.id)
        if users:
            named = ", ".join(f"{name!r} ({node_id}, folder {folder})" for node_id, name, folder in users)
            raise FailedPrecondition(
                f"Secret {secret.name!r} ({secret.id}) is used by node(s) {named}, so it cannot be deleted. Take it "
                "from each first ('cellnode node update NODE --secret OTHER ...' with the secrets it keeps, or "
                "--no-secrets), or delete those nodes."
            )
        out = SecretOut.model_validate(secret)
        session.delete(secret)
        return out


def nodes_using(session: Session, secret_id: str) -> list[tuple[str, str, str]]:
    """(ID, name, folder) of each node, not being deleted, whose instances get the secret or whose image is pulled
    with it."""
    rows = session.execute(
        select(Node.id, Node.name, Node.folder_id, Node.secrets, Node.container).where(Node.status != "DELETING")
    )
    return [
        (row.id, row.name, row.folder_id)
        for row in rows
        if secret_id in (row.secrets or []) or (row.container or {}).get("registry_password_secret") == secret_id
    ]


def resolve_secrets(session: Session, folder_id: str, refs: Sequence[str]) -> list[str]:
    """The IDs of the secrets `refs` names (IDs or names) in the folder, in order, each once; NotFound naming the first
    that is not there. A node uses only the secrets of its own folder."""
    ids: list[str] = []
    for ref in refs:
        secret = session.get(Secret, ref)
        if secret is None or secret.folder_id != folder_id:
            secret = session.scalar(select(Secret).where(Secret.folder_id == folder_id, Secret.name == ref))
        if secret is None:
            raise NotFound(
                f"Secret {ref!r} not found by ID or name in folder {folder_id!r}, the node's; a node can use only the "
                f"secrets of its own folder. 'cellnode secret list --folder {folder_id}' shows them."
            )
        ids.append(secret.id)
    return list(dict.fromkeys(ids))


def check_node_secrets(session: Session, node: Node) -> None:
    """Refuse a node that would use secrets of another folder than its own (it moved without new secrets)."""
    strays = session.scalars(select(Secret).where(Secret.id.in_(node.secrets), Secret.folder_id != node.folder_id))
    named = ", ".join(f"{secret.name!r} (folder {secret.folder_id})" for secret in strays)
    if named:
        raise InvalidArgument(
            f"Node {node.name!r} uses secret(s) {named}; in folder {node.folder_id!r} it can use only that folder's "
            "secrets. In the same update, give it secrets of that folder (--secret NAME ...) or none (--no-secrets)."
        )


def secret_names(session: Session, ids: Sequence[str]) -> list[str]:
    """The names of the secrets with these IDs, in order (an ID whose secret is gone stays an ID)."""
    if not ids:
        return []
    names = {row.id: row.name for row in session.execute(select(Secret.id, Secret.name).where(Secret.id.in_(ids)))}
    return [names.get(secret_id, secret_id) for secret_id in ids]
