"""The variable types of a cell node, shared by the front (input checks) and the instance (output checks).

Standard library only: this module runs inside instances, which may have nothing of cellnode installed.

A type is one of `int`, `float`, `str`, `bool`, `list`, `dict` or `any` (any JSON value). An int is a valid
float; a bool is not an int. Values that are not plain JSON but behave like numpy scalars (`.item()`) or arrays
(`.tolist()`) are converted first, and tuples become lists.
"""

from __future__ import annotations

import math
from typing import Any

TYPES = ("int", "float", "str", "bool", "list", "dict", "any")

JSON_SCHEMAS: dict[str, dict[str, Any]] = {
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "str": {"type": "string"},
    "bool": {"type": "boolean"},
    "list": {"type": "array"},
    "dict": {"type": "object"},
    "any": {},
}


class VariableTypeError(ValueError):
    """A value does not match its declared type, or cannot become JSON."""


def type_name(value: Any) -> str:
    """The name people know a value's type by: JSON names for JSON values, the Python type otherwise."""
    if value is None:
        return "null"
    for json_type, python_type in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if type(value) is python_type:
            return json_type
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")


def matches(declared: str, value: Any) -> bool:
    """Whether a JSON value fits a declared type."""
    if declared == "any":
        return True
    if declared == "float":
        return type(value) in (int, float)
    if declared == "int":
        return type(value) is int
    return type(value) is {"str": str, "bool": bool, "list": list, "dict": dict}[declared]


def check_input(name: str, declared: str, value: Any) -> None:
    """Raise VariableTypeError, naming the variable, the value and the expected type, on a mismatch."""
    if not matches(declared, value):
        raise VariableTypeError(
            f"Input variable {name!r} must be {_article(declared)}; got {type_name(value)} {_preview(value)}."
        )


def to_json(value: Any, path: str) -> Any:
    """Convert a Python value into plain JSON values, or raise VariableTypeError naming `path`."""
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise VariableTypeError(
                f"{path} is {value!r}, which JSON cannot represent; replace it with None or a number."
            )
        return value
    if isinstance(value, dict):
        converted = {}
        for key, item in value.items():
            if type(key) is not str:
                if type(key) in (int, bool) or isinstance(key, float):
                    key = str(key)
                else:
                    raise VariableTypeError(
                        f"{path} has a key of type {type_name(key)} ({key!r}); JSON keys are strings."
                    )
            converted[key] = to_json(item, f"{path}[{key!r}]")
        return converted
    if isinstance(value, (list, tuple)):
        return [to_json(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, (bool, int, float, str)):
        # Subclasses such as IntEnum or numpy.float64 (a float subclass).
        return to_json({bool: bool, int: int, float: float, str: str}[_base(value)](value), path)
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and hasattr(value, "dtype"):
        # A numpy array or scalar: .tolist() gives plain Python values.
        return to_json(tolist(), path)
    item = getattr(value, "item", None)
    if callable(item) and hasattr(value, "dtype"):
        return to_json(item(), path)
    raise VariableTypeError(
        f"{path} is a {type_name(value)}, which cannot be returned as JSON; convert it to "
        "a number, string, bool, list or dict in the cell."
    )


def check_output(name: str, declared: str, value: Any) -> Any:
    """The JSON form of an output variable, checked against its declared type."""
    converted = to_json(value, f"Output variable {name!r}")
    if not matches(declared, converted):
        raise VariableTypeError(
            f"Output variable {name!r} must be {_article(declared)}; the cell left "
            f"{type_name(value)} {_preview(converted)}. Assign {_article(declared)} to {name!r} in the cell, "
            "or declare the output with another type."
        )
    return converted


def _base(value: Any) -> type:
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base
    raise AssertionError("unreachable")  # pragma: no cover


def _article(declared: str) -> str:
    if declared == "any":
        return "a JSON value"
    return {"int": "an int", "float": "a float (or int)"}.get(declared, f"a {declared}")


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
