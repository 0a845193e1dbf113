"""The typed gRPC service of a cell node: `cellnode.nodes.n<id>.Node/Execute`, one field per variable.

Beside `yandex.cloud.datasphere.v1.NodeService`, whose input and output are Structs, each node has a service of its
own, so that a client generated from its `.proto` (or grpcurl, through reflection) gets real fields:

```proto
package cellnode.nodes.n<id>;
service Node { rpc Execute(ExecuteRequest) returns (ExecuteResponse); }
message Input { optional int64 left = 1; google.protobuf.Struct options = 2; }   // one field per input variable
message Output { optional double total = 1; }                                     // one field per output variable
message ExecuteRequest { string folder_id = 1; Input input = 2; }
message ExecuteResponse { Output output = 1; }
```

int, float, str and bool variables are proto3 `optional` int64, double, string and bool, so that an input left out is
missing rather than 0, "" or false; list, dict and any are `google.protobuf.ListValue`, `Struct` and `Value`. Unlike a
Struct, the typed form keeps ints and floats apart, and carries an int exactly up to int64.

Messages are dynamic (a DescriptorPool per node and `message_factory`), built once per set of variables; decoding and
encoding a call only reads and sets fields.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from cellnode.exceptions import InvalidArgument, OutputError, TypedServiceError
from cellnode.grpc.protos import SERVICE, STRUCT_FILE
from cellnode.grpc.render import json_name, render_proto, synthetic_oneof_names
from cellnode.grpc.values import json_to_value, list_to_json, struct_to_json, value_to_json
from cellnode.runtime.variables import type_name

PACKAGE_PREFIX = "cellnode.nodes"
NODE_SERVICE = SERVICE

UNTYPABLE = (
    "{kind} variable {name!r} {reason}, so node {node_id!r} has no typed service ({service}); "
    f"it still serves through {NODE_SERVICE}."
)
NOT_A_REQUEST = (
    "The request is not a valid {message} ({error}); build it from the node's current {file} "
    "(gRPC reflection serves it)."
)
UNCARRIED = (
    "Output variable {name!r} is {value}, which the typed service {service} cannot carry as {field_type}; "
    f"call {NODE_SERVICE}/Execute, whose Struct output carries any JSON value (numbers as doubles)."
)
NOT_FINITE = "{path} is {value}, which JSON cannot carry; send a finite number."
STALE = (
    "The request's input sets field number {number}, which node {node_id!r} does not have: its variables changed "
    "since the client's .proto was made. Get {file} again ('cellnode node proto {node_id}', or reflection)."
)

# (inputs, outputs) as tuples of (name, type): what a TypedNode was built from.
Signature = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]

_Field = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"int": _Field.TYPE_INT64, "float": _Field.TYPE_DOUBLE, "str": _Field.TYPE_STRING, "bool": _Field.TYPE_BOOL}
_MESSAGES = {"list": "ListValue", "dict": "Struct", "any": "Value"}
# How each variable type appears in error messages and in the .proto's comments.
_FIELD_TYPES = {
    "int": "int64 (-2^63 to 2^63 - 1)",
    "float": "double",
    "str": "string",
    "bool": "bool",
    "list": "google.protobuf.ListValue",
    "dict": "google.protobuf.Struct",
    "any": "google.protobuf.Value",
}
_NODE_ID = re.compile(r"[a-z0-9]+")
_SERVICE = re.compile(r"cellnode\.nodes\.n([a-z0-9]+)\.Node")
_SYMBOL = re.compile(r"cellnode\.nodes\.n([a-z0-9]+)(?:\.[A-Za-z0-9_.]+)?")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_FIELD_NUMBER = 2**29 - 1
RESERVED_NUMBERS = range(19000, 20000)  # protobuf's own


def package_of(node_id: str) -> str:
    """The proto package of a node's typed service: `cellnode.nodes.n<node_id>`."""
    if not _NODE_ID.fullmatch(node_id):
        raise ValueError(f"Node ID {node_id!r} must be lowercase letters and digits.")
    return f"{PACKAGE_PREFIX}.n{node_id}"


def node_id_of_service(full_service_name: str) -> str | None:
    """The node whose typed service this is (`cellnode.nodes.nabc.Node` → `abc`); None for any other name."""
    match = _SERVICE.fullmatch(full_service_name)
    return match.group(1) if match else None


def node_id_of_symbol(symbol: str) -> str | None:
    """The node whose package holds `symbol` (`cellnode.nodes.nabc.Input`, `...nabc.Node.Execute` → `abc`)."""
    match = _SYMBOL.fullmatch(symbol)
    return match.group(1) if match else None


def signature_of(inputs: Mapping[str, str], outputs: Mapping[str, str]) -> Signature:
    """What a TypedNode depends on; compare it with `TypedNode.signature` to tell whether one is stale."""
    return tuple(inputs.items()), tuple(outputs.items())


def build_file(
    node_id: str, inputs: Mapping[str, str], outputs: Mapping[str, str]
) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto of a node's typed service. TypedServiceError names a variable that cannot be a field."""
    package = package_of(node_id)
    file = descriptor_pb2.FileDescriptorProto(name=f"cellnode/nodes/n{node_id}.proto", package=package, syntax="proto3")
    if any(declared in _MESSAGES for declared in (*inputs.values(), *outputs.values())):
        file.dependency.append(STRUCT_FILE)
    for kind, variables in (("Input", inputs), ("Output", outputs)):
        _check_names(kind, variables, node_id)
        message = file.message_type.add(name=kind)
        numbers = _field_numbers(kind, variables, node_id)
        for name, declared in variables.items():
            field = message.field.add(name=name, number=numbers[name], label=_Field.LABEL_OPTIONAL)
            if declared in _SCALARS:
                field.type = _SCALARS[declared]
                field.proto3_optional = True
            else:
                field.type, field.type_name = _Field.TYPE_MESSAGE, f".google.protobuf.{_MESSAGES[declared]}"
        optional = [field for field in message.field if field.proto3_optional]
        # Named and ordered as protoc makes the oneofs of `optional` fields, so that our .proto text compiles to this.
        oneof_names = synthetic_oneof_names(list(variables), [field.name for field in optional])
        for index, (field, oneof_name) in enumerate(zip(optional, oneof_names, strict=True)):
            field.oneof_index = index
            message.oneof_decl.add(name=oneof_name)
    request = file.message_type.add(name="ExecuteRequest")
    request.field.add(name="folder_id", number=1, label=_Field.LABEL_OPTIONAL, type=_Field.TYPE_STRING)
    request.field.add(
        name="input", number=2, label=_Field.LABEL_OPTIONAL, type=_Field.TYPE_MESSAGE, type_name=f".{package}.Input"
    )
    response = file.message_type.add(name="ExecuteResponse")
    response.field.add(
        name="output", number=1, label=_Field.LABEL_OPTIONAL, type=_Field.TYPE_MESSAGE, type_name=f".{package}.Output"
    )
    service = file.service.add(name="Node")
    service.method.add(
        name="Execute", input_type=f".{package}.ExecuteRequest", output_type=f".{package}.ExecuteResponse"
    )
    return file


def field_number(name: str, declared: str) -> int:
    """A variable's field number, from its name and type: a number never changes meaning when a node's variables
    change (renamed, retyped, reordered, removed), so a client built from an older .proto is refused (an unknown
    field) or still right (the same variable), never silently misread."""
    digest = int.from_bytes(hashlib.blake2b(f"{name}:{declared}".encode(), digest_size=8).digest(), "big")
    number = digest % (MAX_FIELD_NUMBER - len(RESERVED_NUMBERS)) + 1
    return number + len(RESERVED_NUMBERS) if number >= RESERVED_NUMBERS.start else number


def _field_numbers(kind: str, variables: Mapping[str, str], node_id: str) -> dict[str, int]:
    numbers: dict[str, int] = {}
    for name, declared in variables.items():
        number = field_number(name, declared)
        other = next((taken for taken, n in numbers.items() if n == number), None)
        if other is not None:  # about one chance in 10^8 for a pair of names
            reason = f"has the same field number ({number}) as {other!r}; rename one of the two"
            raise TypedServiceError(
                UNTYPABLE.format(kind=kind, name=name, reason=reason, node_id=node_id, service=_service(node_id))
            )
        numbers[name] = number
    return numbers


def _service(node_id: str) -> str:
    return f"{package_of(node_id)}.Node"


def _check_names(kind: str, variables: Mapping[str, str], node_id: str) -> None:
    service = f"{package_of(node_id)}.Node"
    by_json_name: dict[str, str] = {}
    for name, declared in variables.items():
        if not _FIELD_NAME.fullmatch(name):
            reason = "cannot be a protobuf field name (one must match [A-Za-z_][A-Za-z0-9_]*)"
        elif declared not in _FIELD_TYPES:
            reason = f"has type {declared!r}, which has no protobuf field type"
        elif json_name(name) in by_json_name:
            other = by_json_name[json_name(name)]
            reason = f"has the proto3 JSON name {json_name(name)!r}, as {other!r} has (protoc refuses the pair)"
        else:
            by_json_name[json_name(name)] = name
            continue
        raise TypedServiceError(UNTYPABLE.format(kind=kind, name=name, reason=reason, node_id=node_id, service=service))


class TypedNode:
    """The typed service of one node, as its variables are now: descriptors, message classes, and the codec.

    Build one with `TypedNode.build("k3j2...", "randomizer-node", {"left": "int"}, {"total": "float"})`.
    """

    def __init__(
        self,
        node_id: str,
        name: str,
        inputs: Mapping[str, str],
        outputs: Mapping[str, str],
        file: descriptor_pb2.FileDescriptorProto,
        pool: descriptor_pool.DescriptorPool,
    ) -> None:
        self.node_id = node_id
        self.name = name
        self.inputs = dict(inputs)
        self.outputs = dict(outputs)
        self.file = file
        self.pool = pool
        self.package = file.package
        self.service_name = f"{self.package}.Node"
        self.method_path = f"/{self.service_name}/Execute"
        self.signature = signature_of(inputs, outputs)
        self.request_class: type[Message] = self._class("ExecuteRequest")
        self.response_class: type[Message] = self._class("ExecuteResponse")
        # Unbound, from the class: a variable may be named `ListFields` or `SetInParent`, and a field shadows the
        # method of the same name on an instance.
        self._list_input_fields: Callable[[Any], Sequence[tuple[Any, Any]]] = self._class("Input").ListFields
        self._set_output_in_parent: Callable[[Any], None] = self._class("Output").SetInParent
        self._readers = {name: _READERS[declared] for name, declared in self.inputs.items() if declared in _READERS}
        self._writers = [(name, declared, _WRITERS[declared]) for name, declared in self.outputs.items()]

    @classmethod
    def build(cls, node_id: str, name: str, inputs: Mapping[str, str], outputs: Mapping[str, str]) -> TypedNode:
        """The typed service of node `node_id` (called `name`) with these variables, in declared order.

        TypedServiceError names a variable that cannot be a field (not an identifier, or a proto3 JSON name that
        another variable has); such a node has no typed service but still serves through NodeService.
        """
        file = build_file(node_id, inputs, outputs)
        # A pool of its own: a node's variables change, and a pool cannot drop a file.
        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
        pool.Add(file)
        return cls(node_id, name, inputs, outputs, file, pool)

    def proto_text(self) -> str:
        """The service's `.proto` source, with comments naming the node and each variable's declared type."""
        package = self.package
        comments = {
            package: f"The typed service of cell node {self.name!r} (ID {self.node_id}), generated by cellnode.\n"
            f"The node also serves through {NODE_SERVICE}, whose input and output are Structs.",
            f"{package}.Node": f"Runs node {self.name!r}.",
            f"{package}.Node.Execute": "Runs the cell once with the inputs and answers its outputs.",
            f"{package}.Input": "The input variables of the node; a field left unset is a missing input.",
            f"{package}.Output": "The output variables of the node.",
            f"{package}.ExecuteRequest.folder_id": (
                "The calling folder, matched with the node's ACL (as in NodeService); or send x-folder-id metadata."
            ),
        }
        for kind, variables in (("Input", self.inputs), ("Output", self.outputs)):
            for name, declared in variables.items():
                comments[f"{package}.{kind}.{name}"] = f"{name}: {declared}" + (
                    " (any JSON value)" * (declared == "any")
                )
        return render_proto(self.file, comments)

    def decode(self, raw: bytes) -> tuple[str, dict[str, Any]]:
        """The folder ID and the inputs (as JSON values) of a serialized ExecuteRequest.

        An input whose field is not set is left out of the dict, for the caller's check of the node's variables to
        report as missing ("Input variable 'x' is missing"): a proto3 `optional` scalar set to 0, "" or false is
        present. InvalidArgument for bytes that are not an ExecuteRequest, or a double that is NaN or infinite.
        """
        try:
            request: Any = self.request_class.FromString(raw)
        except DecodeError as exc:
            message = f"{self.package}.ExecuteRequest"
            raise InvalidArgument(NOT_A_REQUEST.format(message=message, error=exc, file=self.file.name)) from exc
        unknown = UnknownFieldSet(request.input)
        if len(unknown):
            raise InvalidArgument(
                STALE.format(number=unknown[0].field_number, node_id=self.node_id, file=self.file.name)
            )
        inputs: dict[str, Any] = {}
        for field, value in self._list_input_fields(request.input):
            name = field.name
            reader = self._readers.get(name)
            inputs[name] = value if reader is None else reader(value, f"input.{name}")
        return request.folder_id, inputs

    def encode(self, output_json: bytes) -> bytes:
        """The serialized ExecuteResponse for the JSON object of outputs an instance returned.

        Keys that are not declared outputs are left out. OutputError names an output that its field cannot carry:
        an int beyond int64, or a value of another type than the one declared. An int is a valid float.
        """
        try:
            outputs = orjson.loads(output_json)
        except orjson.JSONDecodeError as exc:
            raise OutputError(f"The instance's outputs are not JSON ({exc}); the typed service cannot answer.") from exc
        if not isinstance(outputs, dict):
            raise OutputError(f"The instance's outputs are {type_name(outputs)}, not a JSON object of variables.")
        response: Any = self.response_class()
        message = response.output
        self._set_output_in_parent(message)
        for name, declared, write in self._writers:
            if name not in outputs:
                continue
            value = outputs[name]
            try:
                write(message, name, value)
            except (TypeError, ValueError, OverflowError) as exc:
                raise OutputError(
                    UNCARRIED.format(
                        name=name, value=_describe(value), service=self.service_name, field_type=_FIELD_TYPES[declared]
                    )
                ) from exc
        serialized: bytes = response.SerializeToString()
        return serialized

    def _class(self, message: str) -> type[Message]:
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(f"{self.package}.{message}"))


def _read_double(value: float, path: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(NOT_FINITE.format(path=path, value=value))
    return value


_READERS: dict[str, Callable[[Any, str], Any]] = {
    "float": _read_double,
    "list": list_to_json,
    "dict": struct_to_json,
    "any": value_to_json,
}


def _write_scalar(python_types: tuple[type, ...]) -> Callable[[Any, str, Any], None]:
    def write(message: Any, name: str, value: Any) -> None:
        # `type(...) in`, not isinstance: a bool is not an int here, as in the node's own checks.
        if type(value) not in python_types:
            raise TypeError(f"expected {python_types}")
        # The runtime refuses an int beyond int64 with ValueError.
        setattr(message, name, value)

    return write


def _write_double(message: Any, name: str, value: Any) -> None:
    if type(value) not in (int, float):
        raise TypeError("expected a number")
    setattr(message, name, float(value))


def _write_list(message: Any, name: str, value: Any) -> None:
    if type(value) is not list:
        raise TypeError("expected a list")
    field = getattr(message, name)
    field.SetInParent()  # so that [] is set, not missing
    field.extend(value)


def _write_struct(message: Any, name: str, value: Any) -> None:
    if type(value) is not dict:
        raise TypeError("expected a dict")
    field = getattr(message, name)
    field.SetInParent()  # so that {} is set, not missing
    field.update(value)


def _write_value(message: Any, name: str, value: Any) -> None:
    json_to_value(value, getattr(message, name))


_WRITERS: dict[str, Callable[[Any, str, Any], None]] = {
    "int": _write_scalar((int,)),
    "float": _write_double,
    "str": _write_scalar((str,)),
    "bool": _write_scalar((bool,)),
    "list": _write_list,
    "dict": _write_struct,
    "any": _write_value,
}


def _describe(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return f"{type_name(value)} {text if len(text) <= limit else text[: limit - 3] + '...'}"
