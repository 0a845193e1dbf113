"""Load a checkpoint into the namespace the deployed cell runs in.

Standard library and cloudpickle only: this module runs inside instances.

The namespace is the `__dict__` of a fresh module installed as `sys.modules["__main__"]`, as IPython does with its
user module, so that code resolving names through `__main__` (pickle, dataclasses, typing) finds the notebook's
objects. If the cell uses IPython syntax, `get_ipython()` returns an `InteractiveShell` whose user namespace is that
same dict, so magics read and assign the request's variables.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import linecache
import sys
import types
from pathlib import Path
from typing import Any

import cloudpickle

CELL_FILENAME = "<cell>"

EXIT_BAD_SPEC = 2
EXIT_CORRUPT_BLOB = 3
EXIT_LOAD_FAILED = 4

CORRUPT_BLOB = (
    "Blob for variable {name!r} at {path} is corrupt: expected sha256 {expected}, found {found}. "
    "Capture the checkpoint again."
)
NO_IPYTHON = (
    "The cell uses IPython syntax (a magic or a shell escape), but IPython cannot be imported in the instance's "
    "environment ({error}). Install ipython there, or remove the IPython syntax from the cell."
)


class LoadError(Exception):
    """The checkpoint cannot be loaded; the instance prints the message and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def load(spec: dict[str, Any]) -> tuple[dict[str, Any], types.CodeType]:
    """The namespace and the compiled cell of a launch spec, or LoadError."""
    try:
        cell = spec["cell"]
        source: str = cell["source"]
        uses_ipython = bool(cell.get("uses_ipython", False))
        variables: list[dict[str, str]] = spec.get("variables", [])
        imports: dict[str, str] = spec.get("imports", {})
    except (KeyError, TypeError) as exc:
        raise LoadError(f"The launch spec lacks {exc}; the backend must write a complete spec.", EXIT_BAD_SPEC) from exc

    module = types.ModuleType("__main__")
    ns = module.__dict__
    ns["__builtins__"] = builtins
    sys.modules["__main__"] = module
    for name, module_name in imports.items():
        ns[name] = _import(name, module_name)
    for variable in variables:
        ns[variable["name"]] = _unpickle(variable["name"], Path(variable["path"]), variable["sha256"])
    rebind_functions(ns)
    if "display" not in ns:
        ns["display"] = display
    if uses_ipython:
        _attach_ipython(module)

    try:
        code = compile(source, CELL_FILENAME, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        message = f"The deployed cell does not compile: {exc}. Fix the cell and deploy it again."
        raise LoadError(message, EXIT_LOAD_FAILED) from exc
    # Registered with no mtime, so that linecache keeps it: tracebacks then show the cell's lines.
    linecache.cache[CELL_FILENAME] = (len(source), None, source.splitlines(keepends=True), CELL_FILENAME)
    return ns, code


def rebind_functions(ns: dict[str, Any]) -> None:
    """Make every notebook function, and every method of a notebook class, use `ns` as its globals.

    cloudpickle gives each by-value function a private copy of the globals it read; in the notebook they all
    shared one namespace, so a function reading an input variable as a global saw the current value.
    """
    rebound: dict[int, types.FunctionType] = {}
    pending = list(ns)
    while pending:
        name = pending.pop()
        value = ns[name]
        if _is_notebook_function(value):
            ns[name] = _rebind(value, ns, rebound, pending)
        elif isinstance(value, type) and value.__module__ == "__main__":
            for attr, member in list(vars(value).items()):
                if _is_notebook_function(member):
                    setattr(value, attr, _rebind(member, ns, rebound, pending))


def display(*objs: Any, **kwargs: Any) -> None:
    """Print the repr of each object: the fallback for IPython's `display` outside a notebook."""
    for obj in objs:
        print(repr(obj))


def _is_notebook_function(value: Any) -> bool:
    return type(value) is types.FunctionType and value.__module__ == "__main__"


def _rebind(
    function: types.FunctionType, ns: dict[str, Any], rebound: dict[int, types.FunctionType], pending: list[str]
) -> types.FunctionType:
    if function.__globals__ is ns:
        return function
    if id(function) in rebound:
        return rebound[id(function)]
    for name, value in function.__globals__.items():
        if name not in ns:
            ns[name] = value
            pending.append(name)
    new = types.FunctionType(function.__code__, ns, function.__name__, function.__defaults__, function.__closure__)
    new.__kwdefaults__ = function.__kwdefaults__
    new.__dict__.update(function.__dict__)
    new.__qualname__ = function.__qualname__
    new.__doc__ = function.__doc__
    new.__annotations__ = function.__annotations__
    new.__module__ = function.__module__
    rebound[id(function)] = new
    return new


def _import(name: str, module_name: str) -> types.ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        raise LoadError(
            f"Module {module_name!r} (imported as {name!r}) cannot be imported in the instance: "
            f"{type(exc).__name__}: {exc}. Install it in the instance's environment.",
            EXIT_LOAD_FAILED,
        ) from exc


def _unpickle(name: str, path: Path, expected: str) -> Any:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise LoadError(
            f"Blob for variable {name!r} at {path} cannot be read: {exc.strerror}. Capture the checkpoint again.",
            EXIT_CORRUPT_BLOB,
        ) from exc
    found = hashlib.sha256(blob).hexdigest()
    if found != expected:
        message = CORRUPT_BLOB.format(name=name, path=path, expected=expected, found=found)
        raise LoadError(message, EXIT_CORRUPT_BLOB)
    try:
        return cloudpickle.loads(blob)
    except Exception as exc:
        raise LoadError(
            f"Variable {name!r} cannot be unpickled: {type(exc).__name__}: {exc}. Install the module it needs in "
            "the instance's environment, or capture the checkpoint again.",
            EXIT_LOAD_FAILED,
        ) from exc


def _attach_ipython(module: types.ModuleType) -> None:
    try:
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config
    except ImportError as exc:
        raise LoadError(NO_IPYTHON.format(error=exc), EXIT_LOAD_FAILED) from exc
    config = Config()
    # No history database: instances are many, short-lived and may have a read-only home.
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config, user_module=module)
    module.__dict__["get_ipython"] = shell.get_ipython
