"""`cellnode iam ...`: who you are, users, service accounts, API keys, IAM tokens."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cellnode.cli._common import FolderOption, JsonOption, client, emit, fields, table

app = typer.Typer(help="Users, service accounts and credentials.", no_args_is_help=True)

PRINCIPAL_COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("subject", "SUBJECT"),
    ("folder_id", "FOLDER"),
    ("server_admin", "SERVER ADMIN"),
]
KEY_COLUMNS = [("id", "ID"), ("description", "DESCRIPTION"), ("created_at", "CREATED"), ("revoked_at", "REVOKED")]


def _show(principal: dict[str, Any]) -> None:
    fields(
        principal,
        [("id", "ID"), ("subject", "Subject"), ("name", "Name"), ("folder_id", "Folder"), ("server_admin", "Admin")],
    )


@app.command("create-token")
def create_token(as_json: JsonOption = False) -> None:
    """Print a new IAM token, valid 12 hours, for 'Authorization: Bearer <token>'.

    Example: curl -H "Authorization: Bearer $(cellnode iam create-token)" ...
    """
    with client() as api:
        token = api.create_token()
    emit(token, as_json, lambda t: typer.echo(t["iam_token"]))


@app.command()
def whoami(as_json: JsonOption = False) -> None:
    """Show who your credential is, and your roles by folder.

    Example: cellnode iam whoami
    """
    with client() as api:
        me = api.whoami()

    def show(data: dict[str, Any]) -> None:
        _show(data)
        table([{"folder": f, "role": r} for f, r in data["roles"].items()], [("folder", "FOLDER"), ("role", "ROLE")])

    emit(me, as_json, show)


@app.command("create-user")
def create_user(
    name: Annotated[str, typer.Argument(help="User name.")],
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    server_admin: Annotated[bool, typer.Option(help="Admin on every folder; manages folders and users.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Create a user (server admins only); then give it a key and access bindings.

    Example: cellnode iam create-user alice && cellnode iam create-api-key --principal USER_ID
    """
    with client() as api:
        user = api.create_user(name, description=description, server_admin=server_admin)
    emit(user, as_json, _show)


@app.command("list-users")
def list_users(as_json: JsonOption = False) -> None:
    """List the users (server admins only).

    Example: cellnode iam list-users
    """
    with client() as api:
        users = api.list_users()
    emit(users, as_json, lambda rows: table(rows, PRINCIPAL_COLUMNS))


@app.command("delete-user")
def delete_user(user_id: Annotated[str, typer.Argument(help="User ID.")], as_json: JsonOption = False) -> None:
    """Delete a user: its keys stop working and its access bindings go (server admins only).

    Example: cellnode iam delete-user 0a1b2c3d4e5f6g7h8i9j
    """
    with client() as api:
        user = api.delete_user(user_id)
    emit(user, as_json, lambda u: typer.echo(f"Deleted user {u['name']} ({u['id']})."))


@app.command("create-service-account")
def create_service_account(
    name: Annotated[str, typer.Argument(help="Service account name, unique in the folder.")],
    folder: FolderOption = None,
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    as_json: JsonOption = False,
) -> None:
    """Create a service account in a folder (its admins). It may call that folder's nodes.

    Example: cellnode iam create-service-account scorer --folder team-a
    """
    with client() as api:
        account = api.create_service_account(name, folder_id=folder, description=description)
    emit(account, as_json, _show)


@app.command("list-service-accounts")
def list_service_accounts(folder: FolderOption = None, as_json: JsonOption = False) -> None:
    """List the service accounts of a folder.

    Example: cellnode iam list-service-accounts --folder team-a
    """
    with client() as api:
        accounts = api.list_service_accounts(folder_id=folder)
    emit(accounts, as_json, lambda rows: table(rows, PRINCIPAL_COLUMNS))


@app.command("delete-service-account")
def delete_service_account(
    account_id: Annotated[str, typer.Argument(help="Service account ID.")], as_json: JsonOption = False
) -> None:
    """Delete a service account: its keys stop working and its access bindings go (its folder's admins).

    Example: cellnode iam delete-service-account 0a1b2c3d4e5f6g7h8i9j
    """
    with client() as api:
        account = api.delete_service_account(account_id)
    emit(account, as_json, lambda a: typer.echo(f"Deleted service account {a['name']} ({a['id']})."))


@app.command("create-api-key")
def create_api_key(
    principal: Annotated[str | None, typer.Option(help="Whose key (ID); default: yours.")] = None,
    description: Annotated[str, typer.Option(help="What the key is for.")] = "",
    as_json: JsonOption = False,
) -> None:
    """Create an API key and print it: it is shown this once.

    Example: cellnode iam create-api-key --principal 0a1b2c3d4e5f6g7h8i9j --description "CI"
    """
    with client() as api:
        key = api.create_api_key(principal_id=principal, description=description)
    emit(key, as_json, lambda k: typer.echo(k["secret"]))


@app.command("list-api-keys")
def list_api_keys(
    principal: Annotated[str | None, typer.Option(help="Whose keys (ID); default: yours.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List API keys (never their secrets).

    Example: cellnode iam list-api-keys
    """
    with client() as api:
        keys = api.list_api_keys(principal_id=principal)
    emit(keys, as_json, lambda rows: table(rows, KEY_COLUMNS))


@app.command("revoke-api-key")
def revoke_api_key(key_id: Annotated[str, typer.Argument(help="API key ID.")], as_json: JsonOption = False) -> None:
    """Revoke an API key and the IAM tokens made from it.

    Example: cellnode iam revoke-api-key 0a1b2c3d4e5f6g7h8i9j
    """
    with client() as api:
        key = api.revoke_api_key(key_id)
    emit(key, as_json, lambda k: typer.echo(f"Revoked API key {k['id']}."))
