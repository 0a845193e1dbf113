"""Checkpoints for tests: run notebook cells in a `__main__` namespace and cloudpickle each variable to a file."""

from __future__ import annotations

import hashlib
import types
from pathlib import Path
from typing import Any

import cloudpickle

RANDOMIZER_SETUP = "input_data = dict(left_bound=1, right_bound=10)\n"
RANDOMIZER_CELL = """\
from random import randint
from random import seed

seed()

def generate_value(input_data):
    return dict(generated_value=randint(
        input_data["left_bound"],
        input_data["right_bound"]
    ))

output_data = generate_value(input_data)
print(output_data)
"""


def notebook(*cells: str) -> dict[str, Any]:
    """The namespace after running `cells` in order, as a kernel would (functions get `__module__ == "__main__"`)."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for cell in cells:
        exec(compile(cell, "<notebook>", "exec", dont_inherit=True), namespace)
    return namespace


def capture(namespace: dict[str, Any], directory: Path) -> tuple[list[dict[str, str]], dict[str, str]]:
    """The launch spec's `variables` and `imports` for a namespace; blobs are written into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    variables: list[dict[str, str]] = []
    imports: dict[str, str] = {}
    for name, value in namespace.items():
        if name.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            imports[name] = value.__name__
            continue
        blob = cloudpickle.dumps(value)
        path = directory / f"{name}.pkl"
        path.write_bytes(blob)
        variables.append({"name": name, "path": str(path), "sha256": hashlib.sha256(blob).hexdigest()})
    return variables, imports


def launch_spec(
    directory: Path,
    source: str,
    *,
    setup: tuple[str, ...] = (),
    inputs: dict[str, str] | None = None,
    outputs: dict[str, str] | None = None,
    uses_ipython: bool = False,
    node_id: str = "n1",
    instance_id: str = "i1",
) -> dict[str, Any]:
    """A launch spec without "socket": the state after running `setup` cells, and `source` as the deployed cell."""
    variables, imports = capture(notebook(*setup), directory / "blobs")
    return {
        "node_id": node_id,
        "instance_id": instance_id,
        "cell": {"source": source, "uses_ipython": uses_ipython},
        "inputs": inputs or {},
        "outputs": outputs or {},
        "variables": variables,
        "imports": imports,
    }


def randomizer_spec(directory: Path) -> dict[str, Any]:
    """The reference randomizer node: `input_data: dict` in, `output_data: dict` out."""
    return launch_spec(
        directory,
        RANDOMIZER_CELL,
        setup=(RANDOMIZER_SETUP, RANDOMIZER_CELL),
        inputs={"input_data": "dict"},
        outputs={"output_data": "dict"},
    )


# A variable whose unpickling starts a thread, as a library's thread pool may: a checkpoint not safe to fork.
THREAD_ON_LOAD = """\
import threading, time

class Pool:
    def __init__(self, size):
        self.size = size

    def __setstate__(self, state):
        self.__dict__.update(state)
        threading.Thread(target=time.sleep, args=(3600,), name="pool-worker", daemon={daemon}).start()

pool = Pool(2)
"""


def threaded_spec(directory: Path, source: str, *, daemon: bool = True, **options: Any) -> dict[str, Any]:
    """A launch spec whose `pool` variable (`pool.size == 2`) starts a thread named 'pool-worker' when it loads."""
    setup = options.pop("setup", ())
    return launch_spec(directory, source, setup=(THREAD_ON_LOAD.format(daemon=daemon), *setup), **options)
