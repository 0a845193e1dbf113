"""What a gRPC client learns without proto files: server reflection (`grpc.reflection.v1` and `v1alpha`, the same
wire format) and the standard health service (`grpc.health.v1.Health`), both filtered by who asks.

Reflection lists NodeService, health and reflection to any authenticated caller, and the typed service of each node
the caller may call (a folder in the node's ACL where the caller has `developer`, or is a service account living
there); a node it may not call is not found, exactly like one that does not exist.

Health answers for the server (`""`) and for `yandex.cloud.datasphere.v1.NodeService` without a credential, as
`GET /health` does, so that a load balancer can ask. A node is asked for by its ID or its typed service's name,
with a credential: SERVING while it has a live instance, NOT_SERVING otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from cellnode.exceptions import APIError, NotFound, TypedServiceError
from cellnode.grpc import protos
from cellnode.grpc.rpc import Rpc, abort
from cellnode.grpc.typed import node_id_of_service, node_id_of_symbol
from cellnode.iam.credentials import Caller
from cellnode.router.table import NodeRoute

if TYPE_CHECKING:
    from cellnode.grpc.front import GrpcFront

HEALTH = "grpc.health.v1.Health"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
# Seconds between looks at a watched service's status.
WATCH_INTERVAL = 1.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
# Health's List (HealthListRequest, HealthListResponse) is newer than the type stubs.
_health: Any = health_pb2


def _copy(file: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


def _reflection_v1() -> descriptor_pb2.FileDescriptorProto:
    """`grpc/reflection/v1/reflection.proto`: v1alpha's file under v1's name and package (the messages are the same)."""
    proto = _copy(reflection_pb2.DESCRIPTOR)
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace("v1alpha", "v1")
        method.output_type = method.output_type.replace("v1alpha", "v1")
    proto.options.Clear()
    return proto


FIXED = descriptor_pool.DescriptorPool()
for _file in (
    protos.struct_file(),
    protos.service_file(),
    protos.details_file(),
    _copy(health_pb2.DESCRIPTOR),
    _copy(reflection_pb2.DESCRIPTOR),
    _reflection_v1(),
):
    FIXED.Add(_file)
FIXED_SERVICES = (protos.SERVICE, HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA)
FIXED_PACKAGES = ("yandex.cloud.datasphere.v1.", "google.protobuf.", "grpc.health.v1.", "grpc.reflection.")
# Health answers for these without a credential.
PUBLIC_HEALTH = ("", protos.SERVICE)


class Discovery:
    """Reflection and health for one gRPC front."""

    def __init__(self, front: GrpcFront) -> None:
        self.front = front
        self.svc = front.svc
        self._closing = asyncio.Event()

    def close(self) -> None:
        """End the health watches, so that a stop need not wait out its grace for them."""
        self._closing.set()

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        reflect = grpc.stream_stream_rpc_method_handler(
            self._reflect,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        return {
            f"/{REFLECTION_V1}/ServerReflectionInfo": reflect,
            f"/{REFLECTION_V1ALPHA}/ServerReflectionInfo": reflect,
            f"/{HEALTH}/Check": grpc.unary_unary_rpc_method_handler(
                self._check,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            ),
            f"/{HEALTH}/Watch": grpc.unary_stream_rpc_method_handler(
                self._watch,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            ),
            f"/{HEALTH}/List": grpc.unary_unary_rpc_method_handler(
                self._list,
                request_deserializer=_health.HealthListRequest.FromString,
                response_serializer=_health.HealthListResponse.SerializeToString,
            ),
        }

    # --- who may see what ---

    async def _caller(self, context: Any, action: str) -> Caller:
        """The authenticated caller; a refusal ends the RPC and is written to the audit log as `action`."""
        rpc = Rpc(context)
        try:
            caller = await self.svc.auth.authenticate(rpc.metadata.get("authorization"), rpc.client)
            await self.svc.access.refresh_async()
        except APIError as exc:
            self.svc.audit.record(
                action=action, code=exc.status_code, client=rpc.client, request_id=rpc.request_id, result="denied"
            )
            await abort(context, exc, rpc.request_id)
        return caller

    def _may_call(self, caller: Caller, route: NodeRoute) -> bool:
        return any(self.svc.access.may_call(caller, folder_id) for folder_id in route.acl)

    def _visible(self, caller: Caller) -> Iterator[NodeRoute]:
        return (route for route in self.svc.table.routes() if self._may_call(caller, route))

    def _node(self, caller: Caller, node_id: str | None) -> NodeRoute | None:
        route = self.svc.table.find(node_id) if node_id else None
        return route if route is not None and self._may_call(caller, route) else None

    # --- reflection ---

    async def _reflect(
        self, requests: AsyncIterator[reflection_pb2.ServerReflectionRequest], context: Any
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        caller = await self._caller(context, "grpc.reflection")
        async for request in requests:
            response = reflection_pb2.ServerReflectionResponse(valid_host=request.host, original_request=request)
            kind = request.WhichOneof("message_request")
            try:
                if kind == "list_services":
                    names = [*FIXED_SERVICES, *self._typed_services(caller)]
                    response.list_services_response.service.extend(
                        reflection_pb2.ServiceResponse(name=name) for name in names
                    )
                elif kind == "file_containing_symbol":
                    pool, file = self._file_of_symbol(caller, request.file_containing_symbol)
                    response.file_descriptor_response.file_descriptor_proto.extend(_with_dependencies(pool, file))
                elif kind == "file_by_filename":
                    pool, file = self._file_by_name(caller, request.file_by_filename)
                    response.file_descriptor_response.file_descriptor_proto.extend(_with_dependencies(pool, file))
                elif kind == "all_extension_numbers_of_type":
                    pool, _ = self._file_of_symbol(caller, request.all_extension_numbers_of_type)
                    response.all_extension_numbers_response.base_type_name = request.all_extension_numbers_of_type
                else:  # file_containing_extension: we declare no extensions
                    raise NotFound("This server declares no extensions.")
            except NotFound as exc:
                response.error_response.error_code = _NOT_FOUND
                response.error_response.error_message = exc.message
            yield response

    def _typed_services(self, caller: Caller) -> list[str]:
        names = []
        for route in self._visible(caller):
            try:
                names.append(self.front.typed(route.node_id).service_name)
            except (NotFound, TypedServiceError):
                continue  # its variables cannot be typed fields; NodeService serves it
        return sorted(names)

    def _file_of_symbol(self, caller: Caller, symbol: str) -> tuple[descriptor_pool.DescriptorPool, str]:
        if symbol.startswith(FIXED_PACKAGES):
            try:
                return FIXED, FIXED.FindFileContainingSymbol(symbol).name
            except KeyError:
                pass
        route = self._node(caller, node_id_of_symbol(symbol))
        if route is not None:
            typed = self.front.typed(route.node_id)
            try:
                return typed.pool, typed.pool.FindFileContainingSymbol(symbol).name
            except KeyError:
                pass
        raise NotFound(f"Symbol {symbol!r} is not known to this server, or not to you.")

    def _file_by_name(self, caller: Caller, name: str) -> tuple[descriptor_pool.DescriptorPool, str]:
        try:
            return FIXED, FIXED.FindFileByName(name).name
        except KeyError:
            pass
        # A node's file is cellnode/nodes/n<ID>.proto, for package cellnode.nodes.n<ID>.
        stem = name.removesuffix(".proto").replace("/", ".")
        route = self._node(caller, node_id_of_symbol(stem + ".Node")) if name.endswith(".proto") else None
        if route is not None:
            typed = self.front.typed(route.node_id)
            if typed.file.name == name:
                return typed.pool, name
        raise NotFound(f"File {name!r} is not known to this server, or not to you.")

    # --- health ---

    def _status(self, caller: Caller | None, service: str) -> int | None:
        """The status of a service by name, None for one unknown (or not the caller's to know)."""
        if service in PUBLIC_HEALTH:
            return _NOT_SERVING if self._closing.is_set() else _SERVING
        assert caller is not None
        route = self._node(caller, node_id_of_service(service) or service)
        if route is None:
            return None
        return _SERVING if route.is_serving else _NOT_SERVING

    async def _check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        caller = None if request.service in PUBLIC_HEALTH else await self._caller(context, "grpc.health")
        status = self._status(caller, request.service)
        if status is None:
            error = NotFound(
                f"No service {request.service!r}: ask for '', {protos.SERVICE!r}, a node's ID or its typed service."
            )
            await abort(context, error, Rpc(context).request_id)
        return health_pb2.HealthCheckResponse(status=status)

    async def _watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        caller = None if request.service in PUBLIC_HEALTH else await self._caller(context, "grpc.health")
        sent = None
        while not self._closing.is_set():
            if caller is not None:
                await self.svc.access.refresh_async()  # a role taken away meanwhile hides the node
            status = self._status(caller, request.service)
            status = _UNKNOWN if status is None else status
            if status != sent:
                yield health_pb2.HealthCheckResponse(status=status)
                sent = status
            try:
                await asyncio.wait_for(self._closing.wait(), WATCH_INTERVAL)
            except TimeoutError:
                pass
        if sent != _NOT_SERVING:
            yield health_pb2.HealthCheckResponse(status=_NOT_SERVING)  # the server is stopping

    async def _list(self, request: Any, context: Any) -> Any:
        response = _health.HealthListResponse()
        for service in PUBLIC_HEALTH:
            response.statuses[service].status = self._status(None, service)
        caller = await self._caller(context, "grpc.health")
        for route in self._visible(caller):
            status = _SERVING if route.is_serving else _NOT_SERVING
            response.statuses[route.node_id].status = status
        return response


def _with_dependencies(pool: descriptor_pool.DescriptorPool, name: str) -> list[bytes]:
    """A file and every file it imports, transitively, serialized; the file first."""
    seen: dict[str, bytes] = {}

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name not in seen:
            seen[file.name] = _copy(file).SerializeToString()
            for dependency in file.dependencies:
                add(dependency)

    add(pool.FindFileByName(name))
    return list(seen.values())
