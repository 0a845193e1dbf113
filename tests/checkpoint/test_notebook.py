from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
import pytest

from cellnode.checkpoint.notebook import code_cells, read_notebook
from cellnode.exceptions import InvalidArgument

DATA = Path(__file__).parent / "data"
# nbformat does not annotate its v4 constructors.
V4: Any = nbformat.v4


def _notebook_json(**fields: object) -> bytes:
    body = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": []}
    body.update(fields)
    return json.dumps(body).encode()


def test_reads_ipynb_and_skips_markdown() -> None:
    nb = read_notebook((DATA / "randomizer.ipynb").read_bytes(), "randomizer.ipynb")
    sources = code_cells(nb)
    assert len(nb.cells) == 3
    assert sources[0] == "input_data = dict(left_bound=1, right_bound=10)"
    assert sources[1].startswith("from random import randint\nfrom random import seed\n")
    assert sources[1].endswith("print(output_data)")


def test_reads_percent_script() -> None:
    nb = read_notebook((DATA / "state.py").read_bytes(), "state.py")
    assert [cell.cell_type for cell in nb.cells] == ["markdown", "code", "markdown", "code"]
    sources = code_cells(nb)
    assert sources[0].startswith("import os\n")
    assert "handle = open" in sources[1]


def test_script_without_markers_is_one_cell() -> None:
    assert code_cells(read_notebook(b"x = 1\ny = 2\n", "plain.py")) == ["x = 1\ny = 2"]


def test_extension_is_case_insensitive() -> None:
    cell: dict[str, object] = {
        "cell_type": "code",
        "id": "a",
        "metadata": {},
        "outputs": [],
        "execution_count": None,
        "source": "x=1",
    }
    assert code_cells(read_notebook(_notebook_json(cells=[cell]), "NOTEBOOK.IPYNB")) == ["x=1"]


def test_old_notebook_without_cell_ids_is_upgraded() -> None:
    cell: dict[str, object] = {
        "cell_type": "code",
        "metadata": {},
        "outputs": [],
        "execution_count": None,
        "source": ["a = 1\n", "b = a"],
    }
    nb = read_notebook(_notebook_json(nbformat_minor=4, cells=[cell]), "old.ipynb")
    assert code_cells(nb) == ["a = 1\nb = a"]
    assert nb.nbformat == 4


def test_code_cells_joins_list_sources() -> None:
    nb = V4.new_notebook(cells=[V4.new_code_cell("x = 1")])
    nb.cells[0].source = ["x = 1\n", "y = 2"]
    assert code_cells(nb) == ["x = 1\ny = 2"]


@pytest.mark.parametrize("filename", ["notes.txt", "notebook", "script.R"])
def test_unsupported_extension(filename: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        read_notebook(b"{}", filename)
    assert repr(filename) in str(info.value)
    assert ".ipynb" in str(info.value) and ".py" in str(info.value)


@pytest.mark.parametrize(
    ("content", "filename", "fragment"),
    [
        (b"\xff\xfe not utf-8", "bad.ipynb", "is not valid UTF-8"),
        (b"\xff\xfe not utf-8", "bad.py", "is not valid UTF-8"),
        (b"{not json", "bad.ipynb", "is not valid JSON"),
        (b"[1, 2]", "bad.ipynb", "is not a Jupyter notebook (the top level must be a JSON object"),
        (b'{"cells": []}', "bad.ipynb", "integer 'nbformat' field"),
        (_notebook_json(cells=[{"cell_type": "bogus"}]), "bad.ipynb", "is not a Jupyter notebook (ValidationError"),
    ],
)
def test_malformed_files(content: bytes, filename: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        read_notebook(content, filename)
    assert repr(filename) in str(info.value)
    assert fragment in str(info.value)


def test_script_with_a_broken_header() -> None:
    script = b"# ---\n# jupyter:\n#   kernelspec: {broken\n# ---\n\n# %%\nx = 1\n"
    with pytest.raises(InvalidArgument) as info:
        read_notebook(script, "broken.py")
    message = str(info.value)
    assert message.startswith("File 'broken.py' could not be read as a percent-format script (ParserError: ")
