"""The `.proto` source text of a FileDescriptorProto, for the subset cellnode generates.

The subset: proto3; a package; imports; top-level messages whose fields are scalars or messages, singular,
`repeated` or proto3 `optional`; services with unary methods. Anything else (enums, nested types, real oneofs,
options, maps, streaming, ...) raises ValueError naming the construct, because a text that protoc compiles into a
different descriptor would be worse than none.

A proto3 `optional` field is, in a descriptor, a field with `proto3_optional` in a synthetic one-field oneof. protoc
names that oneof itself (`_<field>`, with `X`s prepended while the name is taken), so a descriptor whose synthetic
oneofs are named or ordered otherwise has no source text, and is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from google.protobuf import descriptor_pb2
from google.protobuf.message import Message

FieldProto = descriptor_pb2.FieldDescriptorProto

SCALAR_TYPES: dict[int, str] = {
    FieldProto.TYPE_DOUBLE: "double",
    FieldProto.TYPE_FLOAT: "float",
    FieldProto.TYPE_INT64: "int64",
    FieldProto.TYPE_UINT64: "uint64",
    FieldProto.TYPE_INT32: "int32",
    FieldProto.TYPE_FIXED64: "fixed64",
    FieldProto.TYPE_FIXED32: "fixed32",
    FieldProto.TYPE_BOOL: "bool",
    FieldProto.TYPE_STRING: "string",
    FieldProto.TYPE_BYTES: "bytes",
    FieldProto.TYPE_UINT32: "uint32",
    FieldProto.TYPE_SFIXED32: "sfixed32",
    FieldProto.TYPE_SFIXED64: "sfixed64",
    FieldProto.TYPE_SINT32: "sint32",
    FieldProto.TYPE_SINT64: "sint64",
}

# The descriptor fields each construct may set; any other one is outside the subset.
_ALLOWED = {
    "FileDescriptorProto": {"name", "package", "dependency", "message_type", "service", "syntax"},
    "DescriptorProto": {"name", "field", "oneof_decl"},
    "FieldDescriptorProto": {
        "name",
        "number",
        "label",
        "type",
        "type_name",
        "oneof_index",
        "proto3_optional",
        "json_name",
    },
    "OneofDescriptorProto": {"name"},
    "ServiceDescriptorProto": {"name", "method"},
    "MethodDescriptorProto": {"name", "input_type", "output_type", "client_streaming", "server_streaming"},
}
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_IDENTIFIER = re.compile(_NAME)
_PACKAGE = re.compile(rf"{_NAME}(\.{_NAME})*")
_TYPE_NAME = re.compile(rf"\.?{_NAME}(\.{_NAME})*")
_IMPORT_PATH = re.compile(r"[A-Za-z0-9_./-]+")


def json_name(field_name: str) -> str:
    """protoc's default JSON name of a field: `foo_bar` → `fooBar` (each `_` dropped, the next letter upper)."""
    parts: list[str] = []
    should_upper = False
    for char in field_name:
        if char == "_":
            should_upper = True
        else:
            parts.append(char.upper() if should_upper else char)
            should_upper = False
    return "".join(parts)


def synthetic_oneof_names(field_names: Iterable[str], optional_names: Iterable[str]) -> list[str]:
    """The names protoc gives the synthetic oneofs of `optional_names` (in order) in a message of `field_names`."""
    taken = set(field_names)
    names: list[str] = []
    for field_name in optional_names:
        name = field_name if field_name.startswith("_") else f"_{field_name}"
        while name in taken:
            name = f"X{name}"
        taken.add(name)
        names.append(name)
    return names


def render_proto(file: descriptor_pb2.FileDescriptorProto, comments: dict[str, str] | None = None) -> str:
    """The proto3 source text of `file`; ValueError names the first construct outside the subset.

    Parameters:
        file: the descriptor, with message and method types as fully-qualified (`.google.protobuf.Struct`) or
            relative names.
        comments: a comment per element, keyed by its full name without the leading dot (`pkg`, `pkg.Message`,
            `pkg.Message.field`, `pkg.Service`, `pkg.Service.Method`), written above it as `//` lines.

    Example: `render_proto(file, {"cellnode.nodes.nabc.Input.left": "left: int"})`.
    """
    return _Renderer(file, dict(comments or {})).render()


class _Renderer:
    def __init__(self, file: descriptor_pb2.FileDescriptorProto, comments: dict[str, str]) -> None:
        self.file = file
        self.comments = comments
        self.lines: list[str] = []
        self.package = file.package
        self.prefix = f"{file.package}." if file.package else ""
        # Names a short reference could be captured by: packages on the way down, and this file's own symbols.
        self.scopes = (
            set(file.package.split(".")) | {m.name for m in file.message_type} | {s.name for s in file.service}
        )

    def render(self) -> str:
        file = self.file
        _check_fields(file, f"file {file.name!r}")
        if file.syntax != "proto3":
            raise ValueError(f"File {file.name!r} has syntax {file.syntax or 'proto2'!r}; only proto3 can be rendered.")
        self.lines.append('syntax = "proto3";')
        if file.package:
            if not _PACKAGE.fullmatch(file.package):
                raise ValueError(f"Package {file.package!r} is not a valid proto package name.")
            self.lines.append("")
            self._comment(file.package, "")
            self.lines.append(f"package {file.package};")
        if file.dependency:
            self.lines.append("")
        for path in file.dependency:
            if not _IMPORT_PATH.fullmatch(path):
                raise ValueError(f"Import {path!r} has characters an import path cannot have in proto source.")
            self.lines.append(f'import "{path}";')
        for service in file.service:
            self._service(service)
        for message in file.message_type:
            self._message(message)
        if self.comments:
            raise ValueError(f"Comments name elements that are not in the file: {sorted(self.comments)}.")
        return "\n".join(self.lines) + "\n"

    def _service(self, service: descriptor_pb2.ServiceDescriptorProto) -> None:
        full_name = self._name(service.name, "service")
        _check_fields(service, f"service {full_name!r}")
        self.lines.append("")
        self._comment(full_name, "")
        self.lines.append(f"service {service.name} {{")
        methods = {method.name for method in service.method}
        for method in service.method:
            method_name = f"{full_name}.{self._identifier(method.name, 'method', full_name)}"
            _check_fields(method, f"method {method_name!r}")
            if method.client_streaming or method.server_streaming:
                raise ValueError(f"Method {method_name!r} streams; only unary methods can be rendered.")
            request = self._reference(method.input_type, methods, f"input type of method {method_name!r}")
            response = self._reference(method.output_type, methods, f"output type of method {method_name!r}")
            self._comment(method_name, "  ")
            self.lines.append(f"  rpc {method.name}({request}) returns ({response});")
        self.lines.append("}")

    def _message(self, message: descriptor_pb2.DescriptorProto) -> None:
        full_name = self._name(message.name, "message")
        _check_fields(message, f"message {full_name!r}")
        optional = [field.name for field in message.field if field.proto3_optional]
        expected = synthetic_oneof_names([f.name for f in message.field], optional)
        if [oneof.name for oneof in message.oneof_decl] != expected:
            raise ValueError(
                f"Message {full_name!r} has oneofs {[o.name for o in message.oneof_decl]}; only the synthetic oneofs "
                f"of proto3 optional fields can be rendered, named as protoc names them ({expected})."
            )
        for oneof in message.oneof_decl:
            _check_fields(oneof, f"oneof {full_name}.{oneof.name!r}")
        self.lines.append("")
        self._comment(full_name, "")
        if not message.field:
            self.lines.append(f"message {message.name} {{}}")
            return
        self.lines.append(f"message {message.name} {{")
        names = {field.name for field in message.field} | set(expected)
        oneof_index = iter(range(len(optional)))
        for field in message.field:
            field_name = f"{full_name}.{self._identifier(field.name, 'field', full_name)}"
            # protoc numbers the synthetic oneofs in the order of their fields.
            expected_index = next(oneof_index) if field.proto3_optional else None
            self._comment(field_name, "  ")
            self.lines.append(f"  {self._field(field, field_name, names, expected_index)};")
        self.lines.append("}")

    def _field(
        self, field: descriptor_pb2.FieldDescriptorProto, field_name: str, names: set[str], oneof_index: int | None
    ) -> str:
        _check_fields(field, f"field {field_name!r}")
        if not field.HasField("number"):
            raise ValueError(f"Field {field_name!r} has no number.")
        if field.HasField("json_name") and field.json_name != json_name(field.name):
            raise ValueError(
                f"Field {field_name!r} has a custom json_name {field.json_name!r}; options are not rendered."
            )
        if field.label == FieldProto.LABEL_REPEATED:
            label = "repeated "
        elif field.label == FieldProto.LABEL_REQUIRED:
            raise ValueError(f"Field {field_name!r} is required, which proto3 does not have.")
        else:
            label = ""
        if field.proto3_optional:
            if label:
                raise ValueError(f"Field {field_name!r} is both repeated and optional.")
            if field.oneof_index != oneof_index or not field.HasField("oneof_index"):
                raise ValueError(f"Field {field_name!r} is not in the synthetic oneof protoc would give it.")
            label = "optional "
        elif field.HasField("oneof_index"):
            raise ValueError(f"Field {field_name!r} is in a oneof; only proto3 optional fields can be rendered.")
        if field.type == FieldProto.TYPE_MESSAGE:
            type_name = self._reference(field.type_name, names, f"type of field {field_name!r}")
        elif field.type in SCALAR_TYPES and not field.type_name:
            type_name = SCALAR_TYPES[field.type]
        else:
            kind = FieldProto.Type.Name(field.type) if field.type else "no type"
            raise ValueError(f"Field {field_name!r} has {kind}; only scalar and message fields can be rendered.")
        return f"{label}{type_name} {field.name} = {field.number}"

    def _reference(self, type_name: str, siblings: set[str], what: str) -> str:
        """How to write a type reference: short when nothing in scope can capture it, else fully qualified."""
        if not _TYPE_NAME.fullmatch(type_name):
            raise ValueError(f"The {what} is {type_name!r}, which is not a valid type name.")
        if not type_name.startswith("."):
            return type_name
        full = type_name[1:]
        local = full.removeprefix(self.prefix) if full.startswith(self.prefix) else None
        local_names = {m.name for m in self.file.message_type}
        if local is not None and local in local_names and local not in siblings:
            return local
        if full.split(".")[0] in self.scopes:
            return type_name
        return full

    def _name(self, name: str, kind: str) -> str:
        return self.prefix + self._identifier(name, kind, self.package or "the file")

    def _identifier(self, name: str, kind: str, where: str) -> str:
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"The {kind} name {name!r} in {where} is not a valid proto identifier.")
        return name

    def _comment(self, full_name: str, indent: str) -> None:
        text = self.comments.pop(full_name, None)
        if text is not None:
            self.lines.extend(f"{indent}// {line}".rstrip() for line in text.splitlines() or [""])


def _check_fields(proto: Message, what: str) -> None:
    """Refuse any descriptor field outside the subset (options, enums, nested types, extensions, ...)."""
    allowed = _ALLOWED[proto.DESCRIPTOR.name]
    for field, _ in proto.ListFields():
        if field.name not in allowed:
            raise ValueError(f"The {what} sets {field.name!r}, which render_proto does not render.")
