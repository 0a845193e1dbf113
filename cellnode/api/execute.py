"""The execute API, the hot path: `POST /datasphere/v1/nodes/{node_id}:execute`,
`POST /datasphere/v1/aliases/{alias_name}:execute`, and the header-routed `POST /` (`x-node-id` or `x-node-alias`).

Per request: the credential comes from the token cache, the node from the in-memory routing table; the body is
parsed once; the output comes back from the instance as JSON bytes and is wrapped, not parsed again. No database
query and no new connection. These are plain Starlette endpoints, dispatched by `ExecuteFront` ahead of the FastAPI
app: its dependency injection, validation and middleware would cost more than the work they do here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
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
from cellnode.exceptions import (
    APIError,
    CellExecutionError,
    InternalError,
    InvalidArgument,
    PayloadTooLarge,
    PermissionDenied,
    Unavailable,
)
from cellnode.iam.access import subject
from cellnode.iam.audit import DENIED
from cellnode.iam.credentials import Caller
from cellnode.router.alias import AliasRoute, MirrorRecord, Share, pick, pick_sticky
from cellnode.router.instance import NotStarted
from cellnode.router.table import NodeRoute, RoutingTable
from cellnode.runtime.variables import check_input, type_name

NODE_PREFIX = "/datasphere/v1/nodes/"
ALIAS_PREFIX = "/datasphere/v1/aliases/"
ROUTE_KEY = "x-cellnode-route-key"
MANAGEMENT_PREFIX = "/cellnode/v1/"
# How many instances a request may try when the ones it was given died before it reached them.
MAX_ATTEMPTS = 3
# The scope key of the request's ID: sent to the instance for its log lines, and back as `x-request-id`.
REQUEST_ID = "cellnode.request_id"
# Scope keys of the caller and the folder named in the body, for the audit row of a denied call.
CALLER = "cellnode.caller"
FOLDER = "cellnode.folder_id"
# Scope keys of an alias call: the alias's routing name, and the node that took the request.
ALIAS = "cellnode.alias"
ANSWERED_BY = "cellnode.node_id"
# How many of an alias's nodes a request may try when the one it picked had no instance left to take it.
MAX_ALIAS_NODES_TRIED = 3
# Notebooks can carry outputs (images), so the management API allows more than the 16 MB of an execute call.
MAX_MANAGEMENT_BYTES = 64 * 1024 * 1024
EXECUTE_SUFFIX = ":execute"
logger = logging.getLogger("cellnode.api")
alias_logger = logging.getLogger("cellnode.alias")


async def execute_node(request: Request) -> Response:
    """The reference REST call: body `{"folder_id": ..., "input": {...}}`, answer `{"output": {...}}`."""
    svc: Services = request.app.state.services
    caller, folder_id, inputs = await _read_call(request, "node_id", "nodeId")
    return await _run(svc, caller, request.path_params["node_id"], folder_id, inputs, request.scope[REQUEST_ID])


async def execute_alias(request: Request) -> Response:
    """The reference REST call on an alias: body `{"folder_id": ..., "input": {...}}`, answer `{"output": {...}}`."""
    svc: Services = request.app.state.services
    caller, folder_id, inputs = await _read_call(request, "alias_name", "aliasName")
    return await _run_alias(svc, caller, request, request.path_params["alias_name"], folder_id, inputs)


async def _read_call(request: Request, target: str, camel: str) -> tuple[Caller, Any, dict[str, Any]]:
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
    return caller, folder_id, inputs


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
    folder_id = request.headers.get("x-folder-id")
    if alias_name:
        return await _run_alias(svc, caller, request, alias_name, folder_id, inputs, body)
    assert node_id is not None
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
    _check_folder(route.acl, folder_id, f"node {route.node_id!r}")
    await _check_caller(svc, caller, folder_id, f"node {route.node_id!r}")
    _check_inputs(route, inputs)
    payload = raw if raw is not None else orjson.dumps(inputs)
    output = await _dispatch(route, payload, request_id)
    return Response(b'{"output":' + output + b"}", media_type="application/json")


async def _dispatch(route: NodeRoute, payload: bytes, request_id: str) -> bytes:
    """Run a checked request on one of the node's instances. NotStarted when none could take it: nothing ran."""
    deadline = asyncio.get_running_loop().time() + route.timeout
    for attempt in range(MAX_ATTEMPTS):
        try:
            try:
                instance = route.choose()
            except NotStarted:
                raise
            except Unavailable as exc:
                raise NotStarted(exc.message) from None
            return await instance.execute(payload, deadline=deadline, request_id=request_id)
        except NotStarted:
            # The instance died before the request reached it: nothing ran, so another instance may take it.
            if attempt == MAX_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


async def _run_alias(
    svc: Services,
    caller: Caller,
    request: Request,
    name: str,
    folder_id: Any,
    inputs: dict[str, Any],
    raw: bytes | None = None,
) -> Response:
    """Route a request to one of the alias's serving nodes, by weight (or by its route key), copying it to the
    alias's mirrors; the node it starts on answers it, whatever happens to the alias meanwhile."""
    alias = svc.table.get_alias(name)
    scope = request.scope
    scope[ALIAS] = alias.name
    if not alias.public:
        _check_folder(alias.acl, folder_id, f"alias {alias.name!r}")
        await _check_caller(svc, caller, folder_id, f"alias {alias.name!r}")
    key = request.headers.get(ROUTE_KEY)
    payload = raw if raw is not None else orjson.dumps(inputs)
    request_id: str = scope[REQUEST_ID]
    tried: set[str] = set()
    shadows: list[ShadowTask] | None = None
    started = time.perf_counter()
    while True:
        node_id = _choose(svc.table, alias, key, tried)
        route = svc.table.get(node_id)
        _check_inputs(route, inputs)
        if shadows is None:  # once per request, beside the first node it tries
            shadows = _mirror(svc, alias, node_id, inputs, payload, request_id) if alias.mirrors else []
        scope[ANSWERED_BY] = node_id
        try:
            output = await _dispatch(route, payload, request_id)
        except NotStarted as exc:
            # No instance of the node could take it, and nothing ran: another node may, while there is one.
            del scope[ANSWERED_BY]
            tried.add(node_id)
            if len(tried) >= MAX_ALIAS_NODES_TRIED or not _any_left(svc.table, alias, tried):
                _settle_shadows(svc, alias, node_id, shadows, started, exc, exc.status_code, request_id)
                raise
            continue
        except APIError as exc:
            _count_outcome(svc, alias, node_id, exc.status_code)
            _settle_shadows(svc, alias, node_id, shadows, started, exc, exc.status_code, request_id)
            raise
        _count_outcome(svc, alias, node_id, 200)
        _settle_shadows(svc, alias, node_id, shadows, started, output, 200, request_id)
        response = Response(b'{"output":' + output + b"}", media_type="application/json")
        response.headers["x-node-id"] = node_id
        return response


def _any_left(table: RoutingTable, alias: AliasRoute, tried: set[str]) -> bool:
    return any(s.percent > 0 and s.node_id not in tried and table.serving(s.node_id) for s in alias.shares)


def _choose(table: RoutingTable, alias: AliasRoute, key: str | None, tried: set[str]) -> str:
    """The node for this request: weighted at random, or by rendezvous hash of the route key."""

    def serving(node_id: str) -> bool:
        return node_id not in tried and table.serving(node_id)

    if key is not None:
        node_id = pick_sticky(alias.shares, serving, key.encode())
    else:
        node_id = pick(alias.shares, serving, random.random)
    if node_id is None:
        raise Unavailable(_none_serving(table, alias, tried))
    return node_id


def _none_serving(table: RoutingTable, alias: AliasRoute, tried: set[str]) -> str:
    states = []
    for share in alias.shares:
        route = table.find(share.node_id)
        status = "ABSENT" if route is None else route.status
        if share.node_id in tried:
            status += ", its instances went away during this request"
        elif route is not None and status == "HEALTHY" and not route.is_serving:
            status += ", no live instance"
        named = f"{route.name} ({share.node_id}" if route is not None else f"{share.node_id} ("
        states.append(f"{named}, {share.percent}%: {status})")
    return (
        f"Alias {alias.name!r} has no node that can take the request: {'; '.join(states)}. A node with 0% takes no "
        "requests. Retry shortly; the alias's owner can see more with 'cellnode alias get'."
    )


def _count_outcome(svc: Services, alias: AliasRoute, node_id: str, code: int) -> None:
    """Feed the alias's rollback watch: 5xx answers count as the node's errors (4xx are the caller's)."""
    rate = alias.stats.outcome(alias.rollback, node_id, code >= 500, time.monotonic())
    if rate is not None:
        svc.supervisor.roll_back(alias, node_id, rate)


ShadowTask = tuple[Share, "asyncio.Task[tuple[int, bytes | APIError, float]]"]
_shadows: set[asyncio.Task[tuple[int, bytes | APIError, float]]] = set()


def _mirror(
    svc: Services, alias: AliasRoute, primary: str, inputs: dict[str, Any], payload: bytes, request_id: str
) -> list[ShadowTask]:
    """Start the copies of this request that the alias's mirrors ask for, beside the primary (never instead)."""
    tasks: list[ShadowTask] = []
    for share in alias.mirrors:
        if share.node_id != primary and random.random() * 100 < share.percent:
            task = asyncio.create_task(_shadow(svc.table, share.node_id, inputs, payload, f"{request_id}-shadow"))
            _shadows.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(_shadows.discard)
            tasks.append((share, task))
    return tasks


async def _shadow(
    table: RoutingTable, node_id: str, inputs: dict[str, Any], payload: bytes, request_id: str
) -> tuple[int, bytes | APIError, float]:
    """Run a copy on the shadow node: its status code, output or error, and milliseconds. Never raises."""
    started = time.perf_counter()
    try:
        route = table.get(node_id)
        _check_inputs(route, inputs)
        output = await _dispatch(route, payload, request_id)
    except APIError as exc:
        return exc.status_code, exc, (time.perf_counter() - started) * 1000
    except Exception as exc:  # a bug; the shadow must never hurt the primary
        logger.exception("Shadow request %s failed unexpectedly.", request_id)
        return 500, InternalError(str(exc)), (time.perf_counter() - started) * 1000
    return 200, output, (time.perf_counter() - started) * 1000


def _settle_shadows(
    svc: Services,
    alias: AliasRoute,
    primary: str,
    shadows: list[ShadowTask],
    started: float,
    answer: bytes | APIError | None,
    code: int,
    request_id: str,
) -> None:
    """Once the shadows have answered too, compare, record and count; the caller does not wait for it."""
    if not shadows:
        return
    primary_ms = (time.perf_counter() - started) * 1000
    for share, task in shadows:

        def done(task: asyncio.Task[tuple[int, bytes | APIError, float]], share: Share = share) -> None:
            if task.cancelled():
                return  # the server is stopping
            shadow_code, shadow_answer, shadow_ms = task.result()
            result, detail = _compare(answer, code, shadow_answer, shadow_code)
            record = MirrorRecord(
                at=time.time(),
                request_id=request_id,
                primary_node_id=primary,
                shadow_node_id=share.node_id,
                result=result,
                primary_code=code,
                shadow_code=shadow_code,
                primary_ms=round(primary_ms, 3),
                shadow_ms=round(shadow_ms, 3),
                detail=detail,
            )
            alias.stats.add_mirror(record)
            svc.metrics.mirror_results.labels(alias.name, share.node_id, result).inc()
            svc.metrics.mirror_durations.labels(alias.name, primary, "primary").observe(primary_ms)
            svc.metrics.mirror_durations.labels(alias.name, share.node_id, "shadow").observe(shadow_ms)
            alias_logger.info(
                "Alias %s mirrored a request: primary %s answered %d in %.1f ms, shadow %s answered %d in %.1f ms: "
                "%s%s",
                alias.name,
                primary,
                code,
                primary_ms,
                share.node_id,
                shadow_code,
                shadow_ms,
                result,
                f" ({detail})" if detail else "",
            )

        task.add_done_callback(done)


def _compare(
    primary: bytes | APIError | None, primary_code: int, shadow: bytes | APIError, shadow_code: int
) -> tuple[str, str]:
    """`agree`, `differ` or `error`, and why: equal bytes agree at once, else the outputs are compared as JSON
    values; two failures agree when they are the same error (for a cell, the same exception class)."""
    if isinstance(primary, bytes) and isinstance(shadow, bytes):
        if primary == shadow or orjson.loads(primary) == orjson.loads(shadow):
            return "agree", ""
        return "differ", "the outputs differ"
    if isinstance(shadow, CellExecutionError) and isinstance(primary, CellExecutionError):
        if primary.error_name == shadow.error_name:
            return "agree", f"both raised {shadow.error_name}"
        return "differ", f"the primary raised {primary.error_name}, the shadow {shadow.error_name}"
    if isinstance(shadow, CellExecutionError) and isinstance(primary, bytes):
        return "differ", f"the shadow raised {shadow.error_name}"
    if isinstance(primary, CellExecutionError) and isinstance(shadow, bytes):
        return "differ", f"the primary raised {primary.error_name}"
    if isinstance(shadow, APIError) and shadow_code != 500:
        return "error", f"the shadow did not answer: {shadow.message}"
    if primary is None or (isinstance(primary, APIError) and primary_code != 500):
        return "error", "the primary did not answer"
    if type(primary) is type(shadow):
        return "agree", f"both failed with {type(shadow).__name__}"
    return "differ", f"the primary failed with {type(primary).__name__}, the shadow with {type(shadow).__name__}"


async def _check_caller(svc: Services, caller: Caller, folder_id: str, what: str) -> None:
    await svc.access.refresh_async()
    if not svc.access.may_call(caller, folder_id):
        raise PermissionDenied(
            f"{subject(caller)} may not call {what} from folder {folder_id!r}: that needs the role "
            "'developer' (or more) on the folder, or a service account that lives in it. An admin of the folder "
            f"can grant it: 'cellnode folder add-access-binding {folder_id} --role developer --subject "
            f"{subject(caller)}'."
        )


def _check_folder(acl: frozenset[str], folder_id: Any, what: str) -> None:
    if not folder_id:
        raise InvalidArgument(
            "The request names no folder: send 'folder_id' in the body or the 'x-folder-id' header, "
            f"naming a folder in the ACL of {what}."
        )
    if type(folder_id) is not str:
        raise InvalidArgument(f"'folder_id' must be a string; got {type_name(folder_id)}.")
    if folder_id not in acl:
        raise PermissionDenied(
            f"Folder {folder_id!r} is not in the ACL of {what}, so it may not call it. "
            "Use a folder its owner has added to the ACL."
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
    alias = request.scope.get(ALIAS)
    node_id = _node_id(request)
    if alias:
        svc.metrics.observe_alias(alias, node_id or "", code, milliseconds)
    if node_id and svc.table.find(node_id) is not None:
        svc.metrics.observe(node_id, path, code, milliseconds)


def _node_id(request: Request) -> str | None:
    """The node an execute request names: in the path, or in `x-node-id` for `POST /`; for an alias, the node that
    took it."""
    if ANSWERED_BY in request.scope:
        answered: str = request.scope[ANSWERED_BY]
        return answered
    if request.scope["path"] == "/":
        return request.headers.get("x-node-id")
    node_id: str | None = request.path_params.get("node_id")
    return node_id


def _alias_name(request: Request) -> str | None:
    """The alias an execute request names, as it named it."""
    if ALIAS in request.scope:
        named: str = request.scope[ALIAS]
        return named
    if request.scope["path"] == "/":
        return request.headers.get("x-node-alias")
    alias_name: str | None = request.path_params.get("alias_name")
    return alias_name
