"""The execute API, the hot path: `POST /datasphere/v1/nodes/{node_id}:execute`,
`POST /datasphere/v1/aliases/{alias_name}:execute`, and the header-routed `POST /` (`x-node-id` or `x-node-alias`)
of cell nodes. Header-routed requests to docker nodes pass through to them (`cellnode/api/passthrough.py`).

Per request: the credential comes from the token cache, the node from the in-memory routing table; the body is
parsed once; the output comes back from the instance as JSON bytes and is wrapped, not parsed again. No database
query and no new connection. These are plain Starlette endpoints, dispatched by `ExecuteFront` ahead of the FastAPI
app: its dependency injection, validation and middleware would cost more than the work they do here.
"""

from __future__ import annotations

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
from cellnode.api.calls import ROUTE_KEY, Call, run_alias, run_node
from cellnode.api.deps import Services, client_of
from cellnode.api.errors import error_response
from cellnode.api.passthrough import PassThrough, passes_through
from cellnode.config import MAX_MESSAGE_BYTES
from cellnode.exceptions import (
    APIError,
    InternalError,
    InvalidArgument,
    PayloadTooLarge,
)
from cellnode.iam.audit import DENIED
from cellnode.runtime.variables import type_name

NODE_PREFIX = "/datasphere/v1/nodes/"
ALIAS_PREFIX = "/datasphere/v1/aliases/"
MANAGEMENT_PREFIX = "/cellnode/v1/"
# The scope key of the request's ID: sent to the instance for its log lines, and back as `x-request-id`.
REQUEST_ID = "cellnode.request_id"
# Scope keys of the caller and the folder named in the body, for the audit row of a denied call.
CALLER = "cellnode.caller"
FOLDER = "cellnode.folder_id"
# Scope key of the parsed call, which names the alias and the node that took the request once it ran.
CALL = "cellnode.call"
# Notebooks can carry outputs (images), so the management API allows more than the 16 MB of an execute call.
MAX_MANAGEMENT_BYTES = 64 * 1024 * 1024
EXECUTE_SUFFIX = ":execute"
logger = logging.getLogger("cellnode.api")


async def execute_node(request: Request) -> Response:
    """The reference REST call: body `{"folder_id": ..., "input": {...}}`, answer `{"output": {...}}`."""
    svc: Services = request.app.state.services
    call = await _read_call(request, "node_id", "nodeId")
    output = await run_node(svc, call, request.path_params["node_id"])
    return Response(b'{"output":' + output + b"}", media_type="application/json")


async def execute_alias(request: Request) -> Response:
    """The reference REST call on an alias: body `{"folder_id": ..., "input": {...}}`, answer `{"output": {...}}`."""
    svc: Services = request.app.state.services
    call = await _read_call(request, "alias_name", "aliasName")
    return await _alias_answer(svc, call, request.path_params["alias_name"])


async def _alias_answer(svc: Services, call: Call, name: str) -> Response:
    output = await run_alias(svc, call, name)
    response = Response(b'{"output":' + output + b"}", media_type="application/json")
    response.headers["x-node-id"] = call.node_id or ""
    return response


async def _read_call(request: Request, target: str, camel: str) -> Call:
    """Authenticate a path-form execute call and read its body: the caller, the folder it names (in the body or
    `x-folder-id`) and the input object. The body may repeat the path's `target` (`node_id` or `alias_name`,
    also in camelCase), which must then agree with it."""
    svc: Services = request.app.state.services
    request.scope[CALLER] = caller = await svc.auth.authenticate(
        request.headers.get("authorization"), client_of(request.scope)
    )
    data = _parse(await read_body(request))
    if type(data) is not dict:
        raise InvalidArgument(
            f"The request body must be a JSON object with 'folder_id' and 'input'; got {type_name(data)}."
        )
    for key in data:
        if key not in ("folder_id", "folderId", "input", target, camel):
            raise InvalidArgument(f"Unknown field {key!r} in the request body; expected 'folder_id' and 'input'.")
    named, in_path = data.get(target, data.get(camel)), request.path_params[target]
    if named is not None and named != in_path:
        raise InvalidArgument(
            f"The body names {target} {named!r} but the path names {in_path!r}; remove {target} from the body "
            "or make the two agree."
        )
    folder_id = data.get("folder_id", data.get("folderId")) or request.headers.get("x-folder-id")
    request.scope[FOLDER] = folder_id
    inputs = data.get("input", {})
    if type(inputs) is not dict:
        raise InvalidArgument(f"'input' must be a JSON object of input variables; got {type_name(inputs)}.")
    request.scope[CALL] = call = Call(
        caller, folder_id, inputs, request.scope[REQUEST_ID], route_key=request.headers.get(ROUTE_KEY)
    )
    return call


async def execute_by_header(request: Request) -> Response:
    """The node-proxy form: headers `x-node-id` (or `x-node-alias`) and `x-folder-id`, the input object itself as
    the body."""
    svc: Services = request.app.state.services
    request.scope[CALLER] = caller = await svc.auth.authenticate(
        request.headers.get("authorization"), client_of(request.scope)
    )
    node_id = request.headers.get("x-node-id")
    alias_name = request.headers.get("x-node-alias")
    if node_id and alias_name:
        raise InvalidArgument(
            f"The request names both node {node_id!r} (x-node-id) and alias {alias_name!r} (x-node-alias); "
            "send one of the two headers."
        )
    if not node_id and not alias_name:
        raise InvalidArgument(
            "POST / needs an 'x-node-id' header naming the node, or 'x-node-alias' naming an alias "
            "(as datasphere.user.NAME), and 'x-folder-id'; or call POST /datasphere/v1/nodes/{node_id}:execute."
        )
    body = await read_body(request)
    inputs = _parse(body)
    if type(inputs) is not dict:
        raise InvalidArgument(f"The request body must be a JSON object of input variables; got {type_name(inputs)}.")
    # The body is the input object itself, checked above: the instance gets it as it came.
    call = Call(
        caller,
        request.headers.get("x-folder-id"),
        inputs,
        request.scope[REQUEST_ID],
        payload=body,
        route_key=request.headers.get(ROUTE_KEY),
    )
    request.scope[CALL] = call
    if alias_name:
        return await _alias_answer(svc, call, alias_name)
    assert node_id is not None
    output = await run_node(svc, call, node_id)
    return Response(b'{"output":' + output + b"}", media_type="application/json")


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
        self.passthrough = PassThrough()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and passes_through(scope, self.app.state.services):
            scope["app"] = self.app
            scope[REQUEST_ID] = request_id = os.urandom(8).hex()
            await self.passthrough(self.app.state.services, scope, receive, send, request_id)
            return
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
    if not path.endswith(EXECUTE_SUFFIX):
        return None
    if path.startswith(NODE_PREFIX):
        node_id = path[len(NODE_PREFIX) : -len(EXECUTE_SUFFIX)]
        if node_id and "/" not in node_id:
            scope["path_params"] = {"node_id": node_id}
            return execute_node
    elif path.startswith(ALIAS_PREFIX):
        alias_name = path[len(ALIAS_PREFIX) : -len(EXECUTE_SUFFIX)]
        if alias_name and "/" not in alias_name:
            scope["path_params"] = {"alias_name": alias_name}
            return execute_alias
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
    alias = _alias_name(request)
    node_id = _node_id(request)
    folder = scope.get(FOLDER) or request.headers.get("x-folder-id")
    svc.audit.record(
        action="aliases.execute" if alias else "nodes.execute",
        code=code,
        resource=f"alias/{alias}" if alias else f"node/{node_id}" if node_id else "",
        folder=folder if isinstance(folder, str) else None,
        caller=scope.get(CALLER),
        client=client_of(scope),
        request_id=request_id,
        result="denied",
    )


def _observe(request: Request, path: str, code: int, started: float) -> None:
    """Count an execute request in the node metrics, if it reached a node that exists, and in the alias metrics if
    it named an alias that exists."""
    svc: Services = request.app.state.services
    milliseconds = (time.perf_counter() - started) * 1000
    call: Call | None = request.scope.get(CALL)
    alias = call.alias if call is not None else None
    node_id = _node_id(request)
    if alias:
        svc.metrics.observe_alias(alias, node_id or "", code, milliseconds)
    if node_id and svc.table.find(node_id) is not None:
        svc.metrics.observe(node_id, path, code, milliseconds)


def _node_id(request: Request) -> str | None:
    """The node an execute request names: in the path, or in `x-node-id` for `POST /`; for an alias, the node that
    took it."""
    call: Call | None = request.scope.get(CALL)
    if call is not None and call.alias is not None:
        return call.node_id
    if request.scope["path"] == "/":
        return request.headers.get("x-node-id")
    node_id: str | None = request.path_params.get("node_id")
    return node_id


def _alias_name(request: Request) -> str | None:
    """The alias an execute request names, as it named it."""
    call: Call | None = request.scope.get(CALL)
    if call is not None and call.alias is not None:
        return call.alias
    if request.scope["path"] == "/":
        return request.headers.get("x-node-alias")
    alias_name: str | None = request.path_params.get("alias_name")
    return alias_name
