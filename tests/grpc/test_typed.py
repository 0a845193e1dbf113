"""The typed per-node service: its codec for every variable type, its names, and its `.proto` text against protoc."""

from __future__ import annotations

import math
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
from google.protobuf import descriptor_pb2

from cellnode.exceptions import InvalidArgument, OutputError, TypedServiceError
from cellnode.grpc.render import render_proto
from cellnode.grpc.typed import (
    PACKAGE_PREFIX,
    TypedNode,
    field_number,
    node_id_of_service,
    node_id_of_symbol,
    package_of,
    signature_of,
)

NODE_ID = "0k3j2h1g9f8d7s6a5p4o"
TYPES = {
    "count": "int",
    "ratio": "float",
    "label": "str",
    "flag": "bool",
    "items": "list",
    "options": "dict",
    "extra": "any",
}
Field = descriptor_pb2.FieldDescriptorProto


@pytest.fixture(scope="module")
def typed() -> TypedNode:
    """A node with the same variables in and out, one of each type, so that its Output bytes are Input bytes."""
    return TypedNode.build(NODE_ID, "every-type-node", TYPES, TYPES)


def round_trip(typed: TypedNode, outputs: dict[str, Any]) -> dict[str, Any]:
    """Encode outputs as a response, send its Output as a request's Input, and decode that."""
    response: Any = typed.response_class.FromString(typed.encode(orjson.dumps(outputs)))
    request: Any = typed.request_class(folder_id="folder-1")
    request.input.MergeFromString(response.output.SerializeToString())
    folder_id, inputs = typed.decode(request.SerializeToString())
    assert folder_id == "folder-1"
    return inputs


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("count", 0),
        ("count", -7),
        ("count", 2**63 - 1),
        ("count", -(2**63)),
        ("count", 2**53 + 1),  # a Struct's double would round it
        ("ratio", 0.0),
        ("ratio", -1.5),
        ("ratio", 1e300),
        ("label", ""),
        ("label", "héllo, 世界 🎉"),
        ("flag", False),
        ("flag", True),
        ("items", []),
        ("items", [1, "a", None, True, [2.5], {"k": []}]),
        ("options", {}),
        ("options", {"a": {"b": [1, 2]}, "n": None, "s": "x", "f": 1.5}),
        ("extra", None),
        ("extra", 3),
        ("extra", "s"),
        ("extra", False),
        ("extra", []),
        ("extra", {}),
        ("extra", {"nested": [{"x": [None, False, {}]}], "y": -2.25}),
    ],
)
def test_every_type_round_trips(typed: TypedNode, name: str, value: Any) -> None:
    inputs = round_trip(typed, {name: value})
    assert inputs == {name: value}
    assert type(inputs[name]) is type(value)


def test_all_variables_round_trip_together(typed: TypedNode) -> None:
    outputs = {"count": 1, "ratio": 0.5, "label": "l", "flag": False, "items": [1], "options": {"a": 1}, "extra": None}
    assert round_trip(typed, outputs) == outputs


def test_a_float_that_arrives_as_an_int_is_a_double(typed: TypedNode) -> None:
    response: Any = typed.response_class.FromString(typed.encode(b'{"ratio": 3}'))
    assert response.output.ratio == 3.0
    inputs = round_trip(typed, {"ratio": 3})
    assert inputs == {"ratio": 3.0} and type(inputs["ratio"]) is float


def test_missing_inputs_are_left_out(typed: TypedNode) -> None:
    request: Any = typed.request_class(folder_id="f")
    request.input.flag = False
    assert typed.decode(request.SerializeToString()) == ("f", {"flag": False})
    assert typed.decode(b"") == ("", {})


def test_decode_refuses_bytes_that_are_not_a_request(typed: TypedNode) -> None:
    with pytest.raises(InvalidArgument, match=rf"not a valid {package_of(NODE_ID)}\.ExecuteRequest"):
        typed.decode(b"\xff\xff\xff\xff")
    request: Any = typed.request_class()
    request.input.label = "x"
    invalid_utf8 = request.SerializeToString().replace(b"x", b"\xff")
    with pytest.raises(InvalidArgument, match="ExecuteRequest"):
        typed.decode(invalid_utf8)


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_decode_refuses_a_double_json_cannot_carry(typed: TypedNode, number: float) -> None:
    request: Any = typed.request_class()
    request.input.ratio = number
    with pytest.raises(InvalidArgument, match=r"input\.ratio is .*finite number"):
        typed.decode(request.SerializeToString())


def test_decode_refuses_nan_inside_a_struct(typed: TypedNode) -> None:
    request: Any = typed.request_class()
    request.input.options.update({"x": math.nan})
    with pytest.raises(InvalidArgument, match=r"input\.options\.x is nan"):
        typed.decode(request.SerializeToString())


@pytest.mark.parametrize("value", [2**63, 2**63 + 5, 2**64 - 1, -(2**63) - 1])
def test_encode_refuses_an_int_beyond_int64(typed: TypedNode, value: int) -> None:
    output_json = f'{{"count": {value}}}'.encode()
    with pytest.raises(OutputError) as caught:
        typed.encode(output_json)
    message = caught.value.message
    # orjson reads ints up to 2^64 - 1 as ints, and others as floats; the message names what it read.
    assert "'count'" in message and repr(orjson.loads(output_json)["count"]) in message and "int64" in message
    assert f"{typed.service_name} cannot carry" in message and "NodeService/Execute" in message


@pytest.mark.parametrize(
    ("name", "value"),
    [("count", 1.5), ("count", True), ("ratio", "1"), ("label", 1), ("flag", 0), ("items", {}), ("options", [])],
)
def test_encode_refuses_a_value_of_another_type(typed: TypedNode, name: str, value: Any) -> None:
    with pytest.raises(OutputError, match=f"Output variable '{name}' is .* cannot carry"):
        typed.encode(orjson.dumps({name: value}))


@pytest.mark.parametrize("output_json", [b"{", b"[1]"])
def test_encode_refuses_outputs_that_are_not_a_json_object(typed: TypedNode, output_json: bytes) -> None:
    with pytest.raises(OutputError, match="outputs are"):
        typed.encode(output_json)


def test_encode_leaves_out_undeclared_and_missing_outputs(typed: TypedNode) -> None:
    response: Any = typed.response_class.FromString(typed.encode(b'{"count": 2, "other": 1}'))
    assert response.HasField("output")
    assert [field.name for field, _ in response.output.ListFields()] == ["count"]
    empty: Any = typed.response_class.FromString(typed.encode(b"{}"))
    assert empty.HasField("output") and not empty.output.ListFields()


def test_names_that_shadow_message_attributes_work() -> None:
    variables = {"ListFields": "int", "SetInParent": "dict", "DESCRIPTOR": "str", "from": "bool"}
    node = TypedNode.build(NODE_ID, "shadow", variables, variables)
    outputs = {"ListFields": 5, "SetInParent": {}, "DESCRIPTOR": "d", "from": False}
    assert round_trip(node, outputs) == outputs


def test_names_and_paths() -> None:
    node = TypedNode.build(NODE_ID, "n", {"a": "int"}, {"b": "dict"})
    package = f"{PACKAGE_PREFIX}.n{NODE_ID}"
    assert package_of(NODE_ID) == package
    assert node.service_name == f"{package}.Node"
    assert node.method_path == f"/{package}.Node/Execute"
    assert node.file.name == f"cellnode/nodes/n{NODE_ID}.proto"
    assert node.pool.FindFileContainingSymbol(f"{package}.Input.a").name == node.file.name
    assert node.pool.FindServiceByName(node.service_name).methods_by_name["Execute"].input_type.name == "ExecuteRequest"
    assert node_id_of_service(node.service_name) == NODE_ID
    assert node_id_of_service(f"{package}.Input") is None
    assert node_id_of_service("yandex.cloud.datasphere.v1.NodeService") is None
    for symbol in (package, f"{package}.Input", f"{package}.Node.Execute", f"{package}.Input.a"):
        assert node_id_of_symbol(symbol) == NODE_ID
    for symbol in ("cellnode.nodes", "cellnode.nodes.nABC.Input", "cellnode.nodesx.nabc", "google.protobuf.Struct"):
        assert node_id_of_symbol(symbol) is None
    with pytest.raises(ValueError, match="'Not-an-id'"):
        package_of("Not-an-id")


def test_signature_tells_a_stale_node() -> None:
    node = TypedNode.build(NODE_ID, "n", {"a": "int"}, {"b": "dict"})
    assert node.signature == signature_of({"a": "int"}, {"b": "dict"})
    assert node.signature != signature_of({"a": "float"}, {"b": "dict"})
    assert node.signature != signature_of({"a": "int", "c": "int"}, {"b": "dict"})
    assert hash(node.signature) == hash(signature_of({"a": "int"}, {"b": "dict"}))


def test_struct_proto_is_imported_only_when_used() -> None:
    assert list(TypedNode.build(NODE_ID, "n", {"a": "int"}, {"b": "str"}).file.dependency) == []
    assert list(TypedNode.build(NODE_ID, "n", {"a": "int"}, {"b": "any"}).file.dependency) == [
        "google/protobuf/struct.proto"
    ]


@pytest.mark.parametrize("name", ["a-b", "1x", "café", "", "a b", "a.b"])
def test_a_name_that_cannot_be_a_field_is_refused(name: str) -> None:
    with pytest.raises(TypedServiceError) as caught:
        TypedNode.build(NODE_ID, "n", {"ok": "int", name: "int"}, {})
    assert f"Input variable {name!r}" in str(caught.value)
    assert "yandex.cloud.datasphere.v1.NodeService" in str(caught.value)


@pytest.mark.parametrize(("first", "second"), [("a_b", "aB"), ("a__b", "aB"), ("_a", "A"), ("a_1", "a1")])
def test_a_json_name_conflict_is_refused(first: str, second: str) -> None:
    with pytest.raises(TypedServiceError) as caught:
        TypedNode.build(NODE_ID, "n", {}, {first: "int", second: "str"})
    assert f"Output variable {second!r}" in str(caught.value) and repr(first) in str(caught.value)
    assert "yandex.cloud.datasphere.v1.NodeService" in str(caught.value)


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(TypedServiceError, match="'x' has type 'tuple'"):
        TypedNode.build(NODE_ID, "n", {"x": "tuple"}, {})


def test_proto_text_names_the_node_and_the_declared_types(typed: TypedNode) -> None:
    text = typed.proto_text()
    assert "'every-type-node'" in text and NODE_ID in text
    assert f"  // count: int\n  optional int64 count = {field_number('count', 'int')};" in text
    assert f"  // extra: any (any JSON value)\n  google.protobuf.Value extra = {field_number('extra', 'any')};" in text


# --- render_proto against protoc -------------------------------------------------------------------------------------


def compile_proto(text: str, name: str, tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    """What protoc (grpcio-tools) compiles `text` into, as file `name`, with json_name cleared: protoc fills it in
    for every field, and it is only ever the default name here (render_proto refuses any other)."""
    source = tmp_path / "src"
    (source / name).parent.mkdir(parents=True, exist_ok=True)
    (source / name).write_text(text)
    includes = resources.files("grpc_tools") / "_proto"
    out = tmp_path / "set.pb"
    command = ["-I", str(source), "-I", str(includes), f"--descriptor_set_out={out}", "--include_imports", name]
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    files = {file.name: file for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    compiled = files[name]
    for message in compiled.message_type:
        for field in message.field:
            field.ClearField("json_name")
    return compiled


def test_a_typed_node_compiles_to_its_own_descriptor(tmp_path: Path) -> None:
    # Names that make protoc rename synthetic oneofs (`_x`, `X_x`) and that are proto keywords; JSON names that
    # differ only in case or in a trailing underscore, which protoc allows.
    inputs = {**TYPES, "x": "int", "_x": "float", "X_x": "str", "message": "bool", "optional": "list"}
    outputs = {**TYPES, "a_": "int", "aA": "int", "foo_bar": "str", "Foo_bar": "dict"}
    node = TypedNode.build(NODE_ID, "every-type-node", inputs, outputs)
    compiled = compile_proto(node.proto_text(), node.file.name, tmp_path)
    assert compiled == node.file
    assert [oneof.name for oneof in compiled.message_type[0].oneof_decl] == [
        "_count",
        "_ratio",
        "_label",
        "_flag",
        "XX_x",
        "XXX_x",
        "_X_x",
        "_message",
    ]


def reference_file() -> descriptor_pb2.FileDescriptorProto:
    """The reference's NodeService file, with NodeExecutionErrorDetails in it, built field by field."""
    file = descriptor_pb2.FileDescriptorProto(
        name="yandex/cloud/datasphere/v1/node_service.proto",
        package="yandex.cloud.datasphere.v1",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    string, struct = (Field.TYPE_STRING, ""), (Field.TYPE_MESSAGE, ".google.protobuf.Struct")
    messages: dict[str, list[tuple[str, tuple[Any, str]]]] = {
        "NodeExecutionRequest": [("folder_id", string), ("node_id", string), ("input", struct)],
        "NodeExecutionResponse": [("output", struct)],
        "AliasExecutionRequest": [("folder_id", string), ("alias_name", string), ("input", struct)],
        "AliasExecutionResponse": [("output", struct)],
        "NodeExecutionErrorDetails": [("error_name", string), ("error_message", string), ("traceback", string)],
    }
    for message_name, fields in messages.items():
        message = file.message_type.add(name=message_name)
        for number, (field_name, (field_type, type_name)) in enumerate(fields, start=1):
            label = Field.LABEL_REPEATED if field_name == "traceback" else Field.LABEL_OPTIONAL
            field = message.field.add(name=field_name, number=number, label=label, type=field_type)
            if type_name:
                field.type_name = type_name
    service = file.service.add(name="NodeService")
    for method, request, response in [("Execute", "Node", "Node"), ("ExecuteAlias", "Alias", "Alias")]:
        service.method.add(
            name=method,
            input_type=f".yandex.cloud.datasphere.v1.{request}ExecutionRequest",
            output_type=f".yandex.cloud.datasphere.v1.{response}ExecutionResponse",
        )
    return file


def test_the_reference_service_compiles_to_its_descriptor(tmp_path: Path) -> None:
    file = reference_file()
    comments = {
        "yandex.cloud.datasphere.v1.NodeService": "Runs nodes and aliases.",
        "yandex.cloud.datasphere.v1.NodeService.ExecuteAlias": "Runs the node an alias routes to.",
        "yandex.cloud.datasphere.v1.NodeExecutionErrorDetails.traceback": "One line per entry.",
    }
    text = render_proto(file, comments)
    assert "  google.protobuf.Struct input = 3;" in text and "  repeated string traceback = 3;" in text
    assert "// Runs nodes and aliases.\nservice NodeService {" in text
    assert "  // One line per entry.\n  repeated string traceback = 3;" in text
    assert compile_proto(text, file.name, tmp_path) == file


# --- render_proto refuses what it cannot render ----------------------------------------------------------------------


def unsupported(change: str) -> descriptor_pb2.FileDescriptorProto:
    file = reference_file()
    message = file.message_type[0]
    if change == "proto2":
        file.syntax = "proto2"
    elif change == "enum_type":
        file.enum_type.add(name="Color").value.add(name="RED", number=0)
    elif change == "nested_type":
        message.nested_type.add(name="Inner")
    elif change == "options":
        message.options.deprecated = True
    elif change == "oneof":
        message.oneof_decl.add(name="choice")
        message.field[0].oneof_index = 0
    elif change == "client_streaming":
        file.service[0].method[0].client_streaming = True
    elif change == "json_name":
        message.field[0].json_name = "folder"
    elif change == "required":
        message.field[0].label = Field.LABEL_REQUIRED
    elif change == "TYPE_ENUM":
        message.field[0].type, message.field[0].type_name = Field.TYPE_ENUM, ".yandex.cloud.datasphere.v1.Color"
    elif change == "field name":
        message.field[0].name = "folder-id"
    elif change == "oneof name":
        message.field[0].proto3_optional, message.field[0].oneof_index = True, 0
        message.oneof_decl.add(name="folder_id_presence")
    elif change == "oneof order":
        for index, field in enumerate(message.field[:2]):
            field.proto3_optional, field.oneof_index = True, 1 - index
            message.oneof_decl.add(name=f"_{field.name}")
    elif change == "oneof without decl":
        message.field[0].oneof_index = 0
    elif change == "repeated optional":
        message.field[0].label, message.field[0].proto3_optional, message.field[0].oneof_index = 3, True, 0
        message.oneof_decl.add(name="_folder_id")
    elif change == "number":
        message.field[0].ClearField("number")
    elif change == "type name":
        message.field[2].type_name = ".google..Struct"
    elif change == "package":
        file.package = "yandex.cloud-datasphere"
    elif change == "import":
        file.dependency.append('evil";\nimport "x.proto')
    return file


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("proto2", "proto2"),
        ("enum_type", "enum_type"),
        ("nested_type", "nested_type"),
        ("options", "options"),
        ("oneof", "choice"),
        ("client_streaming", "streams"),
        ("json_name", "json_name"),
        ("required", "required"),
        ("TYPE_ENUM", "TYPE_ENUM"),
        ("field name", "'folder-id'"),
        ("oneof name", "folder_id_presence"),
        ("oneof order", "folder_id' is not in the synthetic oneof"),
        ("oneof without decl", "folder_id' is in a oneof"),
        ("repeated optional", "repeated and optional"),
        ("number", "no number"),
        ("type name", "'.google..Struct'"),
        ("package", "'yandex.cloud-datasphere'"),
        ("import", "Import 'evil"),
    ],
)
def test_render_proto_refuses_what_it_cannot_render(change: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        render_proto(unsupported(change))


def test_render_proto_refuses_a_comment_on_nothing() -> None:
    with pytest.raises(ValueError, match="yandex.cloud.datasphere.v1.Nope"):
        render_proto(reference_file(), {"yandex.cloud.datasphere.v1.Nope": "x"})


def test_a_file_without_package_and_with_empty_messages_compiles(tmp_path: Path) -> None:
    file = descriptor_pb2.FileDescriptorProto(name="bare.proto", syntax="proto3")
    file.message_type.add(name="Empty")
    holder = file.message_type.add(name="Holder")
    holder.field.add(name="empty", number=1, label=Field.LABEL_OPTIONAL, type=Field.TYPE_MESSAGE, type_name=".Empty")
    holder.field.add(name="Empty", number=2, label=Field.LABEL_REPEATED, type=Field.TYPE_MESSAGE, type_name=".Empty")
    file.service.add(name="S").method.add(name="Empty", input_type=".Empty", output_type=".Holder")
    text = render_proto(file, {"Holder.empty": "A field of a message type in no package."})
    # A field or method named Empty could capture the short name, so those references keep their leading dot.
    assert "message Empty {}" in text and "  .Empty empty = 1;" in text and "  repeated .Empty Empty = 2;" in text
    assert "  rpc Empty(.Empty) returns (Holder);" in text
    assert compile_proto(text, file.name, tmp_path) == file
    node = TypedNode.build(NODE_ID, "no-variables", {}, {})
    assert compile_proto(node.proto_text(), node.file.name, tmp_path) == node.file


def test_render_proto_writes_relative_and_captured_names_as_given() -> None:
    file = descriptor_pb2.FileDescriptorProto(name="g.proto", package="a.google", syntax="proto3")
    message = file.message_type.add(name="M")
    message.field.add(name="s", number=1, type=Field.TYPE_MESSAGE, type_name=".google.protobuf.Struct")
    message.field.add(name="r", number=2, type=Field.TYPE_MESSAGE, type_name="M")
    text = render_proto(file)
    # In package a.google, `google.protobuf.Struct` would mean a.google.protobuf.Struct, so the leading dot stays.
    assert "  .google.protobuf.Struct s = 1;\n  M r = 2;" in text


# --- field numbers that never change meaning ------------------------------------------------------------------------


def test_field_numbers_follow_name_and_type_not_position() -> None:
    first = TypedNode.build(NODE_ID, "n", {"a": "int", "b": "int"}, {"r": "str"})
    reordered = TypedNode.build(NODE_ID, "n", {"b": "int", "a": "int"}, {"r": "str"})
    numbers = {field.name: field.number for field in first.file.message_type[0].field}
    assert numbers == {field.name: field.number for field in reordered.file.message_type[0].field}
    # A client built before the reorder is read right.
    raw = first.request_class(folder_id="f", input={"a": 1, "b": 2}).SerializeToString()  # type: ignore[call-arg]
    assert reordered.decode(raw) == ("f", {"a": 1, "b": 2})
    assert field_number("a", "int") != field_number("a", "bool") != field_number("c", "int")


@pytest.mark.parametrize("inputs", [{"c": "int", "b": "int"}, {"a": "bool", "b": "int"}, {"b": "int"}])
def test_a_client_of_older_variables_is_refused_not_misread(inputs: dict[str, str]) -> None:
    """Renamed, retyped or removed: the old field is unknown to the new node, and the call says so."""
    old = TypedNode.build(NODE_ID, "n", {"a": "int", "b": "int"}, {})
    new = TypedNode.build(NODE_ID, "n", inputs, {})
    raw = old.request_class(folder_id="f", input={"a": 5, "b": 7}).SerializeToString()  # type: ignore[call-arg]
    with pytest.raises(InvalidArgument, match=rf"field number {field_number('a', 'int')}.*variables changed"):
        new.decode(raw)


def test_field_numbers_stay_in_protobufs_range() -> None:
    for index in range(20000):
        number = field_number(f"v{index}", "int")
        assert 1 <= number <= 2**29 - 1 and not 19000 <= number < 20000
