"""`cellnode folder ...`"""

from __future__ import annotations

import typer

from cellnode.cli._common import JsonOption, client, emit, table

app = typer.Typer(help="Folders: the unit of ownership and access.", no_args_is_help=True)


@app.command("list")
def list_(as_json: JsonOption = False) -> None:
    """List folders with their IDs.

    Example: cellnode folder list
    """
    with client() as api:
        folders = api.list_folders()
    emit(folders, as_json, lambda rows: table(rows, [("id", "ID"), ("name", "NAME"), ("created_at", "CREATED")]))
