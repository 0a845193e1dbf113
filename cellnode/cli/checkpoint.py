"""`cellnode checkpoint ...`"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cellnode.cli._common import FolderOption, JsonOption, client, console, emit, fields, table

app = typer.Typer(help="Checkpoints: a notebook's interpreter state, saved to back nodes.", no_args_is_help=True)

COLUMNS = [("id", "ID"), ("name", "NAME"), ("notebook_name", "NOTEBOOK"), ("cell", "CELL"), ("created_at", "CREATED")]


def _show(checkpoint: dict[str, Any]) -> None:
    fields(
        checkpoint,
        [
            ("id", "ID"),
            ("name", "Name"),
            ("folder_id", "Folder"),
            ("notebook_name", "Notebook"),
            ("cell", "Cell"),
            ("python_version", "Python"),
            ("created_at", "Created"),
        ],
    )
    rows = [{**v, "size": f"{v['size']:,} B"} for v in checkpoint["variables"]]
    rows += [
        {"name": name, "type": f"module {module}", "size": "import"} for name, module in checkpoint["imports"].items()
    ]
    table(rows, [("name", "VARIABLE"), ("type", "TYPE"), ("size", "SIZE")])
    if checkpoint["unserializable"]:
        console.print("[yellow]The following variables cannot be serialized:[/yellow]")
        for item in checkpoint["unserializable"]:
            console.print(f"  {item['name']} ({item['type']}): {item['reason']}", highlight=False, markup=False)
    if checkpoint.get("evicted"):
        console.print(f"Evicted the oldest unpinned checkpoint(s): {', '.join(checkpoint['evicted'])}")


@app.command()
def create(
    notebook: Annotated[Path, typer.Argument(help="An .ipynb notebook or a percent-format .py script.")],
    cell: Annotated[
        int | None, typer.Option(help="Code cell to deploy, counting code cells from 1. Default: the last.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Pin the checkpoint under this name.")] = None,
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run code cells 1..CELL in a fresh kernel and save the state as a checkpoint.

    Example: cellnode checkpoint create examples/randomizer.ipynb --name randomizer-checkpoint
    """
    with client() as api:
        checkpoint = api.create_checkpoint(notebook, cell=cell, name=name, folder_id=folder)
    emit(checkpoint, as_json, _show)


@app.command("list")
def list_(folder: FolderOption = None, as_json: JsonOption = False) -> None:
    """List the checkpoints of a folder, newest first.

    Example: cellnode checkpoint list
    """
    with client() as api:
        checkpoints = api.list_checkpoints(folder_id=folder)
    emit(checkpoints, as_json, lambda rows: table(rows, COLUMNS))


@app.command()
def get(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint ID or pinned name.")],
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a checkpoint: its variables, imports and what could not be serialized.

    Example: cellnode checkpoint get randomizer-checkpoint
    """
    with client() as api:
        found = api.get_checkpoint(checkpoint, folder_id=folder)
    emit(found, as_json, _show)


@app.command()
def pin(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint ID or pinned name.")],
    name: Annotated[str, typer.Argument(help="The name to pin it under.")],
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Pin a checkpoint under a name, so that it can back nodes and is never evicted.

    Example: cellnode checkpoint pin 1a2b3c4d5e6f7g8h9i0j randomizer-checkpoint
    """
    with client() as api:
        found = api.pin_checkpoint(checkpoint, name, folder_id=folder)
    emit(found, as_json, lambda c: typer.echo(f"Pinned {c['id']} as {c['name']}."))


@app.command()
def unpin(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint ID or pinned name.")],
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Unpin a checkpoint (refused while it backs a node).

    Example: cellnode checkpoint unpin randomizer-checkpoint
    """
    with client() as api:
        found = api.unpin_checkpoint(checkpoint, folder_id=folder)
    emit(found, as_json, lambda c: typer.echo(f"Unpinned {c['id']}."))


@app.command()
def delete(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint ID or pinned name.")],
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a checkpoint (refused while it backs a node).

    Example: cellnode checkpoint delete randomizer-checkpoint
    """
    with client() as api:
        found = api.delete_checkpoint(checkpoint, folder_id=folder)
    emit(found, as_json, lambda c: typer.echo(f"Deleted checkpoint {c['id']}."))
