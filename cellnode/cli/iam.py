"""`cellnode iam ...`"""

from __future__ import annotations

import typer

from cellnode.cli._common import JsonOption, client, emit

app = typer.Typer(help="Credentials.", no_args_is_help=True)


@app.command("create-token")
def create_token(as_json: JsonOption = False) -> None:
    """Print a new IAM token, valid 12 hours, for 'Authorization: Bearer <token>'.

    Example: curl -H "Authorization: Bearer $(cellnode iam create-token)" ...
    """
    with client() as api:
        token = api.create_token()
    emit(token, as_json, lambda t: typer.echo(t["iam_token"]))
