from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import nbformat
import numpy as np
import pytest

from cellnode.checkpoint.capture import CELL_FAILURE_TYPE, Capture, capture
from cellnode.checkpoint.notebook import read_notebook
from cellnode.exceptions import CellFailedError, DeadlineExceeded, InternalError, InvalidArgument

DATA = Path(__file__).parent / "data"
# nbformat does not annotate its v4 constructors.
V4: Any = nbformat.v4


def _read(name: str) -> nbformat.NotebookNode:
    return read_notebook((DATA / name).read_bytes(), name)


def _notebook(*sources: str) -> nbformat.NotebookNode:
    nb: nbformat.NotebookNode = V4.new_notebook(cells=[V4.new_code_cell(source) for source in sources])
    return nb


def _run(nb: nbformat.NotebookNode, staging: Path, **options: Any) -> Capture:
    options.setdefault("cell", None)
    return asyncio.run(capture(nb, staging_dir=staging, **options))


def _children() -> set[int]:
    """The live child processes of this process, read from /proc."""
    children = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # the process ended while we looked
            continue
        if fields[1] == str(os.getpid()) and fields[0] != "Z":
            children.add(int(entry))
    return children


@pytest.fixture(autouse=True)
def no_kernel_left_behind() -> Iterator[None]:
    before = _children()
    yield
    assert _children() <= before, "a capture left its kernel running"


@pytest.fixture(scope="module")
def randomizer(tmp_path_factory: pytest.TempPathFactory) -> Capture:
    return _run(_read("randomizer.ipynb"), tmp_path_factory.mktemp("randomizer"))


def _names(result: Capture) -> set[str]:
    return {variable.name for variable in result.variables}


def _load(result: Capture, name: str) -> Any:
    variable = next(v for v in result.variables if v.name == name)
    data = variable.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == variable.sha256
    assert len(data) == variable.size
    return cloudpickle.loads(data)


@pytest.mark.slow
def test_randomizer_state(randomizer: Capture) -> None:
    assert randomizer.cell == 2  # the markdown cell between the two code cells does not count
    assert randomizer.cell_source.startswith("from random import randint\n")
    assert _names(randomizer) == {"input_data", "output_data", "generate_value", "randint", "seed"}
    assert randomizer.imports == {}
    assert randomizer.unserializable == []
    assert randomizer.stdout.startswith("{'generated_value': ")
    types = {variable.name: variable.type for variable in randomizer.variables}
    assert types["input_data"] == "dict" and types["generate_value"] == "function"
    assert _load(randomizer, "input_data") == {"left_bound": 1, "right_bound": 10}


@pytest.mark.slow
def test_randomizer_function_works_here(randomizer: Capture) -> None:
    generate_value = _load(randomizer, "generate_value")
    for _ in range(20):
        assert 3 <= generate_value({"left_bound": 3, "right_bound": 5})["generated_value"] <= 5


@pytest.mark.slow
def test_environment_and_staging_dir(randomizer: Capture) -> None:
    assert randomizer.python_version.count(".") == 2
    assert any(package.startswith("cloudpickle==") for package in randomizer.packages)
    assert randomizer.packages == sorted(randomizer.packages, key=str.lower)
    staging = randomizer.variables[0].path.parent
    # Only the blobs are left: the manifest is read and removed.
    assert sorted(p.name for p in staging.iterdir()) == sorted({v.sha256 for v in randomizer.variables})
    assert all(v.path == staging / v.sha256 for v in randomizer.variables)


@pytest.mark.slow
def test_capture_up_to_cell_one(tmp_path: Path) -> None:
    result = _run(_read("randomizer.ipynb"), tmp_path / "staging", cell=1)
    assert result.cell == 1
    assert result.cell_source == "input_data = dict(left_bound=1, right_bound=10)"
    assert _names(result) == {"input_data"}
    assert result.stdout == ""


@pytest.mark.slow
def test_percent_script_with_numpy_and_unserializable_values(tmp_path: Path) -> None:
    (tmp_path / "greeting.txt").write_text("hello from cwd\n")
    env = {**os.environ, "CAPTURE_TEST_MARK": "from env"}
    result = _run(_read("state.py"), tmp_path / "staging", cwd=tmp_path, env=env)
    assert result.cell == 2
    assert result.imports == {"np": "numpy", "os": "os"}
    assert _names(result) == {"weights", "mark", "greeting"}
    np.testing.assert_array_equal(_load(result, "weights"), np.arange(12, dtype=np.float64).reshape(3, 4))
    assert _load(result, "mark") == "from env"
    assert _load(result, "greeting") == "hello from cwd"
    assert result.stdout == "greeting: hello from cwd\n"
    weights = next(v for v in result.variables if v.name == "weights")
    assert weights.type == "numpy.ndarray"
    problems = {item.name: item for item in result.unserializable}
    assert set(problems) == {"handle", "numbers"}
    assert problems["handle"].type == "_io.TextIOWrapper"
    assert problems["handle"].reason.startswith("TypeError: cannot pickle '_io.TextIOWrapper' object — ")
    assert problems["numbers"].type == "generator"
    assert problems["numbers"].reason == (
        "TypeError: cannot pickle 'generator' object — re-create it inside the deployed cell, "
        "or close/delete it before the checkpoint"
    )


@pytest.mark.slow
def test_raising_cell(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    nb = _notebook("a = 1\nprint('before')", "def fail():\n    raise ValueError('bad input')\nfail()", "b = 2")
    with pytest.raises(CellFailedError) as info:
        _run(nb, staging)
    error = info.value
    assert str(error) == "Cell 2 raised ValueError: bad input"
    [failure] = error.details
    assert failure["@type"] == CELL_FAILURE_TYPE
    assert (failure["cell"], failure["error_name"], failure["error_message"]) == (2, "ValueError", "bad input")
    assert any("raise ValueError('bad input')" in line for line in failure["traceback"])
    assert not any("\x1b" in line for line in failure["traceback"])
    assert list(staging.iterdir()) == []


@pytest.mark.slow
def test_cell_over_the_timeout(tmp_path: Path) -> None:
    nb = _notebook("x = 1", "import time\ntime.sleep(60)")
    with pytest.raises(DeadlineExceeded) as info:
        _run(nb, tmp_path / "staging", timeout=1.5)
    assert str(info.value).startswith("Cell 2 ran longer than the timeout of 1.5 s;")
    assert list((tmp_path / "staging").iterdir()) == []


@pytest.mark.slow
def test_cell_that_kills_the_kernel(tmp_path: Path) -> None:
    with pytest.raises(CellFailedError) as info:
        _run(_notebook("import os\nos._exit(3)"), tmp_path / "staging")
    assert str(info.value).startswith("Cell 1 stopped the kernel")
    assert info.value.details[0]["error_name"] == "DeadKernelError"


@pytest.mark.parametrize(("cell", "count"), [(5, 2), (0, 2), (-1, 2)])
def test_cell_out_of_range(tmp_path: Path, cell: int, count: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        _run(_read("randomizer.ipynb"), tmp_path / "staging", cell=cell)
    assert str(info.value) == (
        f"Cell {cell} is out of range: the notebook has {count} code cells; --cell counts code cells from 1."
    )


def test_notebook_without_code_cells(tmp_path: Path) -> None:
    nb = V4.new_notebook(cells=[V4.new_markdown_cell("only prose")])
    with pytest.raises(InvalidArgument, match="The notebook has no code cells"):
        _run(nb, tmp_path / "staging")


@pytest.mark.slow
def test_failure_empties_the_staging_dir(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "leftover").mkdir(parents=True)
    (staging / "leftover" / "blob").write_bytes(b"old")
    (staging / "stale").write_bytes(b"old")
    with pytest.raises(CellFailedError, match=r"^Cell 1 raised ZeroDivisionError: division by zero$"):
        _run(_notebook("1 / 0"), staging)
    assert list(staging.iterdir()) == []


@pytest.mark.slow
def test_snapshot_failure(tmp_path: Path) -> None:
    nb = _notebook("import hashlib\nhashlib.sha256 = None\nvalue = 1")
    with pytest.raises(InternalError) as info:
        _run(nb, tmp_path / "staging")
    assert str(info.value).startswith("Serializing the namespace after cell 1 failed with TypeError: ")
    assert list((tmp_path / "staging").iterdir()) == []


SLOW_PICKLE = """\
import time

class SlowToPickle:
    def __reduce__(self):
        time.sleep(60)

value = SlowToPickle()
"""


@pytest.mark.slow
def test_snapshot_over_the_timeout(tmp_path: Path) -> None:
    with pytest.raises(DeadlineExceeded) as info:
        _run(_notebook(SLOW_PICKLE), tmp_path / "staging", timeout=1.5)
    assert str(info.value).startswith("Serializing the namespace after cell 1 took longer than 1.5 s;")


@pytest.mark.slow
def test_snapshot_kills_the_kernel(tmp_path: Path) -> None:
    source = "import os\n\nclass Fatal:\n    def __reduce__(self):\n        os._exit(4)\n\nvalue = Fatal()"
    with pytest.raises(InternalError, match=r"^Serializing the namespace after cell 1 failed with DeadKernelError"):
        _run(_notebook(source), tmp_path / "staging")


def test_kernel_that_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(InternalError) as info:
        _run(_notebook("x = 1"), tmp_path / "staging", cwd=tmp_path / "missing")
    assert str(info.value).startswith("The capture kernel 'python3' could not start (FileNotFoundError: ")
