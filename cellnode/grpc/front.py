"""The gRPC front: `yandex.cloud.datasphere.v1.NodeService` (Execute, ExecuteAlias), a typed service per cell node,
health and reflection, on a `grpc.aio` server in the HTTP front's event loop.

A call is parsed into the same `Call` the REST front makes and runs through the same core (`cellnode/api/calls.py`):
the credential from the token cache, the node or alias from the routing table, one instance hop, no database query.
Errors carry the REST mapping's gRPC code (`APIError.grpc_code`) and a `google.rpc.Status` in the
`grpc-status-details-bin` trailer, with `NodeExecutionErrorDetails` when the cell raised. The caller's deadline bounds
the node's timeout. Messages are read as bytes and checked against the 16 MB limit here, so a larger one is refused
with a message that names the limit rather than the transport's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import orjson
from google.protobuf import message

from cellnode.api.calls import ROUTE_KEY, Call, run_alias, run_node
from cellnode.api.dispatch import check_caller, check_folder
from cellnode.config import MAX_MESSAGE_BYTES
from cellnode.exceptions import (
    APIError,
    InternalError,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    TypedServiceError,
)
from cellnode.grpc import protos
from cellnode.grpc.discovery import Discovery
from cellnode.grpc.nodes import GrpcNodes, names_a_node
from cellnode.grpc.rpc import CODES, Rpc, abort
from cellnode.grpc.typed import TypedNode, node_id_of_service, signature_of
from cellnode.grpc.values import struct_to_json
from cellnode.iam.audit import DENIED

if TYPE_CHECKING:
    from cellnode.api.deps import Services

logger = logging.getLogger("cellnode.grpc")

# Seconds before a client's deadline at which the node's own deadline falls (at most a tenth of the time left).
DEADLINE_MARGIN = 0.05
# The transport refuses messages past this itself (with its own wording); up to it, ours names the 16 MB limit.
TRANSPORT_LIMIT = 2 * MAX_MESSAGE_BYTES
Behavior = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]


class GrpcFront:
    """The gRPC server of `cellnode serve --grpc-port`, sharing the HTTP front's services."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._stopping: asyncio.Future[None] | None = None
        self._typed: dict[str, tuple[Any, TypedNode]] = {}
        self._methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            protos.EXECUTE: self._unary(self._execute, protos.EXECUTE),
            protos.EXECUTE_ALIAS: self._unary(self._execute_alias, protos.EXECUTE_ALIAS),
        }
        self.discovery = Discovery(self)
        self._methods.update(self.discovery.handlers())
        self.nodes = GrpcNodes(svc, DEADLINE_MARGIN, self._audit_denied)

    async def start(self, host: str, port: int, tls: tuple[bytes, bytes] | None = None) -> int:
        """Listen on `host:port` (0 picks a port) and serve; the port it listens on."""
        options = [
            ("grpc.max_receive_message_length", TRANSPORT_LIMIT),
            ("grpc.max_send_message_length", TRANSPORT_LIMIT),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(options=options)
        self.server.add_generic_rpc_handlers([_Handlers(self)])
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
        await self.server.start()
        return self.port

    async def stop(self, grace: float) -> None:
        """Refuse new RPCs, give those under way `grace` seconds, then cancel them. A second call waits for the
        first's stop (the HTTP server's shutdown starts it, the lifespan's end waits for it)."""
        if self.server is None:
            return
        if self._stopping is None:
            self.discovery.close()
            self._stopping = asyncio.ensure_future(self.server.stop(grace))
        await asyncio.shield(self._stopping)

    def find(
        self, method: str, metadata: tuple[tuple[str, str | bytes], ...] | None = None
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The handler of a method: cellnode's own, a cell node's typed service, or, for any other method of a call
        that names a node or an alias in its metadata, the pass-through to a docker node's gRPC service."""
        handler = self._methods.get(method)
        if handler is not None:
            return handler
        service, _, name = method[1:].rpartition("/")
        node_id = node_id_of_service(service)
        if node_id is None or name != "Execute":
            return self.nodes.handler(method) if names_a_node(metadata) else None
        return self._unary(lambda raw, context, rpc: self._execute_typed(node_id, raw, context, rpc), method)

    def typed(self, node_id: str) -> TypedNode:
        """The typed service of a node as it is now; rebuilt when its variables change (names, types or order).
        NotFound for no node, or for one whose variables cannot be typed fields."""
        route = self.svc.table.find(node_id)
        if route is None:
            self._typed.pop(node_id, None)
            route = self.svc.table.get(node_id)  # NotFound, naming the node
        key = (route.name, signature_of(route.inputs, route.outputs))
        cached = self._typed.get(node_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            typed = TypedNode.build(route.node_id, route.name, route.inputs, route.outputs)
        except TypedServiceError as exc:
            raise NotFound(str(exc)) from None
        self._typed[node_id] = (key, typed)
        return typed

    def _unary(
        self, behavior: Callable[[bytes, Any, Rpc], Awaitable[bytes]], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        async def handle(raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            return await self._serve(behavior, method, raw, context)

        return grpc.unary_unary_rpc_method_handler(handle)

    async def _serve(
        self,
        behavior: Callable[[bytes, Any, Rpc], Awaitable[bytes]],
        method: str,
        raw: bytes,
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> bytes:
        """Run one execute RPC: authenticate it, count it, audit it when denied, and turn an APIError into its
        status. The behavior finds the caller in `rpc.caller`."""
        started = time.perf_counter()
        rpc = Rpc(context)
        error: APIError | None = None
        answer = b""
        try:
            rpc.caller = await self.svc.auth.authenticate(rpc.metadata.get("authorization"), rpc.client)
            if len(raw) > MAX_MESSAGE_BYTES:
                raise PayloadTooLarge(
                    f"The request message is {len(raw)} bytes, over the 16 MB limit ({MAX_MESSAGE_BYTES} bytes); "
                    "send less data."
                )
            answer = await behavior(raw, context, rpc)
            if len(answer) > MAX_MESSAGE_BYTES:
                raise PayloadTooLarge(
                    f"The answer is {len(answer)} bytes, over the 16 MB limit of a message ({MAX_MESSAGE_BYTES} "
                    "bytes); make the cell return less data."
                )
        except APIError as exc:
            error = exc
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            passed = remaining is not None and remaining <= 0
            self._observe(method, rpc, "DEADLINE_EXCEEDED" if passed else "CANCELLED", started)
            raise
        except Exception:
            logger.exception("Unexpected error on %s", method)
            error = InternalError("Internal error; the server log has the details.")
        code = grpc.StatusCode.OK if error is None else CODES.get(error.grpc_code, grpc.StatusCode.UNKNOWN)
        self._observe(method, rpc, code.name, started)
        trailer: list[tuple[str, str | bytes]] = [("x-request-id", rpc.request_id)]
        if rpc.call is not None and rpc.call.alias is not None and rpc.call.node_id is not None:
            trailer.append(("x-node-id", rpc.call.node_id))
        if error is None:
            context.set_trailing_metadata(tuple(trailer))
            return answer
        if error.status_code in DENIED or (isinstance(error, TooManyRequests) and rpc.caller is None):
            self._audit_denied(rpc, error.status_code)
        await abort(context, error, rpc.request_id, trailer[1:])

    def _new_call(self, rpc: Rpc, folder_id: str, inputs: dict[str, Any], context: Any, *, doubles: bool) -> Call:
        assert rpc.caller is not None
        remaining = context.time_remaining()
        deadline = None
        if remaining is not None:
            # A little before the client's deadline, so that the node's answer (DEADLINE_EXCEEDED, the cell
            # interrupted) is what the client gets, rather than gRPC cancelling the call under it.
            deadline = asyncio.get_running_loop().time() + remaining - min(DEADLINE_MARGIN, remaining / 10)
        rpc.folder_id = folder_id = folder_id or rpc.metadata.get("x-folder-id", "")
        rpc.call = Call(
            rpc.caller,
            folder_id,
            inputs,
            rpc.request_id,
            route_key=rpc.metadata.get(ROUTE_KEY),
            deadline=deadline,
            doubles=doubles,
        )
        return rpc.call

    async def _execute(self, raw: bytes, context: Any, rpc: Rpc) -> bytes:
        request = _parse(protos.NodeExecutionRequest, raw)
        node_id = _target(request.node_id, rpc.metadata.get("x-node-id"), "node_id", "x-node-id")
        alias_name = rpc.metadata.get("x-node-alias")
        if node_id and alias_name:
            raise InvalidArgument(
                f"The request names both node {node_id!r} and alias {alias_name!r} (x-node-alias); name one of the two."
            )
        if not node_id and not alias_name:
            raise InvalidArgument(
                "The request names no node: set 'node_id' in the message (or the 'x-node-id' metadata), or call "
                "ExecuteAlias with 'alias_name' (or send 'x-node-alias' metadata)."
            )
        call = self._new_call(rpc, request.folder_id, struct_to_json(request.input), context, doubles=True)
        if alias_name:
            rpc.named = ("alias", alias_name)
            return _struct_answer(protos.NodeExecutionResponse, await run_alias(self.svc, call, alias_name))
        rpc.named = ("node", node_id)
        return _struct_answer(protos.NodeExecutionResponse, await run_node(self.svc, call, node_id))

    async def _execute_alias(self, raw: bytes, context: Any, rpc: Rpc) -> bytes:
        request = _parse(protos.AliasExecutionRequest, raw)
        alias_name = _target(request.alias_name, rpc.metadata.get("x-node-alias"), "alias_name", "x-node-alias")
        if not alias_name:
            raise InvalidArgument(
                "The request names no alias: set 'alias_name' (as datasphere.user.NAME, or the bare NAME) in the "
                "message, or send 'x-node-alias' metadata."
            )
        rpc.named = ("alias", alias_name)
        call = self._new_call(rpc, request.folder_id, struct_to_json(request.input), context, doubles=True)
        return _struct_answer(protos.AliasExecutionResponse, await run_alias(self.svc, call, alias_name))

    async def _execute_typed(self, node_id: str, raw: bytes, context: Any, rpc: Rpc) -> bytes:
        assert rpc.caller is not None
        rpc.named = ("node", node_id)
        # The folder and the caller are checked before anything of the node's variables is read or told.
        route = self.svc.table.get(node_id)
        folder_id = _parse(protos.FolderOnly, raw).folder_id or rpc.metadata.get("x-folder-id", "")
        rpc.folder_id = folder_id
        check_folder(route.acl, folder_id, f"node {route.node_id!r}")
        await check_caller(self.svc, rpc.caller, folder_id, f"node {route.node_id!r}")
        typed = self.typed(node_id)
        folder_id, inputs = typed.decode(raw)
        call = self._new_call(rpc, folder_id, inputs, context, doubles=False)
        return typed.encode(await run_node(self.svc, call, node_id))

    def _observe(self, method: str, rpc: Rpc, code: str, started: float) -> None:
        """Count an execute RPC in the node metrics if it reached a node that exists, and in the alias metrics if it
        named an alias that exists."""
        call = rpc.call
        if call is None:
            return
        milliseconds = (time.perf_counter() - started) * 1000
        if call.alias is not None:
            self.svc.metrics.observe_alias(call.alias, call.node_id or "", code, milliseconds, grpc=True)
        if call.node_id is not None and self.svc.table.find(call.node_id) is not None:
            self.svc.metrics.observe(call.node_id, method, code, milliseconds, grpc=True)

    def _audit_denied(self, rpc: Rpc, code: int) -> None:
        kind, named = rpc.named if rpc.named is not None else ("node", "")
        if rpc.call is not None and rpc.call.alias is not None:
            kind, named = "alias", rpc.call.alias
        folder = rpc.folder_id or rpc.metadata.get("x-folder-id")
        self.svc.audit.record(
            action="aliases.execute" if kind == "alias" else "nodes.execute",
            code=code,
            resource=f"{kind}/{named}" if named else "",
            folder=folder if isinstance(folder, str) and folder else None,
            caller=rpc.caller,
            client=rpc.client,
            request_id=rpc.request_id,
            result="denied",
        )


def _struct_answer(response_class: Any, output: bytes) -> bytes:
    """A NodeService answer, its `output` Struct holding the JSON object of the outputs."""
    response = response_class()
    response.output.SetInParent()  # a node without outputs still answers an (empty) output
    response.output.update(orjson.loads(output))
    answer: bytes = response.SerializeToString()
    return answer


class _Handlers(grpc.GenericRpcHandler):
    def __init__(self, front: GrpcFront) -> None:
        self.front = front

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self.front.find(handler_call_details.method, handler_call_details.invocation_metadata)


def _parse(message_class: Any, raw: bytes) -> Any:
    try:
        return message_class.FromString(raw)
    except message.DecodeError:
        raise InvalidArgument(
            f"The request is not a valid {message_class.DESCRIPTOR.full_name} message; check the client's .proto "
            "against the server's (reflection serves it)."
        ) from None


def _target(in_message: str, in_metadata: str | None, field: str, header: str) -> str:
    """The node or alias a request names, in its message or its metadata; the two must agree when both are sent."""
    if in_message and in_metadata and in_message != in_metadata:
        raise InvalidArgument(
            f"The message names {field} {in_message!r} but the {header} metadata names {in_metadata!r}; send one, "
            "or make the two agree."
        )
    return in_message or in_metadata or ""
