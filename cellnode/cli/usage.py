"""`cellnode spec ...` and `cellnode usage`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from cellnode.cli._common import FolderOption, JsonOption, client, console, emit, table

app = typer.Typer(help="Instance specs.", no_args_is_help=True)
DURATION = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str) -> datetime:
    """`90s`, `30m`, `12h` or `7d` ago."""
    match = DURATION.match(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration; write a number and a unit: 90s, 30m, 12h or 7d.")
    amount, unit = match.groups()
    return datetime.now(UTC) - timedelta(**{UNITS[unit]: int(amount)})


@app.command("list")
def list_(as_json: JsonOption = False) -> None:
    """List the instance specs of this server and how they become limits here.

    Example: cellnode spec list
    """
    with client() as api:
        found = api.list_specs()

    def show(data: dict[str, Any]) -> None:
        columns = [
            ("name", "SPEC"),
            ("vcpu", "VCPU"),
            ("ram_gb", "RAM, GB"),
            ("gpus", "GPU"),
            ("units_per_second", "UNITS/S"),
        ]
        table(data["specs"], columns)
        console.print(
            f"This machine: {data['cpus']} CPUs, {data['gpus']} GPUs; zones: {', '.join(data['zones'])}. "
            f"{data['policy']}",
            highlight=False,
        )

    emit(found, as_json, show)


def usage(
    node: Annotated[str | None, typer.Option(help="Only this node (ID).")] = None,
    folder: FolderOption = None,
    since: Annotated[str | None, typer.Option(help="Only since this long ago: 90s, 30m, 12h, 7d.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show instance uptime and units per node: seconds (rounded up per instance) x the spec's units per second.

    Example: cellnode usage --since 24h
    """
    start = parse_since(since) if since else None
    with client() as api:
        rows = api.usage(folder_id=folder, node_id=node, since=start)
    emit(
        rows,
        as_json,
        lambda data: table(
            data,
            [
                ("node_id", "NODE"),
                ("spec", "SPEC"),
                ("instances", "INSTANCES"),
                ("seconds", "SECONDS"),
                ("units", "UNITS"),
            ],
        ),
    )
