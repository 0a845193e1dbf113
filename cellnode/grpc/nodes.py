"""The gRPC front's pass-through to docker nodes with a gRPC endpoint: a call of any method that is not cellnode's
own, with `x-node-id` (or `x-node-alias`) metadata, goes to one of the node's instances
(`cellnode.grpc.passthrough.GrpcProxyInstance`) and its answer back, in any of the four call kinds.

Per call, as on the execute path: the credential from the token cache, the node or alias from the routing table, the
ACL (`x-folder-id`) and the caller's role checked, the instance's kept channel. The call's deadline is the node's
timeout or the caller's deadline, whichever comes first. An instance that accepts no connection has read nothing of
the call, so the call goes to another instance (and, for an alias, to another node).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from cellnode.api.calls import ROUTE_KEY, choose_node, count_outcome, named_target
from cellnode.api.dispatch import MAX_ATTEMPTS
from cellnode.api.passthrough import PathLabels
from cellnode.exceptions import (
    APIError,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    Unavailable,
)
from cellnode.grpc.passthrough import GrpcProxyInstance
from cellnode.grpc.rpc import CODES, Rpc, abort
from cellnode.iam.audit import DENIED
from cellnode.router.alias import AliasRoute
from cellnode.router.instance import NotStarted
from cellnode.router.table import NodeRoute

if TYPE_CHECKING:
    from cellnode.api.deps import Services

logger = logging.getLogger("cellnode.grpc")

# Codes that count as a node's errors for an alias's automatic rollback (as 5xx answers do over HTTP).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
    }
)


def names_a_node(metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
    return any(key in ("x-node-id", "x-node-alias") for key, _ in metadata or ())


class GrpcNodes:
    """Serves the calls `names_a_node` picks, for methods the front does not have."""

    def __init__(self, svc: Services, deadline_margin: float, audit_denied: Callable[[Rpc, int], None]) -> None:
        self.svc = svc
        self.deadline_margin = deadline_margin
        self.audit_denied = audit_denied  # the front's, which records a denied call
        self.paths = PathLabels()

    def handler(self, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
            await self._serve(method, requests, context)

        return grpc.stream_stream_rpc_method_handler(handle)

    async def _serve(
        self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        started = time.perf_counter()
        rpc = Rpc(context)
        alias: AliasRoute | None = None
        served = [""]
        error: APIError | None = None
        code = grpc.StatusCode.OK
        try:
            rpc.caller = await self.svc.auth.authenticate(rpc.metadata.get("authorization"), rpc.client)
            node_name, alias_name = rpc.metadata.get("x-node-id"), rpc.metadata.get("x-node-alias")
            rpc.named = ("alias", alias_name) if alias_name else ("node", node_name or "")
            rpc.folder_id = rpc.metadata.get("x-folder-id", "")
            route, alias = await named_target(self.svc, rpc.caller, rpc.folder_id, node_name, alias_name)
            code = await self._forward(method, requests, context, rpc, route, alias, served)
        except APIError as exc:
            error = exc
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            passed = remaining is not None and remaining <= 0
            self._observe(method, alias, served[0], "DEADLINE_EXCEEDED" if passed else "CANCELLED", started)
            raise
        except Exception:
            logger.exception("Unexpected error on %s", method)
            error = InternalError("Internal error; the server log has the details.")
        if error is not None:
            code = CODES.get(error.grpc_code, grpc.StatusCode.UNKNOWN)
        self._observe(method, alias, served[0], code.name, started)
        if error is None:
            return
        if error.status_code in DENIED:
            self.audit_denied(rpc, error.status_code)
        trailer: list[tuple[str, str | bytes]] = [("x-node-id", served[0])] if alias is not None and served[0] else []
        await abort(context, error, rpc.request_id, trailer)

    async def _forward(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, bytes],
        rpc: Rpc,
        route: NodeRoute | None,
        alias: AliasRoute | None,
        served: list[str],
    ) -> grpc.StatusCode:
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        callers = None if remaining is None else loop.time() + remaining - min(self.deadline_margin, remaining / 10)
        tried: set[str] = set()
        while True:
            if alias is not None:
                route = self.svc.table.get(choose_node(self.svc.table, alias, rpc.metadata.get(ROUTE_KEY), tried))
            assert route is not None
            served[0] = route.node_id
            _check_grpc(route)
            deadline = loop.time() + route.timeout
            shorter = callers is not None and callers < deadline
            extra = [("x-node-id", route.node_id)] if alias is not None else []
            try:
                code = await _to_instance(
                    route, method, requests, context, rpc.request_id, callers if shorter else deadline, extra
                )
            except NotStarted:
                if alias is None:
                    raise
                tried.add(route.node_id)
                if len(tried) >= MAX_ATTEMPTS:
                    raise
                continue
            except DeadlineExceeded as exc:
                if alias is not None:
                    count_outcome(self.svc, alias, route.node_id, exc.status_code)
                if not shorter:
                    raise
                raise DeadlineExceeded(
                    f"The caller's deadline passed before node {route.node_id!r} answered (its own timeout is "
                    f"{route.timeout:g} s); the call was cancelled."
                ) from None
            except APIError as exc:
                if alias is not None:
                    count_outcome(self.svc, alias, route.node_id, exc.status_code)
                raise
            if alias is not None:
                count_outcome(self.svc, alias, route.node_id, 500 if code in SERVER_ERRORS else 200)
            return code

    def _observe(self, method: str, alias: AliasRoute | None, node_id: str, code: str, started: float) -> None:
        milliseconds = (time.perf_counter() - started) * 1000
        if alias is not None:
            self.svc.metrics.observe_alias(alias.name, node_id, code, milliseconds, grpc=True)
        if node_id and self.svc.table.find(node_id) is not None:
            label = self.paths.label(node_id, method)
            self.svc.metrics.observe(node_id, label, code, milliseconds, grpc=True)


async def _to_instance(
    route: NodeRoute,
    method: str,
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext[bytes, bytes],
    request_id: str,
    deadline: float,
    extra: Sequence[tuple[str, str | bytes]],
) -> grpc.StatusCode:
    """One node's turn: an instance of it, and another while they accept no connection."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            instance = route.choose()
        except Unavailable as exc:
            raise NotStarted(exc.message) from None
        assert isinstance(instance, GrpcProxyInstance), "a gRPC docker node's instances are gRPC proxies"
        try:
            return await instance.forward(
                method, requests, context, deadline=deadline, request_id=request_id, trailing_metadata=extra
            )
        except NotStarted:
            if attempt == MAX_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _check_grpc(route: NodeRoute) -> None:
    if route.kind != "docker":
        raise FailedPrecondition(
            f"Node {route.node_id!r} is a cell node: call it with yandex.cloud.datasphere.v1.NodeService/Execute, or "
            "its typed service (reflection lists it), not with a method of its own."
        )
    if route.endpoint != "grpc":
        raise FailedPrecondition(
            f"Node {route.node_id!r} serves HTTP, not gRPC: send its requests to the server's HTTP port with the "
            "same headers."
        )
