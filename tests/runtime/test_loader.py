from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import cloudpickle
import pytest

from cellnode.runtime.loader import EXIT_CORRUPT_BLOB, EXIT_LOAD_FAILED, LoadError, load, rebind_functions
from tests.runtime.checkpoints import launch_spec, notebook

pytestmark = pytest.mark.usefixtures("keep_main")

SETUP = """\
import math
scale = 2

def helper(x):
    return x * scale

def compute(x):
    return helper(x) + offset

offset = 1

class Model:
    def predict(self, x):
        return x * scale
"""


def test_load_builds_main_namespace(tmp_path: Path) -> None:
    ns, code = load(launch_spec(tmp_path, "result = compute(3)", setup=(SETUP,)))
    assert ns["__name__"] == "__main__"
    assert sys.modules["__main__"].__dict__ is ns
    assert ns["math"] is sys.modules["math"]
    assert code.co_filename == "<cell>"
    exec(code, ns)
    assert ns["result"] == 7


def test_functions_read_the_shared_namespace(tmp_path: Path) -> None:
    ns, _ = load(launch_spec(tmp_path, "", setup=(SETUP,)))
    assert ns["compute"].__globals__ is ns
    assert ns["helper"].__globals__ is ns
    assert ns["Model"].predict.__globals__ is ns
    ns["scale"] = 10
    assert ns["compute"](1) == 11
    assert ns["Model"]().predict(2) == 20


def test_rebind_copies_names_only_the_function_knew(tmp_path: Path) -> None:
    # `compute` was pickled alone: its helper and `offset` come only from its private globals.
    compute = cloudpickle.loads(cloudpickle.dumps(notebook(SETUP)["compute"]))
    ns = {"__name__": "__main__", "compute": compute, "offset": 100}
    rebind_functions(ns)
    assert ns["compute"](1) == 102
    assert ns["helper"].__globals__ is ns
    assert ns["compute"].__qualname__ == "compute"
    assert ns["compute"].__module__ == "__main__"


def test_rebind_keeps_function_attributes() -> None:
    source = 'def f(a, b=2, *, c=3) -> int:\n    "Doc."\n    return a + b + c\nf.tag = "x"\n'
    ns = {"__name__": "__main__", "f": cloudpickle.loads(cloudpickle.dumps(notebook(source)["f"]))}
    rebind_functions(ns)
    f = ns["f"]
    assert (f(1), f.__doc__, f.__kwdefaults__, f.tag, f.__annotations__) == (6, "Doc.", {"c": 3}, "x", {"return": int})


def test_display_fallback_prints_reprs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ns, code = load(launch_spec(tmp_path, "display('a', 1)"))
    exec(code, ns)
    assert capsys.readouterr().out == "'a'\n1\n"


def test_corrupt_blob(tmp_path: Path) -> None:
    spec = launch_spec(tmp_path, "", setup=("x = 1",))
    Path(spec["variables"][0]["path"]).write_bytes(b"tampered")
    with pytest.raises(LoadError) as caught:
        load(spec)
    found = hashlib.sha256(b"tampered").hexdigest()
    assert caught.value.exit_code == EXIT_CORRUPT_BLOB
    assert caught.value.message == (
        f"Blob for variable 'x' at {spec['variables'][0]['path']} is corrupt: "
        f"expected sha256 {spec['variables'][0]['sha256']}, found {found}. Capture the checkpoint again."
    )


def test_missing_blob(tmp_path: Path) -> None:
    spec = launch_spec(tmp_path, "", setup=("x = 1",))
    Path(spec["variables"][0]["path"]).unlink()
    with pytest.raises(LoadError, match="Blob for variable 'x' .* cannot be read") as caught:
        load(spec)
    assert caught.value.exit_code == EXIT_CORRUPT_BLOB


def test_blob_needing_a_missing_module(tmp_path: Path) -> None:
    blob = b"cnonexistent_module_xyz\nThing\n."  # A protocol-0 pickle of a global from a module that is not there.
    spec = launch_spec(tmp_path, "")
    path = tmp_path / "model.pkl"
    path.write_bytes(blob)
    spec["variables"] = [{"name": "model", "path": str(path), "sha256": hashlib.sha256(blob).hexdigest()}]
    with pytest.raises(LoadError, match="Variable 'model' cannot be unpickled: ModuleNotFoundError") as caught:
        load(spec)
    assert caught.value.exit_code == EXIT_LOAD_FAILED


def test_missing_import(tmp_path: Path) -> None:
    spec = launch_spec(tmp_path, "")
    spec["imports"] = {"np": "nonexistent_module_xyz"}
    with pytest.raises(LoadError, match="Module 'nonexistent_module_xyz' \\(imported as 'np'\\)") as caught:
        load(spec)
    assert caught.value.exit_code == EXIT_LOAD_FAILED


def test_cell_that_does_not_compile(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="The deployed cell does not compile") as caught:
        load(launch_spec(tmp_path, "def broken(:\n"))
    assert caught.value.exit_code == EXIT_LOAD_FAILED


def test_incomplete_spec() -> None:
    with pytest.raises(LoadError, match="The launch spec lacks 'cell'"):
        load({"socket": "/tmp/x.sock"})
