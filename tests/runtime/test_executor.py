from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cellnode.runtime.executor import Executor
from cellnode.runtime.loader import load
from cellnode.runtime.protocol import CELL_ERROR, FAILURE, INTERRUPTED, OK, OUTPUT_ERROR
from tests.runtime.checkpoints import launch_spec, randomizer_spec

pytestmark = pytest.mark.usefixtures("keep_main")


def executor_for(spec: dict[str, Any]) -> Executor:
    ns, code = load(spec)
    return Executor(ns, code, spec["outputs"])


def run(executor: Executor, inputs: dict[str, Any]) -> tuple[int, Any]:
    kind, payload = executor.execute(json.dumps(inputs).encode())
    return kind, json.loads(payload)


def test_randomizer(tmp_path: Path) -> None:
    executor = executor_for(randomizer_spec(tmp_path))
    for _ in range(20):
        kind, answer = run(executor, {"input_data": {"left_bound": 1, "right_bound": 10}})
        assert kind == OK
        assert answer.keys() == {"output_data"}
        assert answer["output_data"].keys() == {"generated_value"}
        assert 1 <= answer["output_data"]["generated_value"] <= 10


def test_function_reads_the_request_input_as_a_global(tmp_path: Path) -> None:
    setup = ("x = 0\ndef double():\n    return x * 2\n",)
    executor = executor_for(launch_spec(tmp_path, "y = double()", setup=setup, outputs={"y": "int"}))
    assert run(executor, {"x": 21}) == (OK, {"y": 42})
    assert run(executor, {"x": 5}) == (OK, {"y": 10})


def test_rebinding_is_not_seen_by_the_next_request(tmp_path: Path) -> None:
    source = "if flag:\n    counter = 100\ny = counter\n"
    executor = executor_for(launch_spec(tmp_path, source, setup=("counter = 1",), outputs={"y": "int"}))
    assert run(executor, {"flag": True}) == (OK, {"y": 100})
    assert run(executor, {"flag": False}) == (OK, {"y": 1})


def test_inputs_and_new_names_do_not_leak(tmp_path: Path) -> None:
    source = "y = 'fresh' if 'scratch' not in globals() else 'leaked'\nscratch = 1\n"
    executor = executor_for(launch_spec(tmp_path, source, outputs={"y": "str"}))
    assert run(executor, {}) == (OK, {"y": "fresh"})
    assert run(executor, {}) == (OK, {"y": "fresh"})


def test_in_place_mutation_persists(tmp_path: Path) -> None:
    executor = executor_for(
        launch_spec(tmp_path, "calls.append(1)\nn = len(calls)", setup=("calls = []",), outputs={"n": "int"})
    )
    assert run(executor, {}) == (OK, {"n": 1})
    assert run(executor, {}) == (OK, {"n": 2})


def test_numpy_outputs_become_json(tmp_path: Path) -> None:
    source = "scalar = np.float64(1.5)\ncount = np.int64(3)\narray = np.arange(3)\nmatrix = np.eye(2)\n"
    outputs = {"scalar": "float", "count": "int", "array": "list", "matrix": "any"}
    executor = executor_for(launch_spec(tmp_path, source, setup=("import numpy as np",), outputs=outputs))
    assert run(executor, {}) == (
        OK,
        {"scalar": 1.5, "count": 3, "array": [0, 1, 2], "matrix": [[1.0, 0.0], [0.0, 1.0]]},
    )


def test_non_ascii_output_is_utf8(tmp_path: Path) -> None:
    executor = executor_for(launch_spec(tmp_path, "s = 'привет'", outputs={"s": "str"}))
    kind, payload = executor.execute(b"{}")
    assert (kind, payload) == (OK, '{"s":"привет"}'.encode())


def test_missing_output(tmp_path: Path) -> None:
    executor = executor_for(launch_spec(tmp_path, "y = 1", outputs={"y": "int", "z": "int"}))
    assert run(executor, {}) == (
        OUTPUT_ERROR,
        {
            "message": "Output variable 'z' was not assigned by the cell. Assign it in the deployed cell, "
            "or remove it from the node's outputs."
        },
    )


def test_wrong_output_type(tmp_path: Path) -> None:
    executor = executor_for(launch_spec(tmp_path, "y = 'text'", outputs={"y": "int"}))
    kind, answer = run(executor, {})
    assert kind == OUTPUT_ERROR
    assert answer["message"].startswith("Output variable 'y' must be an int; the cell left str 'text'.")


def test_unconvertible_output(tmp_path: Path) -> None:
    executor = executor_for(launch_spec(tmp_path, "y = object()", outputs={"y": "any"}))
    kind, answer = run(executor, {})
    assert kind == OUTPUT_ERROR
    assert "cannot be returned as JSON" in answer["message"]


def test_lone_surrogate_output(tmp_path: Path) -> None:
    executor = executor_for(launch_spec(tmp_path, "y = '\\ud800'", outputs={"y": "str"}))
    kind, answer = run(executor, {})
    assert kind == OUTPUT_ERROR
    assert answer["message"].startswith("The outputs cannot be encoded as UTF-8 JSON")


def test_raising_cell(tmp_path: Path) -> None:
    setup = ("def check(x):\n    if x < 0:\n        raise ValueError(f'negative: {x}')\n    return x\n",)
    source = "a = 1\ny = check(x)\n"
    executor = executor_for(launch_spec(tmp_path, source, setup=setup, outputs={"y": "int"}))
    kind, answer = run(executor, {"x": -1})
    assert kind == CELL_ERROR
    assert answer["error_name"] == "ValueError"
    assert answer["error_message"] == "negative: -1"
    traceback = answer["traceback"]
    assert traceback[0] == "Traceback (most recent call last):\n"
    assert traceback[1].startswith('  File "<cell>", line 2, in <module>\n    y = check(x)\n')
    assert traceback[-1] == "ValueError: negative: -1\n"
    assert not any("cellnode" in line for line in traceback)
    assert run(executor, {"x": 3}) == (OK, {"y": 3})


def test_sys_exit_in_the_cell_is_a_cell_error(tmp_path: Path) -> None:
    executor = executor_for(launch_spec(tmp_path, "import sys\nsys.exit(3)"))
    kind, answer = run(executor, {})
    assert (kind, answer["error_name"]) == (CELL_ERROR, "SystemExit")


def test_keyboard_interrupt_is_interrupted(tmp_path: Path) -> None:
    executor = executor_for(launch_spec(tmp_path, "raise KeyboardInterrupt"))
    assert run(executor, {}) == (
        INTERRUPTED,
        {"message": "The cell was interrupted after running past the node's timeout."},
    )


def test_sigint_handler_only_interrupts_a_running_cell(tmp_path: Path) -> None:
    executor = executor_for(launch_spec(tmp_path, "handler(2, None)", setup=()))
    executor.handle_sigint(2, None)  # Idle: ignored.
    executor._ns["handler"] = executor.handle_sigint
    assert run(executor, {})[0] == INTERRUPTED


@pytest.mark.parametrize(("payload", "expected"), [(b"{bad", "not valid JSON"), (b"[1]", "not a JSON object")])
def test_bad_payload_is_a_failure(tmp_path: Path, payload: bytes, expected: str) -> None:
    executor = executor_for(launch_spec(tmp_path, "y = 1"))
    kind, answer = executor.execute(payload)
    assert kind == FAILURE
    assert expected in json.loads(answer)["message"]
