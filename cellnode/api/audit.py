"""The audit log over HTTP: the middleware that records requests, and `GET /cellnode/v1/audit` that reads them back.

`AuditMiddleware` wraps the FastAPI app (after routing, it reads `scope["route"]`) and records every management
request that changes state (POST, PUT, PATCH, DELETE under `/cellnode/v1/`) and every request answered 401 or 403 on
any route. Everything else passes through untouched. A row is queued before the last byte of the answer is sent, so a
client that has its answer finds the row. Two kinds of request never reach this middleware; `ExecuteFront`
(`cellnode/api/execute.py`) records them where it answers them: denied execute calls (successful ones are counted by
the metrics, not logged), and management requests refused before routing for a bad credential or an oversized body
(through `record_refused`).

Of a change answered 2xx with JSON, the middleware reads the `id` and `folder_id` fields (and nothing else), so that
the row names the folder and, for a create, the new resource. See docs/audit.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from urllib.parse import parse_qs

import orjson
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cellnode.api.deps import CallerDep, Services, ServicesDep, client_of
from cellnode.exceptions import InvalidArgument, TooManyFailures
from cellnode.iam.audit import CHANGES, DENIED, describe
from cellnode.iam.credentials import Caller
from cellnode.store.models import AuditEvent, Folder

router = APIRouter(prefix="/cellnode/v1", tags=["audit"])

MANAGEMENT_PREFIX = router.prefix + "/"
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
MAX_ANSWER_BYTES = 256 * 1024  # an answer past this is not read for its ID
JSON = b"application/json"
THROTTLED = TooManyFailures.status_code


class AuditEventOut(BaseModel):
    id: int
    at: datetime
    principal_id: str | None
    subject: str
    action: str
    resource: str
    folder_id: str | None
    result: str
    code: int
    client: str
    request_id: str


class AuditList(BaseModel):
    events: list[AuditEventOut]


@router.get("/audit", response_model=AuditList)
def list_events(
    svc: ServicesDep,
    caller: CallerDep,
    folder_id: str | None = None,
    since: datetime | None = None,
    limit: int = DEFAULT_LIMIT,
) -> AuditList:
    """Audit events, newest first: of one folder (you need `admin` on it), or of every folder you are an admin of
    (a server admin: every event, those of no folder included)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(
            f"'limit' must be from 1 to {MAX_LIMIT}; got {limit}. Ask for at most {MAX_LIMIT} of the newest events, "
            "and narrow them with 'since' or 'folder_id'."
        )
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    svc.audit.flush()  # the rows of requests already answered, this one's caller's included
    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    with svc.db.session() as session:
        if folder_id:
            query = query.where(AuditEvent.folder_id == _folder_id(session, svc, caller, folder_id))
        elif (visible := svc.access.folders(caller)) is not None:
            administered = [folder for folder in visible if svc.access.has(caller, folder, "admin")]
            query = query.where(AuditEvent.folder_id.in_(administered))
        rows = list(session.scalars(query))
    return AuditList(events=[AuditEventOut.model_validate(row, from_attributes=True) for row in rows])


def _folder_id(session: Session, svc: Services, caller: Caller, ref: str) -> str:
    """The ID of the folder named (by ID or name), once the caller is known to be its admin. A server admin may name
    the ID of a folder since deleted; anyone else learns nothing about a folder they do not administer."""
    folder = session.get(Folder, ref) or session.scalar(select(Folder).where(Folder.name == ref))
    folder_id: str = folder.id if folder is not None else ref
    svc.access.require(caller, folder_id, "admin", "read the audit log")
    return folder_id


class AuditMiddleware:
    """Records management changes and denied requests that FastAPI routed; see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_change = scope["method"] in CHANGES and scope["path"].startswith(MANAGEMENT_PREFIX)
        status = 0
        request_id = ""
        answer: bytearray | None = None  # a change's JSON answer, while it is read
        recorded = False

        def finish(code: int, body: bytes | None) -> None:
            nonlocal recorded
            recorded = True
            if is_change or code in DENIED:
                services: Services = scope["app"].state.services
                _record(services, scope, code, request_id, body)

        async def watch(message: Message) -> None:
            nonlocal status, request_id, answer
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers", ()))
                request_id = headers.get(b"x-request-id", b"").decode("latin-1")
                if is_change and 200 <= status < 300 and headers.get(b"content-type", b"").startswith(JSON):
                    answer = bytearray()
            elif message["type"] == "http.response.body":
                if answer is not None:
                    answer += message.get("body", b"")
                    if len(answer) > MAX_ANSWER_BYTES:
                        answer = None
                if not message.get("more_body", False):
                    finish(status, None if answer is None else bytes(answer))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if not recorded:
                finish(status or 500, None)  # ServerErrorMiddleware, outside us, answers 500
            raise
        finally:
            if not recorded and status:  # the client went away before the answer ended
                finish(status, None)


def record_refused(app: FastAPI, scope: Scope, code: int) -> None:
    """Record a management request refused before routing (bad credential, body too large), if the log keeps it.

    The guard answers 429 only to a client throttled for failed authentications: that is a denial too."""
    denied = code in DENIED or code == THROTTLED
    if not denied and scope["method"] not in CHANGES:
        return
    for route in _routes(app.router.routes):
        match, child = route.matches(scope)
        if match is Match.FULL:
            scope = {**scope, **child, "route": route}
            break
    _record(app.state.services, scope, code, "", None, result="denied" if denied else None)


def _routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, those of included routers too (a recent FastAPI keeps an included router as one route)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes(included.routes)
        else:
            yield route


def _record(
    svc: Services, scope: Scope, code: int, request_id: str, answer: bytes | None, *, result: str | None = None
) -> None:
    """Queue the row of a routed (or matched) request: its action and resource from the route, its folder from the
    answer, the path or the query, its caller from `request.state.caller`."""
    method: str = scope["method"]
    route = scope.get("route")
    template: str | None = getattr(route, "path", None)
    methods: set[str] | None = getattr(route, "methods", None)
    if template is None or (methods is not None and method not in methods):
        # No route took it (404, or 405 for the method): the raw path names it.
        action, resource, folder = f"{method} {scope['path']}", "", None
    else:
        target = describe(method, template, scope.get("path_params", {}))
        action, resource, folder = target.action, target.resource, target.folder
        fields = _fields(answer) if answer is not None else {}
        new_id = fields.get("id")
        if new_id and target.is_create:
            resource = "/".join(part for part in (resource, f"{target.noun}/{new_id}") if part)
            if target.noun == "folder":
                folder = new_id
        folder = fields.get("folder_id") or folder
    caller = scope.get("state", {}).get("caller")
    svc.audit.record(
        action=action,
        code=code,
        resource=resource,
        folder=folder or _query_folder(scope),
        caller=caller if isinstance(caller, Caller) else None,
        client=client_of(scope),
        request_id=request_id,
        result=result,
    )


def _fields(answer: bytes) -> dict[str, str]:
    """The `id` and `folder_id` of a JSON answer, if they are strings; nothing else is kept."""
    try:
        data = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: data[key] for key in ("id", "folder_id") if isinstance(data.get(key), str)}


def _query_folder(scope: Scope) -> str | None:
    """The `folder_id` query parameter; the only part of a query string the log keeps."""
    query: bytes = scope.get("query_string", b"")
    if b"folder_id" not in query:
        return None
    values = parse_qs(query.decode("latin-1")).get("folder_id")
    return values[0] if values else None
