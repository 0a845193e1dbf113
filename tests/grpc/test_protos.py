"""The reference's .proto files shipped in the package: the text is what the descriptors render to, and protoc
compiles it back to the very descriptors the server serves (and reflection describes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import any_pb2, descriptor_pb2

from cellnode.exceptions import EXECUTION_ERROR_TYPE
from cellnode.grpc import protos
from tests.grpc.test_typed import compile_proto


@pytest.mark.parametrize("file", [protos.service_file(), protos.details_file()], ids=lambda f: f.name)
def test_shipped_proto_files_are_the_descriptors(file: descriptor_pb2.FileDescriptorProto, tmp_path: Path) -> None:
    shipped = (protos.PROTO_DIR / file.name).read_text()
    assert shipped == protos.proto_texts()[file.name], "run 'python -m cellnode.grpc.protos' to write them again"
    assert compile_proto(shipped, file.name, tmp_path) == file


def test_the_error_details_type_url_is_the_references() -> None:
    packed = any_pb2.Any()
    packed.Pack(protos.NodeExecutionErrorDetails(error_name="ValueError"))
    assert packed.type_url == EXECUTION_ERROR_TYPE
