"""Checkpoint limits and errors against a real server of their own (so that the counts are exact)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cellnode.client import Client
from cellnode.exceptions import AlreadyExists, CellFailedError, FailedPrecondition, InvalidArgument, NotFound
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    home = tmp_path_factory.mktemp("limits")
    process = ServerProcess(home / "data", env={"CELLNODE_PROFILE": str(home / "profile.json")}).start()
    with process.client() as api:
        yield api
    process.stop()


def test_eleventh_unpinned_evicts_the_oldest_and_pinned_are_capped(own: Client, tmp_path: Path) -> None:
    created = []
    for index in range(11):
        path = notebook(tmp_path, f"value = {index}", name=f"n{index}.ipynb")
        created.append(own.create_checkpoint(path))
    assert created[-1]["evicted"] == [created[0]["id"]]
    remaining = [c["id"] for c in own.list_checkpoints()]
    assert remaining == [c["id"] for c in reversed(created[1:])]
    with pytest.raises(NotFound):
        own.get_checkpoint(created[0]["id"])

    # Unpinning the oldest checkpoint when the folder already holds 10 unpinned evicts the oldest *other* one.
    own.pin_checkpoint(created[1]["id"], "oldest")
    created.append(own.create_checkpoint(notebook(tmp_path, "value = 11", name="n11.ipynb")))
    unpinned = own.unpin_checkpoint("oldest")
    assert unpinned["evicted"] == [created[2]["id"]]
    assert own.get_checkpoint(created[1]["id"])["pinned"] is False
    created.pop(2)

    for index, checkpoint in enumerate(created[1:]):
        own.pin_checkpoint(checkpoint["id"], f"pinned-{index}")
    with pytest.raises(FailedPrecondition, match="already has 10 pinned checkpoints"):
        own.create_checkpoint(tmp_path / "n1.ipynb", name="one-too-many")
    with pytest.raises(AlreadyExists, match="already has a checkpoint named 'pinned-0'"):
        own.pin_checkpoint("pinned-1", "pinned-0")
    own.unpin_checkpoint("pinned-9")
    renamed = own.pin_checkpoint("pinned-0", "renamed")
    assert renamed["name"] == "renamed"
    for checkpoint in own.list_checkpoints():
        own.delete_checkpoint(checkpoint["id"])
    assert own.list_checkpoints() == []


def test_a_raising_cell_names_cell_error_and_traceback(own: Client, tmp_path: Path) -> None:
    path = notebook(tmp_path, "a = 1", "b = {}\nb['missing']", "c = 3")
    with pytest.raises(CellFailedError, match=r"Cell 2 raised KeyError: 'missing'") as caught:
        own.create_checkpoint(path)
    failure = caught.value.details[0]
    assert failure["cell"] == 2 and failure["error_name"] == "KeyError"
    assert any("b['missing']" in line for line in failure["traceback"])
    assert own.list_checkpoints() == [], "no checkpoint is left behind"


def test_percent_script_and_cell_choice(own: Client, tmp_path: Path) -> None:
    script = tmp_path / "pipeline.py"
    script.write_text(
        "# %%\nscale = 3\n\n# %% [markdown]\n# Notes\n\n# %%\ndef apply(x):\n    return x * scale\n\n"
        "# %%\ny = apply(x)\n"
    )
    with pytest.raises(CellFailedError, match="Cell 3 raised NameError"):
        own.create_checkpoint(script)
    checkpoint = own.create_checkpoint(script, cell=2, name="pipeline")
    assert checkpoint["cell"] == 2 and "def apply" in checkpoint["cell_source"]
    assert {v["name"] for v in checkpoint["variables"]} == {"scale", "apply"}
    with pytest.raises(InvalidArgument, match="out of range: the notebook has 3 code cells"):
        own.create_checkpoint(script, cell=7)
    (tmp_path / "notes.txt").write_text("x = 1")
    with pytest.raises(InvalidArgument, match="notes.txt"):
        own.create_checkpoint(tmp_path / "notes.txt")
    own.delete_checkpoint("pipeline")


def test_equal_values_share_one_blob(own: Client, tmp_path: Path) -> None:
    checkpoint = own.create_checkpoint(notebook(tmp_path, "a = 'same'\nb = a\nc = 'sa' + 'me'"))
    shas = {v["name"]: v["sha256"] for v in checkpoint["variables"]}
    assert shas["a"] == shas["b"] == shas["c"]
    own.delete_checkpoint(checkpoint["id"])
