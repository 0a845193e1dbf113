"""What the CLI commands share: the connection options, the client, and output as tables or JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cellnode.client import Client

console = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
FolderOption = Annotated[
    str | None, typer.Option("--folder", "-f", help="Folder ID or name. Default: your own folder.")
]


class Connection:
    url: str | None = None
    token: str | None = None


def client() -> Client:
    return Client(Connection.url, Connection.token)


def emit(data: Any, as_json: bool, show: Callable[[Any], None]) -> None:
    """Print `data` as JSON, or through `show` for people."""
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        show(data)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]], title: str | None = None) -> None:
    """A table of `rows`, with (key, heading) columns."""
    grid = Table(title=title, title_justify="left")
    for _key, heading in columns:
        grid.add_column(heading)
    for row in rows:
        grid.add_row(*(_cell(row.get(key)) for key, _heading in columns))
    console.print(grid)


def fields(record: dict[str, Any], keys: Sequence[tuple[str, str]]) -> None:
    """One record as `heading: value` lines."""
    width = max(len(heading) for _key, heading in keys)
    for key, heading in keys:
        console.print(f"[bold]{heading.ljust(width)}[/bold]  {_cell(record.get(key))}", highlight=False)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_cell(item) for item in value) or "-"
    if isinstance(value, dict) and "name" in value and "type" in value:
        return f"{value['name']}:{value['type']}"
    return str(value)
