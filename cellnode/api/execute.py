"""The execute API, the hot path: `POST /datasphere/v1/nodes/{node_id}:execute` and the header-routed `POST /`.

Per request: the credential comes from the token cache, the node from the in-memory routing table; the body is
parsed once; the output comes back from the instance as JSON bytes and is wrapped, not parsed again. No database
query and no new connection. These are plain Starlette endpoints, dispatched by `ExecuteFront` ahead of the FastAPI
app: its dependency injection, validation and middleware would cost more than the work they do here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cellnode.api.audit import record_refused
from cellnode.api.deps import Services, client_of
from cellnode.api.errors import error_response
from cellnode.config import MAX_MESSAGE_BYTES
from cellnode.exceptions import APIError, InternalError, InvalidArgument, NotFound, PayloadTooLarge, PermissionDenied
from cellnode.iam.access import subject
from cellnode.iam.audit import DENIED
from cellnode.iam.credentials import Caller
from cellnode.router.instance import NotStarted
from cellnode.router.table import NodeRoute
from cellnode.runtime.variables import check_input, type_name

BODY_FIELDS = ("folder_id", "folderId", "node_id", "nodeId", "input")
NODE_PREFIX = "/datasphere/v1/nodes/"
MANAGEMENT_PREFIX = "/cellnode/v1/"
# How many instances a request may try when the ones it was given died before it reached them.
MAX_ATTEMPTS = 3
# The scope key of the request's ID: sent to the instance for its log lines, and back as `x-request-id`.
REQUEST_ID = "cellnode.request_id"
# Scope keys of the caller and the folder named in the body, for the audit row of a denied call.
CALLER = "cellnode.caller"
FOLDER = "cellnode.folder_id"
# Notebooks can carry outputs (images), so the management API allows more than the 16 MB of an execute call.
MAX_MANAGEMENT_BYTES = 64 * 1024 * 1024
EXECUTE_SUFFIX = ":execute"
logger = logging.getLogger("cellnode.api")


async def execute_node(request: Request) -> Response:
    """The reference REST call: body `{"folder_id": ..., "input": {...}}`, answer `{"output": {...}}`."""
    svc: Services = request.app.state.services
    request.scope[CALLER] = caller = await svc.auth.authenticate(
        request.headers.get("authorization"), client_of(request.scope)
    )
    node_id = request.path_params["node_id"]
    data = _parse(await read_body(request))
    if type(data) is not dict:
        raise InvalidArgument(
            f"The request body must be a JSON object with 'folder_id' and 'input'; got {type_name(data)}."
        )
    for key in data:
        if key not in BODY_FIELDS:
            raise InvalidArgument(f"Unknown field {key!r} in the request body; expected 'folder_id' and 'input'.")
    named = data.get("node_id", data.get("nodeId"))
    if named is not None and named != node_id:
        raise InvalidArgument(
            f"The body names node_id {named!r} but the path names {node_id!r}; remove node_id from the body "
            "or make the two agree."
        )
    folder_id = data.get("folder_id", data.get("folderId")) or request.headers.get("x-folder-id")
    request.scope[FOLDER] = folder_id
    inputs = data.get("input", {})
    if type(inputs) is not dict:
        raise InvalidArgument(f"'input' must be a JSON object of input variables; got {type_name(inputs)}.")
    return await _run(svc, caller, node_id, folder_id, inputs, request.scope[REQUEST_ID])


async def execute_by_header(request: Request) -> Response:
    """The node-proxy form: headers `x-node-id` and `x-folder-id`, the input object itself as the body."""
    svc: Services = request.app.state.services
    request.scope[CALLER] = caller = await svc.auth.authenticate(
        request.headers.get("authorization"), client_of(request.scope)
    )
    node_id = request.headers.get("x-node-id")
    if not node_id:
        if request.headers.get("x-node-alias"):
            raise NotFound("Aliases are not available on this server yet; call the node with x-node-id.")
        raise InvalidArgument(
            "POST / needs an 'x-node-id' header naming the node (and 'x-folder-id'); "
            "or call POST /datasphere/v1/nodes/{node_id}:execute."
        )
    body = await read_body(request)
    inputs = _parse(body)
    if type(inputs) is not dict:
        raise InvalidArgument(f"The request body must be a JSON object of input variables; got {type_name(inputs)}.")
    # The body is the input object itself, checked above: the instance gets it as it came.
    folder_id = request.headers.get("x-folder-id")
    return await _run(svc, caller, node_id, folder_id, inputs, request.scope[REQUEST_ID], body)


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes 16 MB."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_MESSAGE_BYTES:
        raise PayloadTooLarge(_too_large(int(declared)))
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > MAX_MESSAGE_BYTES:
            raise PayloadTooLarge(_too_large(len(chunks)))
    return bytes(chunks)


async def _run(
    svc: Services,
    caller: Caller,
    node_id: str,
    folder_id: Any,
    inputs: dict[str, Any],
    request_id: str,
    raw: bytes | None = None,
) -> Response:
    route = svc.table.get(node_id)
    _check_folder(route, folder_id)
    await svc.access.refresh_async()
    if not svc.access.may_call(caller, folder_id):
        raise PermissionDenied(
            f"{subject(caller)} may not call node {route.node_id!r} from folder {folder_id!r}: that needs the role "
            "'developer' (or more) on the folder, or a service account that lives in it. An admin of the folder "
            f"can grant it: 'cellnode folder add-access-binding {folder_id} --role developer --subject "
            f"{subject(caller)}'."
        )
    _check_inputs(route, inputs)
    payload = raw if raw is not None else orjson.dumps(inputs)
    deadline = asyncio.get_running_loop().time() + route.timeout
    for attempt in range(MAX_ATTEMPTS):
        try:
            output = await route.choose().execute(payload, deadline=deadline, request_id=request_id)
            return Response(b'{"output":' + output + b"}", media_type="application/json")
        except NotStarted:
            # The instance died before the request reached it: nothing ran, so another instance may take it.
            if attempt == MAX_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _check_folder(route: NodeRoute, folder_id: Any) -> None:
    if not folder_id:
        raise InvalidArgument(
            "The request names no folder: send 'folder_id' in the body or the 'x-folder-id' header, "
            "naming a folder in the node's ACL."
        )
    if type(folder_id) is not str:
        raise InvalidArgument(f"'folder_id' must be a string; got {type_name(folder_id)}.")
    if folder_id not in route.acl:
        raise PermissionDenied(
            f"Folder {folder_id!r} is not in the ACL of node {route.node_id!r}, so it may not call the node. "
            "Use a folder the node's owner has added to its ACL."
        )


def _check_inputs(route: NodeRoute, inputs: dict[str, Any]) -> None:
    declared = route.inputs
    for name, value in inputs.items():
        kind = declared.get(name)
        if kind is None:
            raise InvalidArgument(f"Unknown input variable {name!r}; node {route.node_id!r} takes {_signature(route)}.")
        try:
            check_input(name, kind, value)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    if len(inputs) != len(declared):
        missing = [name for name in declared if name not in inputs]
        raise InvalidArgument(
            f"Input variable {missing[0]!r} is missing; node {route.node_id!r} takes {_signature(route)}."
        )


def _signature(route: NodeRoute) -> str:
    if not route.inputs:
        return "no input variables"
    return ", ".join(f"{name} ({kind})" for name, kind in route.inputs.items())


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"The request body is not valid JSON: {exc}.") from None


def _too_large(size: int) -> str:
    return f"The request body is {size} bytes, over the 16 MB limit ({MAX_MESSAGE_BYTES} bytes); send less data."


class ExecuteFront:
    """An ASGI app in front of the FastAPI app: it answers execute POSTs itself, checks the credential and size of
    management requests before FastAPI reads their bodies, and passes everything else on.

    Measured (bench/README.md): the same handler ran at 14.6k req/s as a bare route and 10.8k behind FastAPI's
    middleware stack, which an execute request does not need. The routes stay registered on the FastAPI app too,
    so that other methods on these paths get FastAPI's answers.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = _execute_handler(scope) if scope["type"] == "http" else None
        if handler is None:
            if scope["type"] == "http" and scope["path"].startswith(MANAGEMENT_PREFIX):
                # Before FastAPI reads (and parses) any body: who is asking, and how much they send.
                refused = await _guard_management(Request(scope, receive), self.app)
                if refused is not None:
                    record_refused(self.app, scope, refused.status_code)
                    await refused(scope, receive, send)
                    return
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app
        scope[REQUEST_ID] = request_id = os.urandom(8).hex()
        request = Request(scope, receive)
        started = time.perf_counter()
        try:
            response = await handler(request)
        except APIError as exc:
            response = error_response(exc)
        except Exception:
            logger.exception("Unexpected error on POST %s", scope["path"])
            response = error_response(InternalError("Internal error; the server log has the details."))
        response.headers["x-request-id"] = request_id
        if response.status_code in DENIED or (response.status_code == 429 and CALLER not in scope):
            _audit_denied(request, response.status_code, request_id)  # 429 before authentication: throttled
        await response(scope, receive, send)
        _observe(request, scope["path"], response.status_code, started)


def _execute_handler(scope: Scope) -> Callable[[Request], Awaitable[Response]] | None:
    """The execute endpoint a request is for, if any (setting its `node_id` path parameter)."""
    if scope["method"] != "POST":
        return None
    path: str = scope["path"]
    if path == "/":
        return execute_by_header
    node_id = path[len(NODE_PREFIX) : -len(EXECUTE_SUFFIX)]
    if path.startswith(NODE_PREFIX) and path.endswith(EXECUTE_SUFFIX) and node_id and "/" not in node_id:
        scope["path_params"] = {"node_id": node_id}
        return execute_node
    return None


async def _guard_management(request: Request, app: FastAPI) -> Response | None:
    """The error answer for a management request without a valid credential or over the size limit, else None."""
    svc: Services = app.state.services
    try:
        request.state.caller = await svc.auth.authenticate(
            request.headers.get("authorization"), client_of(request.scope)
        )  # for the audit log
    except APIError as exc:
        return error_response(exc)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_MANAGEMENT_BYTES:
        return error_response(
            PayloadTooLarge(
                f"The request body is {int(declared)} bytes, over the {MAX_MANAGEMENT_BYTES // 2**20} MB limit of "
                "the management API. Send a smaller notebook (clear its outputs), or split the work."
            )
        )
    return None


def _audit_denied(request: Request, code: int, request_id: str) -> None:
    """Record a denied execute call in the audit log (only these: a successful call is counted by the metrics)."""
    svc: Services = request.app.state.services
    scope = request.scope
    node_id = _node_id(request)
    folder = scope.get(FOLDER) or request.headers.get("x-folder-id")
    svc.audit.record(
        action="nodes.execute",
        code=code,
        resource=f"node/{node_id}" if node_id else "",
        folder=folder if isinstance(folder, str) else None,
        caller=scope.get(CALLER),
        client=client_of(scope),
        request_id=request_id,
        result="denied",
    )


def _observe(request: Request, path: str, code: int, started: float) -> None:
    """Count an execute request in the node metrics, if it named a node that exists."""
    svc: Services = request.app.state.services
    node_id = _node_id(request)
    if node_id and svc.table.find(node_id) is not None:
        svc.metrics.observe(node_id, path, code, (time.perf_counter() - started) * 1000)


def _node_id(request: Request) -> str | None:
    """The node an execute request names: in the path, or in `x-node-id` for `POST /`."""
    if request.scope["path"] == "/":
        return request.headers.get("x-node-id")
    node_id: str | None = request.path_params.get("node_id")
    return node_id
