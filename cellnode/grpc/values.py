"""`google.protobuf.Struct`, `ListValue` and `Value` to and from the JSON values a node takes and gives.

A Struct carries every number as a double, so a number that is a whole value within ±2^53 comes out as an int
(`{"left": 1}` sent by grpcurl arrives as 1.0): JSON clients mean ints by them, and cells such as `randint(left,
right)` need them. A float variable that gets one still sees a number; a typed per-node service keeps the
distinction. NaN and the infinities have no JSON form, so an input holding one is refused, naming where it is.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import struct_pb2

from cellnode.exceptions import InvalidArgument

# Doubles hold every integer up to this exactly; beyond it a whole-valued double is not known to be an int.
MAX_EXACT_INT = 2**53


def struct_to_json(struct: struct_pb2.Struct, path: str = "input") -> dict[str, Any]:
    """The JSON object a Struct holds. InvalidArgument names the first NaN or infinity, by its path."""
    return {key: value_to_json(value, f"{path}.{key}") for key, value in struct.fields.items()}


def value_to_json(value: struct_pb2.Value, path: str) -> Any:
    """The JSON value a Value holds; whole numbers within ±2^53 as ints. An unset Value is null."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and -MAX_EXACT_INT <= number <= MAX_EXACT_INT:
            return int(number)
        if not math.isfinite(number):
            raise InvalidArgument(f"{path} is {number}, which JSON cannot carry; send a finite number or null.")
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_json(value.struct_value, path)
    if kind == "list_value":
        return list_to_json(value.list_value, path)
    return None


def list_to_json(values: struct_pb2.ListValue, path: str) -> list[Any]:
    return [value_to_json(item, f"{path}[{index}]") for index, item in enumerate(values.values)]


def json_to_value(data: Any, value: struct_pb2.Value) -> None:
    """Set `value` to the JSON value `data` (None, bool, int, float, str, list or dict)."""
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, (int, float)):
        value.number_value = data
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, dict):
        value.struct_value.SetInParent()  # update({}) alone would leave the Value unset, which reads as null
        value.struct_value.update(data)
    elif isinstance(data, list):
        value.list_value.SetInParent()
        value.list_value.extend(data)
    else:
        raise TypeError(f"{type(data).__name__} is not a JSON value")
