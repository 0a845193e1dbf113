"""What every RPC of the gRPC front shares: its metadata and caller (`Rpc`), and how an error ends it (`abort`, with
the error's code and its `google.rpc.Status` in the `grpc-status-details-bin` trailer)."""

from __future__ import annotations

import os
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from cellnode.api.calls import Call
from cellnode.exceptions import ERROR_INFO_TYPE, EXECUTION_ERROR_TYPE, APIError, TooManyRequests
from cellnode.grpc import protos
from cellnode.iam.credentials import Caller

CODES = {code.value[0]: code for code in grpc.StatusCode}


class Rpc:
    """What one RPC carries besides its message: metadata, the caller once known, and what the metrics need."""

    __slots__ = ("metadata", "client", "request_id", "caller", "call", "folder_id", "named")

    def __init__(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        self.metadata: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if isinstance(value, str):
                self.metadata.setdefault(key, value)
        self.client = client_of(context.peer())
        self.request_id = os.urandom(8).hex()
        self.caller: Caller | None = None
        self.call: Call | None = None
        self.folder_id: Any = None
        self.named: tuple[str, str] | None = None  # ("node" or "alias", as the request named it)


def client_of(peer: str | None) -> str:
    """The client's address from a gRPC peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`); empty if unknown."""
    if not peer:
        return ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return ""


async def abort(
    context: Any, error: APIError, request_id: str, trailer: list[tuple[str, str | bytes]] | None = None
) -> NoReturn:
    """End the RPC with the error's code and message, its `google.rpc.Status` in `grpc-status-details-bin`, and
    `x-cellnode-error: <reason>`, as a REST error has (a passed-through service's trailers never carry it)."""
    metadata = [
        ("x-request-id", request_id),
        ("x-cellnode-error", error.reason),
        *(trailer or []),
        ("grpc-status-details-bin", status_of(error).SerializeToString()),
    ]
    await context.abort(CODES.get(error.grpc_code, grpc.StatusCode.UNKNOWN), error.message, tuple(metadata))
    raise AssertionError("unreachable")  # pragma: no cover


def status_of(error: APIError) -> status_pb2.Status:
    """The `google.rpc.Status` of an error, its details packed: ErrorInfo (which names our error class, as the REST
    body does), NodeExecutionErrorDetails when the cell raised, and RetryInfo when the caller should wait."""
    status = status_pb2.Status(code=error.grpc_code, message=error.message)
    for detail in error.to_status()["details"]:
        kind = detail.get("@type")
        packed = any_pb2.Any()
        if kind == ERROR_INFO_TYPE:
            packed.Pack(error_details_pb2.ErrorInfo(reason=detail["reason"], domain=detail["domain"]))
        elif kind == EXECUTION_ERROR_TYPE:
            packed.Pack(
                protos.NodeExecutionErrorDetails(
                    error_name=detail.get("error_name", ""),
                    error_message=detail.get("error_message", ""),
                    traceback=detail.get("traceback", []),
                )
            )
        else:
            continue  # a detail of the REST body only (a capture's failure); the message says it too
        status.details.append(packed)
    if isinstance(error, TooManyRequests):
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay={"seconds": error.retry_after}))
        status.details.append(packed)
    return status
