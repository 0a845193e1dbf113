"""`cellnode secret ...`

A value is read from a file (`--value-file`) or from standard input (`--value-stdin`), never from the command line,
where it would stay in the shell's history and show in `ps`. One trailing newline, which `echo` and editors add, is
dropped unless `--keep-newline` is given.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cellnode.cli._common import FolderOption, JsonOption, client, emit, fields, table

app = typer.Typer(
    help="Secrets: values kept encrypted, given to nodes' instances as environment variables.", no_args_is_help=True
)

COLUMNS = [("id", "ID"), ("name", "NAME"), ("version", "VERSION"), ("updated_at", "UPDATED"), ("description", "DESC")]
NameArgument = Annotated[str, typer.Argument(help="Secret name (as the variable nodes see) or ID.")]
ValueFileOption = Annotated[
    Path | None, typer.Option("--value-file", help="Read the value from this file (UTF-8 text, at most 64 KiB).")
]
ValueStdinOption = Annotated[bool, typer.Option("--value-stdin", help="Read the value from standard input.")]
KeepNewlineOption = Annotated[
    bool, typer.Option("--keep-newline", help="Keep a trailing newline. Default: one is dropped.")
]


def read_value(value_file: Path | None, value_stdin: bool, keep_newline: bool, *, required: bool) -> str | None:
    """The value from the file or standard input; a usage error that never quotes it."""
    if value_file is not None and value_stdin:
        raise typer.BadParameter("give --value-file or --value-stdin, not both", param_hint="--value-file")
    if value_file is None and not value_stdin:
        if required:
            raise typer.BadParameter(
                "the value is read from a file or standard input, never from the command line (it would stay in "
                "the shell's history): give --value-file FILE or --value-stdin",
                param_hint="--value-file / --value-stdin",
            )
        return None
    try:
        raw = sys.stdin.buffer.read() if value_stdin else Path(value_file or "").read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {str(value_file)!r}: {exc.strerror}", param_hint="--value-file"
        ) from None
    except UnicodeDecodeError as exc:
        raise typer.BadParameter(
            f"the value is not UTF-8 text (a bad byte at offset {exc.start}); a secret holds text, so encode binary "
            "data first (base64, for example)",
            param_hint="--value-stdin" if value_stdin else "--value-file",
        ) from None
    if not keep_newline:
        text = text.removesuffix("\r\n") if text.endswith("\r\n") else text.removesuffix("\n")
    return text


def _show(secret: dict[str, Any]) -> None:
    fields(
        secret,
        [
            ("id", "ID"),
            ("name", "Name"),
            ("folder_id", "Folder"),
            ("value", "Value"),
            ("version", "Version"),
            ("description", "Description"),
            ("created_by", "Created by"),
            ("created_at", "Created"),
            ("updated_at", "Updated"),
        ],
    )


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="1-63 of A-Z, 0-9 and _, not starting with a digit (DB_PASSWORD).")],
    value_file: ValueFileOption = None,
    value_stdin: ValueStdinOption = False,
    keep_newline: KeepNewlineOption = False,
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a secret (needs admin on the folder). Its value is never shown again, only `***`.

    Example: cellnode secret create DB_PASSWORD --value-file ./db-password.txt
    """
    value = read_value(value_file, value_stdin, keep_newline, required=True)
    assert value is not None
    with client() as api:
        secret = api.create_secret(name, value, description=description, folder_id=folder)
    emit(secret, as_json, _show)


@app.command("list")
def list_(folder: FolderOption = None, as_json: JsonOption = False) -> None:
    """List the secrets of a folder, without their values.

    Example: cellnode secret list
    """
    with client() as api:
        secrets = api.list_secrets(folder_id=folder)
    emit(secrets, as_json, lambda rows: table(rows, COLUMNS))


@app.command()
def get(name: NameArgument, folder: FolderOption = None, as_json: JsonOption = False) -> None:
    """Show a secret's metadata; its value shows as `***`.

    Example: cellnode secret get DB_PASSWORD
    """
    with client() as api:
        secret = api.get_secret(name, folder_id=folder)
    emit(secret, as_json, _show)


@app.command()
def update(
    name: NameArgument,
    value_file: ValueFileOption = None,
    value_stdin: ValueStdinOption = False,
    keep_newline: KeepNewlineOption = False,
    description: Annotated[str | None, typer.Option(help="New description.")] = None,
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give a secret a new value or description (needs admin on the folder).

    Instances that run keep the value they started with; instances started from now on get the new one. To move a
    node's instances to it at once, roll the node: cellnode node update NODE --roll.

    Example: cellnode secret update DB_PASSWORD --value-stdin < ./new-password.txt
    """
    value = read_value(value_file, value_stdin, keep_newline, required=description is None)
    with client() as api:
        secret = api.update_secret(name, value=value, description=description, folder_id=folder)
    emit(secret, as_json, _show)


@app.command()
def delete(name: NameArgument, folder: FolderOption = None, as_json: JsonOption = False) -> None:
    """Delete a secret (needs admin on the folder); refused while a node uses it.

    Example: cellnode secret delete DB_PASSWORD
    """
    with client() as api:
        secret = api.delete_secret(name, folder_id=folder)
    emit(secret, as_json, lambda s: typer.echo(f"Deleted secret {s['name']} ({s['id']})."))
