from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cellnode.runtime.variables import VariableTypeError, check_input, check_output, matches, to_json


@pytest.mark.parametrize(
    ("declared", "value", "ok"),
    [
        ("int", 3, True),
        ("int", True, False),
        ("int", 3.0, False),
        ("float", 3, True),
        ("float", 2.5, True),
        ("float", False, False),
        ("str", "x", True),
        ("bool", True, True),
        ("bool", 1, False),
        ("list", [1], True),
        ("dict", {"a": 1}, True),
        ("dict", [], False),
        ("any", None, True),
    ],
)
def test_matches(declared: str, value: Any, ok: bool) -> None:
    assert matches(declared, value) is ok


def test_check_input_names_variable_value_and_expectation() -> None:
    with pytest.raises(VariableTypeError, match=r"Input variable 'n' must be an int; got str 'five'"):
        check_input("n", "int", "five")


def test_numpy_values_become_json() -> None:
    assert check_output("x", "int", np.int64(4)) == 4
    assert check_output("x", "float", np.float32(0.5)) == 0.5
    assert check_output("x", "list", np.arange(3)) == [0, 1, 2]
    assert check_output("x", "dict", {"m": np.eye(2), 1: (np.bool_(True),)}) == {
        "m": [[1.0, 0.0], [0.0, 1.0]],
        "1": [True],
    }


def test_output_type_mismatch_names_the_fix() -> None:
    with pytest.raises(VariableTypeError, match=r"Output variable 'y' must be a dict; the cell left int 3"):
        check_output("y", "dict", 3)


def test_unconvertible_values_name_the_path() -> None:
    with pytest.raises(VariableTypeError, match=r"\['a'\]\[1\] is a set"):
        to_json({"a": [1, {2}]}, "out")
    with pytest.raises(VariableTypeError, match="nan"):
        to_json(float("nan"), "out")
    with pytest.raises(VariableTypeError, match="key of type tuple"):
        to_json({(1, 2): 3}, "out")
