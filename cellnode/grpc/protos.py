"""The reference's gRPC messages, `yandex.cloud.datasphere.v1.NodeService` and `NodeExecutionErrorDetails`, built
as descriptors in a pool of their own (no generated code, so no tie to the protoc that generated it).

Field names and numbers are the reference's (`node_service.proto` and `node_execution_error_details.proto` of the
cloudapi repository): a client generated from those files, or a reflection-based one such as grpcurl, talks to
cellnode unchanged. `cellnode/grpc/proto/` holds the same files as text, rendered from these descriptors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

PACKAGE = "yandex.cloud.datasphere.v1"
SERVICE = f"{PACKAGE}.NodeService"
EXECUTE = f"/{SERVICE}/Execute"
EXECUTE_ALIAS = f"/{SERVICE}/ExecuteAlias"
SERVICE_FILE = "yandex/cloud/datasphere/v1/node_service.proto"
DETAILS_FILE = "yandex/cloud/datasphere/v1/node_execution_error_details.proto"
STRUCT_FILE = "google/protobuf/struct.proto"

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_STRUCT = ".google.protobuf.Struct"


def _message(file: descriptor_pb2.FileDescriptorProto, name: str, *fields: tuple[str, int, str | None]) -> None:
    """Add a message whose fields are (name, number, message type or None for string)."""
    message = file.message_type.add(name=name)
    for field_name, number, type_name in fields:
        field = message.field.add(name=field_name, number=number, label=_OPTIONAL)
        if type_name is None:
            field.type = _STRING
        else:
            field.type, field.type_name = _MESSAGE, type_name


def service_file() -> descriptor_pb2.FileDescriptorProto:
    """`node_service.proto`: NodeService and its four messages."""
    file = descriptor_pb2.FileDescriptorProto(
        name=SERVICE_FILE, package=PACKAGE, syntax="proto3", dependency=[STRUCT_FILE]
    )
    _message(file, "NodeExecutionRequest", ("folder_id", 1, None), ("node_id", 2, None), ("input", 3, _STRUCT))
    _message(file, "NodeExecutionResponse", ("output", 1, _STRUCT))
    _message(file, "AliasExecutionRequest", ("folder_id", 1, None), ("alias_name", 2, None), ("input", 3, _STRUCT))
    _message(file, "AliasExecutionResponse", ("output", 1, _STRUCT))
    service = file.service.add(name="NodeService")
    for method, request, response in (
        ("Execute", "NodeExecutionRequest", "NodeExecutionResponse"),
        ("ExecuteAlias", "AliasExecutionRequest", "AliasExecutionResponse"),
    ):
        service.method.add(name=method, input_type=f".{PACKAGE}.{request}", output_type=f".{PACKAGE}.{response}")
    return file


def details_file() -> descriptor_pb2.FileDescriptorProto:
    """`node_execution_error_details.proto`: what a cell's exception says, in a gRPC status's details."""
    file = descriptor_pb2.FileDescriptorProto(name=DETAILS_FILE, package=PACKAGE, syntax="proto3")
    _message(file, "NodeExecutionErrorDetails", ("error_name", 1, None), ("error_message", 2, None))
    file.message_type[0].field.add(name="traceback", number=3, label=_REPEATED, type=_STRING)
    return file


def struct_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(file)
    return file


def folder_only_file() -> descriptor_pb2.FileDescriptorProto:
    """A message of field 1 alone, the `folder_id` of every execute request (typed ones too): read first, so that
    the caller's access is checked before anything else of the request is."""
    file = descriptor_pb2.FileDescriptorProto(name="cellnode/grpc/folder_only.proto", package="cellnode.grpc")
    file.syntax = "proto3"
    _message(file, "FolderOnly", ("folder_id", 1, None))
    return file


POOL = descriptor_pool.DescriptorPool()
for _file in (struct_file(), service_file(), details_file(), folder_only_file()):
    POOL.Add(_file)


# The reference's comments, kept in the text files.
COMMENTS = {
    f"{PACKAGE}.NodeService": "A cell node's API, as the reference defines it; cellnode serves it at the gRPC port.",
    f"{PACKAGE}.NodeService.Execute": "Executes deployed Node.",
    f"{PACKAGE}.NodeService.ExecuteAlias": "Executes NodeAlias requests.",
    f"{PACKAGE}.NodeExecutionRequest.folder_id": "ID of the folder that will be matched with Node ACL.",
    f"{PACKAGE}.NodeExecutionRequest.node_id": "ID of the Node to perform request on.",
    f"{PACKAGE}.NodeExecutionRequest.input": "Input data for the execution.",
    f"{PACKAGE}.NodeExecutionResponse.output": "Result of the execution.",
    f"{PACKAGE}.AliasExecutionRequest.folder_id": "ID of the folder that will be matched with Alias ACL.",
    f"{PACKAGE}.AliasExecutionRequest.alias_name": "Name of the Alias to perform request on.",
    f"{PACKAGE}.AliasExecutionRequest.input": "Input data for the execution.",
    f"{PACKAGE}.AliasExecutionResponse.output": "Result of the execution.",
    f"{PACKAGE}.NodeExecutionErrorDetails": "User code python execution's error details.",
    f"{PACKAGE}.NodeExecutionErrorDetails.error_name": "Python exception name.",
    f"{PACKAGE}.NodeExecutionErrorDetails.error_message": "Python exception message.",
    f"{PACKAGE}.NodeExecutionErrorDetails.traceback": "Python exception traceback.",
}
# Where the text files live in the package (and in the repository).
PROTO_DIR = Path(__file__).parent / "proto"


def proto_texts() -> dict[str, str]:
    """The reference's two .proto files as text, rendered from the descriptors: file name -> text."""
    from cellnode.grpc.render import render_proto

    return {
        file.name: render_proto(file, {k: v for k, v in COMMENTS.items() if _in(file, k)})
        for file in (service_file(), details_file())
    }


def _in(file: descriptor_pb2.FileDescriptorProto, name: str) -> bool:
    top = name.removeprefix(f"{PACKAGE}.").split(".")[0]
    return any(m.name == top for m in file.message_type) or any(s.name == top for s in file.service)


def write_proto_files() -> None:
    """Write `proto_texts()` under PROTO_DIR: `python -m cellnode.grpc.protos` after changing a descriptor."""
    for name, text in proto_texts().items():
        path = PROTO_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _class(name: str) -> Any:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


NodeExecutionRequest = _class("NodeExecutionRequest")
NodeExecutionResponse = _class("NodeExecutionResponse")
AliasExecutionRequest = _class("AliasExecutionRequest")
AliasExecutionResponse = _class("AliasExecutionResponse")
NodeExecutionErrorDetails = _class("NodeExecutionErrorDetails")
FolderOnly = message_factory.GetMessageClass(POOL.FindMessageTypeByName("cellnode.grpc.FolderOnly"))


if __name__ == "__main__":
    write_proto_files()
