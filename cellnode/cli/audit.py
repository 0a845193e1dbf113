"""`cellnode audit`: who did what, and who was refused, newest first."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cellnode.cli._common import JsonOption, client, emit, table
from cellnode.cli.usage import parse_since

COLUMNS = [
    ("at", "TIME"),
    ("subject", "PRINCIPAL"),
    ("action", "ACTION"),
    ("resource", "RESOURCE"),
    ("folder_id", "FOLDER"),
    ("result", "RESULT"),
    ("code", "CODE"),
    ("client", "CLIENT"),
]


def audit(
    folder: Annotated[
        str | None,
        typer.Option(
            "--folder",
            "-f",
            help="Only this folder (ID or name); you need the role 'admin' on it. Default: every folder you are an "
            "admin of (a server admin: every event, those of no folder included).",
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only since this long ago: 90s, 30m, 12h, 7d. Default: all.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many events, the newest; 1 to 10000. Default: 100.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Show the audit log: management actions and denied requests, newest first.

    Example: cellnode audit --folder default --since 24h
    """
    start = parse_since(since) if since else None
    with client() as api:
        events = api.audit(folder, since=start, limit=limit)

    def show(rows: list[dict[str, Any]]) -> None:
        table([{**row, "subject": row["subject"] or "(no credential)"} for row in rows], COLUMNS)

    emit(events, as_json, show)
