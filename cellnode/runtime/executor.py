"""Run the deployed cell once per request, against the namespace loaded from the checkpoint, under a state policy.

Standard library only (plus `cellnode.runtime`): this module runs inside instances, on the hot path.

The launch spec's `"state"` chooses what a request may leave behind for the next one:

- `isolated` (the default): each request starts from the checkpoint's top-level bindings. The executor copies the
  namespace before it binds the inputs and puts the copy back afterwards, so a request never sees another request's
  rebinding of a top-level name. The copy is shallow: a cell that mutates an object in place (appends to a list it did
  not create) changes it for every later request, as it would in the notebook.
- `persistent`: the reference platform's semantics. The namespace is never restored: whatever a request binds or
  mutates stays on its instance (the inputs are bound afresh for each request).
- `fork`: each request runs in a child forked from the instance (`cellnode.runtime.forking`), which answers and exits,
  so nothing the cell does, even inside objects, reaches a later request.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any

from cellnode.runtime.loader import CELL_FILENAME, EXIT_BAD_SPEC, LoadError
from cellnode.runtime.logs import NO_REQUEST, ProcessLog
from cellnode.runtime.protocol import CELL_ERROR, FAILURE, INTERRUPTED, OK, OUTPUT_ERROR
from cellnode.runtime.variables import VariableTypeError, check_output

STATES = ("isolated", "persistent", "fork")
DEFAULT_STATE = "isolated"
MISSING_OUTPUT = (
    "Output variable {name!r} was not assigned by the cell. Assign it in the deployed cell, "
    "or remove it from the node's outputs."
)
INTERRUPTED_MESSAGE = "The cell was interrupted after running past the node's timeout."

Answer = tuple[int, bytes]

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_message(message: str) -> bytes:
    """The `{"message": ...}` payload of an error frame."""
    return _encoder.encode({"message": message}).encode()


INTERRUPTED_ANSWER = (INTERRUPTED, encode_message(INTERRUPTED_MESSAGE))


def read_state(spec: dict[str, Any]) -> str:
    """The launch spec's state policy; LoadError (exit 2) if it names none of STATES."""
    state = spec.get("state", DEFAULT_STATE)
    if state not in STATES:
        raise LoadError(f"The launch spec has state {state!r}; use 'isolated', 'persistent' or 'fork'.", EXIT_BAD_SPEC)
    return str(state)


class Executor:
    """Runs the compiled cell for one request at a time and turns the outcome into an answer frame."""

    def __init__(
        self,
        namespace: dict[str, Any],
        code: types.CodeType,
        outputs: dict[str, str],
        *,
        state: str = DEFAULT_STATE,
        log: ProcessLog | None = None,
    ) -> None:
        assert state in STATES, f"state must be one of {STATES}, not {state!r}"
        self._ns = namespace
        self._code = code
        self._outputs = tuple(outputs.items())
        self.state = state
        self.log = log
        self.is_executing = False
        # Under `fork`: the child running the request, and a SIGINT that came while it was being forked.
        self.child_pid = 0
        self.is_forking = False
        self.is_interrupt_pending = False
        self._policy: Callable[[dict[str, Any]], Answer] = self._isolated
        if state == "persistent":
            self._policy = self.run
        elif state == "fork":
            from cellnode.runtime.forking import run_in_child

            self._policy = functools.partial(run_in_child, self)

    def handle_sigint(self, signum: int, frame: types.FrameType | None) -> None:
        """The SIGINT handler: interrupt the running cell (in the child, under `fork`); ignore it between requests."""
        if self.child_pid:
            try:
                os.kill(self.child_pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        elif self.is_forking:
            self.is_interrupt_pending = True
        elif self.is_executing:
            raise KeyboardInterrupt

    def execute(self, payload: bytes, request_id: str = NO_REQUEST) -> Answer:
        """The answer frame (kind, payload) for an EXECUTE payload; the log lines it causes carry `request_id`.

        Call `finish()` once the answer is sent: it writes the request's log lines, off the answer's path.
        """
        try:
            inputs = json.loads(payload)
        except ValueError as exc:
            message = f"The EXECUTE payload is not valid JSON ({exc}); the front sent a bad frame."
            return FAILURE, encode_message(message)
        if type(inputs) is not dict:
            return FAILURE, encode_message("The EXECUTE payload is not a JSON object; the front sent a bad frame.")
        if self.log is not None:
            self.log.begin(request_id)
        return self._policy(inputs)

    def finish(self) -> None:
        """The request is over: write its log lines (or flush stdout and stderr, without a log)."""
        if self.log is not None:
            self.log.end()
        else:
            _flush()

    def run(self, inputs: dict[str, Any]) -> Answer:
        """Bind `inputs`, run the cell and read the outputs, with nothing restored afterwards."""
        ns = self._ns
        ns.update(inputs)
        return self._run(ns)

    def _isolated(self, inputs: dict[str, Any]) -> Answer:
        ns = self._ns
        saved = ns.copy()
        try:
            ns.update(inputs)
            return self._run(ns)
        finally:
            ns.clear()
            ns.update(saved)

    def _run(self, ns: dict[str, Any]) -> Answer:
        try:
            self.is_executing = True
            try:
                exec(self._code, ns)
            finally:
                self.is_executing = False
        except KeyboardInterrupt:
            return INTERRUPTED_ANSWER
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
