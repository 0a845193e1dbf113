"""The node-proxy form of the request API: a request with an `x-node-id` (or `x-node-alias`) header goes to that
node, whatever its method and path.

For a docker node the request passes through to one of its instances (`cellnode.router.proxy.ProxyInstance`): the
method, path, query, headers (minus hop-by-hop ones and the caller's credential) and body, streamed both ways. A cell
node answers only `POST /`, whose body is its input object (`cellnode.api.execute.execute_by_header` serves it);
anything else named to a cell node is answered 404 here.

Per request, as on the execute path: the credential from the token cache, the node from the routing table, the ACL
(`x-folder-id`) and the caller's role checked, no database query, and the instance's kept-alive connections. The
node's timeout (the endpoint timeout, 15 s by default) bounds the wait for the answer to start: past it, 504. An
instance that refuses the connection has run nothing, so the request is tried on another instance (and, for an
alias, on another node), with the body as it came.

Paths under `/cellnode/v1/` and `/datasphere/v1/` are cellnode's own API and never pass through.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from cellnode.api.calls import ROUTE_KEY, choose_node, count_outcome, named_target
from cellnode.api.deps import Services, client_of
from cellnode.api.dispatch import MAX_ATTEMPTS
from cellnode.api.errors import error_response
from cellnode.exceptions import APIError, InternalError, NotFound, ResponseAborted, Unavailable
from cellnode.iam.audit import DENIED
from cellnode.iam.credentials import Caller
from cellnode.router.alias import AliasRoute
from cellnode.router.instance import NotStarted
from cellnode.router.proxy import ProxyInstance
from cellnode.router.table import NodeRoute

logger = logging.getLogger("cellnode.api")

OWN_PREFIXES = ("/cellnode/v1/", "/datasphere/v1/")
# Distinct request paths counted per node in the metrics' `node_path`; the rest count as "other".
MAX_PATHS_PER_NODE = 64


def passes_through(scope: Scope, svc: Services) -> bool:
    """Whether an HTTP request is this module's: it names a node or alias in its headers, is not for cellnode's own
    API, and is not a cell node's `POST /` (the execute path's)."""
    path: str = scope["path"]
    if path.startswith(OWN_PREFIXES):
        return False
    node_id = alias_name = None
    for name, value in scope["headers"]:
        if name == b"x-node-id":
            node_id = value.decode("latin-1")
        elif name == b"x-node-alias":
            alias_name = value.decode("latin-1")
    if node_id is None and alias_name is None:
        return False
    if scope["method"] != "POST" or path != "/":
        return True
    if alias_name is not None:
        alias = svc.table.find_alias(alias_name) or svc.table.find_alias(f"{svc.table.default_prefix}.{alias_name}")
        return alias is not None and _alias_kind(svc, alias) == "docker"
    route = svc.table.find(node_id or "")
    return route is not None and route.kind == "docker"


class PassThrough:
    """Serves the requests `passes_through` picks (one object per server: it keeps the metrics' path labels)."""

    def __init__(self) -> None:
        self.paths = PathLabels()

    async def __call__(self, svc: Services, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        request = Request(scope, receive)
        started = time.perf_counter()
        caller: Caller | None = None
        alias: AliasRoute | None = None
        node_id = request.headers.get("x-node-id")
        alias_name = request.headers.get("x-node-alias")
        served = [node_id or ""]  # the node that took the request, once one has
        try:
            caller = await svc.auth.authenticate(request.headers.get("authorization"), client_of(scope))
            route, alias = await named_target(svc, caller, _header(scope, b"x-folder-id") or "", node_id, alias_name)
            kind = _alias_kind(svc, alias) if alias is not None else route.kind if route is not None else "cell"
            if kind == "cell":
                raise NotFound(
                    f"{scope['method']} {scope['path']}: the node is a cell node, which answers only POST / with its "
                    "input variables as the JSON body (or POST /datasphere/v1/nodes/{node_id}:execute)."
                )
            code = await self._forward(svc, scope, receive, send, request_id, node_id, alias, served)
        except APIError as exc:
            code = exc.status_code
            response = error_response(exc)
            response.headers["x-request-id"] = request_id
            await response(scope, receive, send)
            if code in DENIED:
                _audit(svc, scope, caller, code, request_id, node_id, alias_name)
        except ResponseAborted as exc:
            code = exc.status_code
            logger.warning("%s (request %s)", exc, request_id)
        except Exception:
            code = 500
            logger.exception("Unexpected error on %s %s", scope["method"], scope["path"])
            response = error_response(InternalError("Internal error; the server log has the details."))
            response.headers["x-request-id"] = request_id
            await response(scope, receive, send)
        self._observe(svc, scope, alias, served[0], code, started)

    async def _forward(
        self,
        svc: Services,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: str,
        node_id: str | None,
        alias: AliasRoute | None,
        served: list[str],
    ) -> int:
        """Pass the request to an instance; its answer's status. Tries other instances (and other nodes of an
        alias) while the ones it picks refuse the connection."""
        replay = _Replay(receive)
        tried: set[str] = set()
        key = _header(scope, ROUTE_KEY.encode())
        while True:
            route = svc.table.get(choose_node(svc.table, alias, key, tried) if alias is not None else node_id or "")
            served[0] = route.node_id
            extra = [(b"x-node-id", route.node_id.encode())] if alias is not None else []
            try:
                code = await _to_instance(route, scope, replay, send, request_id, extra)
            except NotStarted:
                if alias is None:
                    raise
                tried.add(route.node_id)
                if len(tried) >= MAX_ATTEMPTS or not replay.rewind():
                    raise
                continue
            except APIError as exc:
                if alias is not None:
                    count_outcome(svc, alias, route.node_id, exc.status_code)
                raise
            if alias is not None:
                count_outcome(svc, alias, route.node_id, code)
            return code

    def _observe(
        self, svc: Services, scope: Scope, alias: AliasRoute | None, node_id: str, code: int, started: float
    ) -> None:
        if alias is None and not node_id:
            return
        milliseconds = (time.perf_counter() - started) * 1000
        if alias is not None:
            svc.metrics.observe_alias(alias.name, node_id, code, milliseconds)
        if node_id and svc.table.find(node_id) is not None:
            svc.metrics.observe(node_id, self.paths.label(node_id, scope["path"]), code, milliseconds)


class PathLabels:
    """A request's path (or gRPC method) as the metrics' `node_path`: the first ones a node sees, then "other", so
    that a service with IDs in its paths, or a caller naming made-up methods, cannot make the metrics grow without
    bound."""

    def __init__(self, limit: int = MAX_PATHS_PER_NODE) -> None:
        self.limit = limit
        self._paths: dict[str, set[str]] = {}

    def label(self, node_id: str, path: str) -> str:
        paths = self._paths.setdefault(node_id, set())
        if path in paths:
            return path
        if len(paths) < self.limit:
            paths.add(path)
            return path
        return "other"


async def _to_instance(
    route: NodeRoute, scope: Scope, replay: _Replay, send: Send, request_id: str, extra: list[tuple[bytes, bytes]]
) -> int:
    """One node's turn: an instance of it, and another while they refuse the connection."""
    deadline = asyncio.get_running_loop().time() + route.timeout
    for attempt in range(MAX_ATTEMPTS):
        try:
            instance = route.choose()
        except Unavailable as exc:
            raise NotStarted(exc.message) from None
        if not isinstance(instance, ProxyInstance):
            raise Unavailable(
                f"Node {route.node_id!r} speaks {route.endpoint or 'the execute API'}, not HTTP: call it on the "
                "server's gRPC port with the same headers."
            )
        try:
            return await instance.forward(
                scope, replay, send, deadline=deadline, request_id=request_id, response_headers=extra
            )
        except NotStarted:
            if attempt == MAX_ATTEMPTS - 1 or not replay.rewind():
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _alias_kind(svc: Services, alias: AliasRoute) -> str:
    """What the alias's nodes are ("cell" or "docker"; the API keeps an alias to one kind)."""
    for share in alias.shares:
        route = svc.table.find(share.node_id)
        if route is not None:
            return route.kind
    return "cell"  # none is known here: the cell path says why none serves


class _Replay:
    """`receive`, keeping the body's first message, so that a request refused by one instance's connection goes to
    the next with its body as it came (a refused connection has read that message at most)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._first: Message | None = None
        self._reads = 0
        self._again = False

    async def __call__(self) -> Message:
        if self._again:
            self._again, self._reads = False, 1
            assert self._first is not None
            return self._first
        message = await self._receive()
        self._reads += 1
        if self._reads == 1:
            self._first = message
        return message

    def rewind(self) -> bool:
        """Whether the request can be sent again: then the next read gives the first message once more."""
        if self._reads > 1 or (self._first is not None and self._first["type"] != "http.request"):
            return False
        self._again, self._reads = self._first is not None, 0
        return True


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _audit(
    svc: Services,
    scope: Scope,
    caller: Caller | None,
    code: int,
    request_id: str,
    node_id: str | None,
    alias_name: str | None,
) -> None:
    folder = _header(scope, b"x-folder-id")
    svc.audit.record(
        action="aliases.execute" if alias_name else "nodes.execute",
        code=code,
        resource=f"alias/{alias_name}" if alias_name else f"node/{node_id}" if node_id else "",
        folder=folder,
        caller=caller,
        client=client_of(scope),
        request_id=request_id,
        result="denied",
    )
