"""Read notebooks (`.ipynb` or percent-format `.py` scripts) into nbformat v4 nodes."""

from __future__ import annotations

import json
import warnings
from pathlib import PurePath
from typing import Any

import jupytext
import nbformat

from cellnode.exceptions import InvalidArgument

ACCEPTED_EXTENSIONS = (".ipynb", ".py")

UNSUPPORTED_EXTENSION_MSG = (
    "File {filename!r} has an unsupported extension; upload a notebook ending in .ipynb "
    "or a percent-format script (# %% cells) ending in .py."
)
NOT_UTF8_MSG = "File {filename!r} is not valid UTF-8 ({error}); save it with UTF-8 encoding and upload it again."
INVALID_JSON_MSG = "File {filename!r} is not valid JSON ({error}); upload a notebook saved by Jupyter."
NOT_A_NOTEBOOK_MSG = "File {filename!r} is not a Jupyter notebook ({error}); upload a notebook saved by Jupyter."
INVALID_SCRIPT_MSG = "File {filename!r} could not be read as a percent-format script ({error}); check its # %% markers."

# Neither library annotates `reads`; we call them through explicitly untyped names.
_nbformat_reads: Any = nbformat.reads
_jupytext_reads: Any = jupytext.reads


def read_notebook(content: bytes, filename: str) -> nbformat.NotebookNode:
    """Parse an uploaded `.ipynb` notebook or percent-format `.py` script into an nbformat v4 notebook."""
    extension = PurePath(filename).suffix.lower()
    if extension not in ACCEPTED_EXTENSIONS:
        raise InvalidArgument(UNSUPPORTED_EXTENSION_MSG.format(filename=filename))
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(NOT_UTF8_MSG.format(filename=filename, error=exc)) from exc
    if extension == ".py":
        return _read_script(text, filename)
    return _read_ipynb(text, filename)


def _read_ipynb(text: str, filename: str) -> nbformat.NotebookNode:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(INVALID_JSON_MSG.format(filename=filename, error=exc)) from exc
    if not isinstance(data, dict) or not isinstance(data.get("nbformat"), int):
        error = "the top level must be a JSON object with an integer 'nbformat' field"
        raise InvalidArgument(NOT_A_NOTEBOOK_MSG.format(filename=filename, error=error))
    try:
        # Old notebooks (no cell ids, nbformat 3) are fine to run; nbformat only warns about them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nb: nbformat.NotebookNode = _nbformat_reads(text, as_version=4)
            nbformat.validate(nb)
    except Exception as exc:  # nbformat raises a zoo of classes for malformed notebooks
        error = f"{type(exc).__name__}: {_first_line(exc)}"
        raise InvalidArgument(NOT_A_NOTEBOOK_MSG.format(filename=filename, error=error)) from exc
    return nb


def _read_script(text: str, filename: str) -> nbformat.NotebookNode:
    try:
        nb: nbformat.NotebookNode = _jupytext_reads(text, fmt="py:percent")
    except Exception as exc:  # jupytext does not promise an exception class
        error = f"{type(exc).__name__}: {_first_line(exc)}"
        raise InvalidArgument(INVALID_SCRIPT_MSG.format(filename=filename, error=error)) from exc
    return nb


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "no details"


def code_cells(nb: nbformat.NotebookNode) -> list[str]:
    """The sources of the notebook's code cells, in order."""
    return [_source(cell) for cell in nb.cells if cell.cell_type == "code"]


def _source(cell: nbformat.NotebookNode) -> str:
    source = cell.source
    # nbformat.reads joins multi-line sources, but a hand-built node may still hold a list.
    return "".join(source) if isinstance(source, list) else str(source)
