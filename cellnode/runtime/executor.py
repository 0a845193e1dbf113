"""Run the deployed cell once per request, against the namespace loaded from the checkpoint.

Standard library only (plus `cellnode.runtime`): this module runs inside instances, on the hot path.

Each request starts from the checkpoint's state: the executor copies the namespace before it binds the inputs and
puts the copy back afterwards, so a request never sees another request's rebinding of a top-level name. The copy is
shallow: a cell that mutates an object in place (appends to a list it did not create) changes it for every later
request, as it would in the notebook.
"""

from __future__ import annotations

import json
import sys
import traceback
import types
from typing import Any

from cellnode.runtime.loader import CELL_FILENAME
from cellnode.runtime.protocol import CELL_ERROR, FAILURE, INTERRUPTED, OK, OUTPUT_ERROR
from cellnode.runtime.variables import VariableTypeError, check_output

MISSING_OUTPUT = (
    "Output variable {name!r} was not assigned by the cell. Assign it in the deployed cell, "
    "or remove it from the node's outputs."
)
INTERRUPTED_MESSAGE = "The cell was interrupted after running past the node's timeout."

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_message(message: str) -> bytes:
    """The `{"message": ...}` payload of an error frame."""
    return _encoder.encode({"message": message}).encode()


_INTERRUPTED_PAYLOAD = encode_message(INTERRUPTED_MESSAGE)


class Executor:
    """Runs the compiled cell for one request at a time and turns the outcome into an answer frame."""

    def __init__(self, namespace: dict[str, Any], code: types.CodeType, outputs: dict[str, str]) -> None:
        self._ns = namespace
        self._code = code
        self._outputs = tuple(outputs.items())
        self.is_executing = False

    def handle_sigint(self, signum: int, frame: types.FrameType | None) -> None:
        """The SIGINT handler: interrupt the running cell; ignore the signal between requests."""
        if self.is_executing:
            raise KeyboardInterrupt

    def execute(self, payload: bytes) -> tuple[int, bytes]:
        """The answer frame (kind, payload) for an EXECUTE payload."""
        try:
            inputs = json.loads(payload)
        except ValueError as exc:
            message = f"The EXECUTE payload is not valid JSON ({exc}); the front sent a bad frame."
            return FAILURE, encode_message(message)
        if type(inputs) is not dict:
            return FAILURE, encode_message("The EXECUTE payload is not a JSON object; the front sent a bad frame.")
        ns = self._ns
        saved = ns.copy()
        try:
            ns.update(inputs)
            return self._run(ns)
        finally:
            ns.clear()
            ns.update(saved)
            _flush()

    def _run(self, ns: dict[str, Any]) -> tuple[int, bytes]:
        try:
            self.is_executing = True
            try:
                exec(self._code, ns)
            finally:
                self.is_executing = False
        except KeyboardInterrupt:
            return INTERRUPTED, _INTERRUPTED_PAYLOAD
        except BaseException as exc:  # SystemExit from the cell is the cell's error too.
            return CELL_ERROR, _cell_error(exc)
        outputs: dict[str, Any] = {}
        for name, declared in self._outputs:
            try:
                value = ns[name]
            except KeyError:
                return OUTPUT_ERROR, encode_message(MISSING_OUTPUT.format(name=name))
            try:
                outputs[name] = check_output(name, declared, value)
            except VariableTypeError as exc:
                return OUTPUT_ERROR, encode_message(str(exc))
        try:
            return OK, _encoder.encode(outputs).encode()
        except (ValueError, UnicodeError) as exc:
            # A lone surrogate in a string, say: valid in Python, not in UTF-8.
            return OUTPUT_ERROR, encode_message(f"The outputs cannot be encoded as UTF-8 JSON: {exc}.")


def _cell_error(exc: BaseException) -> bytes:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != CELL_FILENAME:
        tb = tb.tb_next
    error = {
        "error_name": type(exc).__name__,
        "error_message": _safe_str(exc),
        "traceback": traceback.format_exception(type(exc), exc, tb),
    }
    return json.dumps(error, ensure_ascii=False).encode("utf-8", "replace")


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} whose str() raised>"


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
