"""A gRPC client that knows only an address and a credential, as grpcurl does: every service, method and message it
uses comes from the server's reflection service (through grpcio-reflection's descriptor database), none from a
.proto file or generated code."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.rpc import status_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

Metadata = Sequence[tuple[str, str]]


class _Credential(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Adds `authorization` to every call, reflection's included (grpcurl's -H does the same)."""

    def __init__(self, authorization: str | None) -> None:
        self.authorization = authorization

    def _details(self, details: Any) -> Any:
        if self.authorization is None:
            return details
        metadata = [*(details.metadata or ()), ("authorization", self.authorization)]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Iterator[Any]) -> Any:
        return continuation(self._details(details), requests)


class ReflectionClient:
    def __init__(self, address: str, authorization: str | None) -> None:
        limit = 64 * 2**20  # above the server's 16 MB, so that the server's limit is the one tested
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        )
        self.channel = grpc.intercept_channel(self._channel, _Credential(authorization))
        self.database = ProtoReflectionDescriptorDatabase(self.channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def close(self) -> None:
        self._channel.close()

    def services(self) -> list[str]:
        return list(self.database.get_services())

    def method(self, full_method: str) -> tuple[Any, Any]:
        """The request and response classes of `package.Service/Method`, built from reflected descriptors."""
        service_name, method_name = full_method.split("/")
        method = self.pool.FindServiceByName(service_name).FindMethodByName(method_name)
        return (
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
        )

    def call(
        self, full_method: str, request: dict[str, Any], *, metadata: Metadata = (), timeout: float | None = 30
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Call with a JSON request, as grpcurl's -d does; the JSON response and the trailing metadata."""
        request_class, response_class = self.method(full_method)
        stub = self.channel.unary_unary(
            f"/{full_method}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response, call = stub.with_call(
            json_format.ParseDict(request, request_class()), metadata=tuple(metadata), timeout=timeout
        )
        trailer = {key: value for key, value in call.trailing_metadata() or () if isinstance(value, str)}
        return json_format.MessageToDict(response, preserving_proto_field_name=True), trailer


def rich_status(error: grpc.RpcError) -> status_pb2.Status:
    """The `google.rpc.Status` a failed call carries in its `grpc-status-details-bin` trailer."""
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no rich status in {error!r}")
