"""Run notebook cells 1..K in a fresh kernel and capture its user namespace, one cloudpickle blob per variable."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from traitlets.config import Config

from cellnode.checkpoint.notebook import code_cells
from cellnode.exceptions import CellFailedError, CellnodeError, DeadlineExceeded, InternalError, InvalidArgument

KERNEL_NAME = "python3"
CELL_FAILURE_TYPE = "type.googleapis.com/cellnode.v1.CellFailure"

NO_CODE_CELLS_MSG = "The notebook has no code cells; add the cell to deploy and capture again."
CELL_OUT_OF_RANGE_MSG = (
    "Cell {cell!r} is out of range: the notebook has {count} code cells; --cell counts code cells from 1."
)
CELL_RAISED_MSG = "Cell {cell} raised {ename}: {evalue}"
KERNEL_DIED_MSG = (
    "Cell {cell} stopped the kernel (the process exited or crashed); remove the exit or crash and capture again."
)
CELL_TIMEOUT_MSG = "Cell {cell} ran longer than the timeout of {timeout:g} s; make it faster or raise the timeout."
SNAPSHOT_TIMEOUT_MSG = (
    "Serializing the namespace after cell {cell} took longer than {timeout:g} s; "
    "delete large variables before the checkpoint or raise the timeout."
)
KERNEL_START_MSG = "The capture kernel {kernel!r} could not start ({error}); check that ipykernel is installed."
KERNEL_LOST_MSG = "Lost the connection to the capture kernel {kernel!r} ({error}); capture again."
SNAPSHOT_FAILED_MSG = (
    "Serializing the namespace after cell {cell} failed with {ename}: {evalue}; "
    "check that the cells leave the standard library and the staging directory intact, then capture again."
)

# Runs in the kernel after the last cell. Everything it binds lives in one function whose name starts with `_`
# and is deleted afterwards, so the user namespace and the captured stdout stay as the notebook left them.
SNAPSHOT_CODE = """
def __FUNCTION__(staging, manifest_path):
    import hashlib, importlib.metadata, io, json, os, platform, types
    import cloudpickle
    from IPython import get_ipython

    def _has_fileno(stream):
        try:
            stream.fileno()
        except (OSError, ValueError):
            return False
        return True

    shell = get_ipython()
    skipped = {"In", "Out", "get_ipython", "exit", "quit"}
    missing = object()
    variables, imports, unserializable = [], {}, []
    for name, value in list(shell.user_ns.items()):
        if name.startswith("_") or name in skipped or shell.user_ns_hidden.get(name, missing) is value:
            continue
        if isinstance(value, types.ModuleType):
            imports[name] = value.__name__
            continue
        kind = type(value)
        type_name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        try:
            # cloudpickle copies a file's content; a handle to an OS file cannot cross a process, so we refuse it.
            if isinstance(value, io.IOBase) and not value.closed and _has_fileno(value):
                raise TypeError(f"cannot pickle {type_name!r} object")
            data = cloudpickle.dumps(value)
        except Exception as exc:
            reason = (f"{type(exc).__name__}: {exc} — re-create it inside the deployed cell, "
                      "or close/delete it before the checkpoint")
            unserializable.append({"name": name, "type": type_name, "reason": reason})
            continue
        sha256 = hashlib.sha256(data).hexdigest()
        path = os.path.join(staging, sha256)
        if not os.path.exists(path):
            fd = os.open(path + ".part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as blob:
                blob.write(data)
                blob.flush()
                os.fsync(blob.fileno())
            os.replace(path + ".part", path)
        variables.append({"name": name, "type": type_name, "size": len(data), "sha256": sha256})
    packages = sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions() if d.metadata["Name"]},
        key=str.lower,
    )
    manifest = {"variables": variables, "imports": imports, "unserializable": unserializable,
                "python_version": platform.python_version(), "packages": packages}
    with open(manifest_path, "w", encoding="utf-8") as file:
        json.dump(manifest, file)

__FUNCTION__(__STAGING__, __MANIFEST__)
del __FUNCTION__
"""
# nbformat does not annotate its v4 constructors; we call them through an explicitly untyped name.
_NBFORMAT_V4: Any = nbformat.v4
_ANSI_ESCAPE_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


@dataclass(frozen=True)
class CapturedVariable:
    """A serialized variable: its blob is `path` in the staging directory."""

    name: str
    type: str
    size: int
    sha256: str
    path: Path


@dataclass(frozen=True)
class Unserializable:
    """A variable cloudpickle could not serialize, and why."""

    name: str
    type: str
    reason: str


@dataclass(frozen=True)
class Capture:
    """The interpreter state after code cell `cell`, and the environment it ran in."""

    cell: int
    cell_source: str
    variables: list[CapturedVariable]
    imports: dict[str, str]
    unserializable: list[Unserializable]
    python_version: str
    packages: list[str]
    stdout: str


async def capture(
    nb: nbformat.NotebookNode,
    *,
    cell: int | None,
    staging_dir: Path,
    timeout: float = 600.0,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Capture:
    """Run code cells 1..`cell` in a fresh kernel and write one blob per variable into `staging_dir`.

    `cell` counts code cells from 1 and defaults to the last one. `staging_dir` belongs to this capture: it is
    emptied if the capture fails. `timeout` applies to each cell. `env` is the kernel's whole environment
    (None inherits ours), and `cwd` its working directory.
    """
    sources = code_cells(nb)
    last = _choose_cell(len(sources), cell)
    staging = staging_dir.resolve()
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    manifest_path = staging / f".manifest-{uuid.uuid4().hex}.json"
    try:
        stdout = await _run_cells(sources[:last], staging, manifest_path, timeout, cwd, env)
        manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest_path.unlink()
    except BaseException:
        _empty_dir(staging)
        raise
    return Capture(
        cell=last,
        cell_source=sources[last - 1],
        variables=[CapturedVariable(path=staging / v["sha256"], **v) for v in manifest["variables"]],
        imports=dict(manifest["imports"]),
        unserializable=[Unserializable(**u) for u in manifest["unserializable"]],
        python_version=manifest["python_version"],
        packages=list(manifest["packages"]),
        stdout=stdout,
    )


def _choose_cell(count: int, cell: int | None) -> int:
    if count == 0:
        raise InvalidArgument(NO_CODE_CELLS_MSG)
    if cell is None:
        return count
    if not 1 <= cell <= count:
        raise InvalidArgument(CELL_OUT_OF_RANGE_MSG.format(cell=cell, count=count))
    return cell


async def _run_cells(
    sources: list[str], staging: Path, manifest_path: Path, timeout: float, cwd: Path | None, env: dict[str, str] | None
) -> str:
    snapshot = (
        SNAPSHOT_CODE.replace("__FUNCTION__", f"_cellnode_snapshot_{uuid.uuid4().hex}")
        .replace("__STAGING__", repr(str(staging)))
        .replace("__MANIFEST__", repr(str(manifest_path)))
    )
    cells = [_NBFORMAT_V4.new_code_cell(source) for source in [*sources, snapshot]]
    nb = _NBFORMAT_V4.new_notebook(cells=cells)
    # IPC sockets in a private directory rather than TCP ports: nothing else on the machine can reach the kernel.
    ipc_dir = tempfile.mkdtemp(prefix="cn-kernel-")
    config = Config()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = os.path.join(ipc_dir, "k")
    client = NotebookClient(
        nb,
        config=config,
        kernel_name=KERNEL_NAME,
        timeout_func=lambda _cell: timeout,
        allow_errors=True,
        shutdown_kernel="immediate",
    )
    kernel_args: dict[str, Any] = {"env": env} if env is not None else {}
    if cwd is not None:
        kernel_args["cwd"] = str(cwd)
    stdout: list[str] = []
    is_started = False
    try:
        async with client.async_setup_kernel(**kernel_args):
            is_started = True
            for number, node in enumerate(cells[:-1], start=1):
                await _execute(client, node, number, timeout)
                stdout.extend(o.text for o in node.outputs if o.output_type == "stream" and o.name == "stdout")
            await _snapshot(client, cells[-1], len(sources), timeout)
    except CellnodeError:
        raise
    except Exception as exc:
        # We want no kernel-client exception to cross our API; the cell's own errors are already ours.
        template = KERNEL_LOST_MSG if is_started else KERNEL_START_MSG
        raise InternalError(template.format(kernel=KERNEL_NAME, error=f"{type(exc).__name__}: {exc}")) from exc
    finally:
        shutil.rmtree(ipc_dir, ignore_errors=True)
    return "".join(stdout)


async def _execute(client: NotebookClient, node: nbformat.NotebookNode, number: int, timeout: float) -> None:
    try:
        await client.async_execute_cell(node, number - 1)
    except CellTimeoutError as exc:
        raise DeadlineExceeded(CELL_TIMEOUT_MSG.format(cell=number, timeout=timeout)) from exc
    except DeadKernelError as exc:
        failure = _failure(number, "DeadKernelError", "The kernel died while the cell ran.", [])
        raise CellFailedError(KERNEL_DIED_MSG.format(cell=number), details=[failure]) from exc
    error = next((o for o in node.outputs if o.output_type == "error"), None)
    if error is not None:
        traceback = [line for entry in error.traceback for line in _strip_ansi(entry).splitlines()]
        failure = _failure(number, error.ename, error.evalue, traceback)
        raise CellFailedError(
            CELL_RAISED_MSG.format(cell=number, ename=error.ename, evalue=error.evalue), details=[failure]
        )


async def _snapshot(client: NotebookClient, node: nbformat.NotebookNode, last: int, timeout: float) -> None:
    try:
        await client.async_execute_cell(node, last, store_history=False)
    except CellTimeoutError as exc:
        raise DeadlineExceeded(SNAPSHOT_TIMEOUT_MSG.format(cell=last, timeout=timeout)) from exc
    except DeadKernelError as exc:
        message = SNAPSHOT_FAILED_MSG.format(cell=last, ename="DeadKernelError", evalue="the kernel died")
        raise InternalError(message) from exc
    error = next((o for o in node.outputs if o.output_type == "error"), None)
    if error is not None:
        raise InternalError(SNAPSHOT_FAILED_MSG.format(cell=last, ename=error.ename, evalue=error.evalue))


def _failure(cell: int, name: str, message: str, traceback: list[str]) -> dict[str, Any]:
    return {
        "@type": CELL_FAILURE_TYPE,
        "cell": cell,
        "error_name": name,
        "error_message": message,
        "traceback": traceback,
    }


def _strip_ansi(text: str) -> str:
    return _ANSI_ESCAPE_RE.sub("", text)


def _empty_dir(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
