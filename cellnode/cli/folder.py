"""`cellnode folder ...`: folders and the access bindings that grant roles on them."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cellnode.cli._common import JsonOption, client, emit, fields, table

app = typer.Typer(help="Folders: the unit of ownership and access.", no_args_is_help=True)

FolderArg = Annotated[str, typer.Argument(help="Folder ID or name.")]
RoleOption = Annotated[str, typer.Option("--role", help="viewer, developer or admin.")]
SubjectOption = Annotated[str, typer.Option("--subject", help="serviceAccount:ID or user:ID.")]
BINDING_COLUMNS = [("role", "ROLE"), ("subject", "SUBJECT"), ("name", "NAME"), ("created_at", "SINCE")]


def _show(folder: dict[str, Any]) -> None:
    fields(folder, [("id", "ID"), ("name", "Name"), ("description", "Description"), ("created_at", "Created")])


@app.command("list")
def list_(as_json: JsonOption = False) -> None:
    """List the folders you hold a role on, with their IDs.

    Example: cellnode folder list
    """
    with client() as api:
        folders = api.list_folders()
    emit(folders, as_json, lambda rows: table(rows, [("id", "ID"), ("name", "NAME"), ("created_at", "CREATED")]))


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Folder name: lowercase letters, digits, hyphens.")],
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    as_json: JsonOption = False,
) -> None:
    """Create a folder (server admins only).

    Example: cellnode folder create team-a --description "Team A's models"
    """
    with client() as api:
        folder = api.create_folder(name, description=description)
    emit(folder, as_json, _show)


@app.command()
def get(folder: FolderArg, as_json: JsonOption = False) -> None:
    """Show a folder.

    Example: cellnode folder get team-a
    """
    with client() as api:
        found = api.get_folder(folder)
    emit(found, as_json, _show)


@app.command()
def update(
    folder: FolderArg,
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    description: Annotated[str | None, typer.Option(help="New description.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Rename a folder or change its description (its admins).

    Example: cellnode folder update team-a --description "Team A"
    """
    with client() as api:
        found = api.update_folder(folder, name=name, description=description)
    emit(found, as_json, _show)


@app.command()
def delete(folder: FolderArg, as_json: JsonOption = False) -> None:
    """Delete an empty folder (server admins only).

    Example: cellnode folder delete team-a
    """
    with client() as api:
        found = api.delete_folder(folder)
    emit(found, as_json, lambda f: typer.echo(f"Deleted folder {f['name']} ({f['id']})."))


@app.command("list-access-bindings")
def list_access_bindings(folder: FolderArg, as_json: JsonOption = False) -> None:
    """List who holds which role on a folder.

    Example: cellnode folder list-access-bindings team-a
    """
    with client() as api:
        bindings = api.list_access_bindings(folder)
    emit(bindings, as_json, lambda rows: table(rows, BINDING_COLUMNS))


@app.command("add-access-binding")
def add_access_binding(
    folder: FolderArg, role: RoleOption, subject: SubjectOption, as_json: JsonOption = False
) -> None:
    """Grant a role on a folder (its admins).

    Example: cellnode folder add-access-binding team-a --role developer --subject user:0a1b2c3d4e5f6g7h8i9j
    """
    with client() as api:
        binding = api.add_access_binding(folder, role=role, subject=subject)
    emit(binding, as_json, lambda b: typer.echo(f"{b['subject']} ({b['name']}) is {b['role']} on {b['folder_id']}."))


@app.command("remove-access-binding")
def remove_access_binding(
    folder: FolderArg, role: RoleOption, subject: SubjectOption, as_json: JsonOption = False
) -> None:
    """Take a role on a folder away (its admins).

    Example: cellnode folder remove-access-binding team-a --role developer --subject user:0a1b2c3d4e5f6g7h8i9j
    """
    with client() as api:
        binding = api.remove_access_binding(folder, role=role, subject=subject)
    emit(
        binding,
        as_json,
        lambda b: typer.echo(f"{b['subject']} ({b['name']}) is no longer {b['role']} on {b['folder_id']}."),
    )
