"""The `cellnode` command line. It talks to the server only through the SDK (`cellnode.Client`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cellnode._version import __version__
from cellnode.cli import alias, audit, checkpoint, folder, iam, node, secret, usage
from cellnode.cli._common import Connection
from cellnode.exceptions import CellnodeError

app = typer.Typer(
    help="cellnode: turn a notebook cell, with its interpreter state, into an authenticated API service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(folder.app, name="folder")
app.add_typer(iam.app, name="iam")
app.add_typer(checkpoint.app, name="checkpoint")
app.add_typer(node.app, name="node")
app.add_typer(alias.app, name="alias")
app.add_typer(secret.app, name="secret")
app.add_typer(usage.app, name="spec")
app.command("usage")(usage.usage)
app.command("audit")(audit.audit)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cellnode {__version__}")
        raise typer.Exit()


@app.callback()
def connection(
    url: Annotated[
        str | None, typer.Option(envvar="CELLNODE_URL", help="Server URL. Default: the profile 'serve' wrote.")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="CELLNODE_TOKEN", help="API key or IAM token. Default: the profile's key.")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Options for every command that talks to a server."""
    Connection.url, Connection.token = url, token


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(envvar="CELLNODE_HOST", help="Address to listen on. Default: 127.0.0.1.")
    ] = None,
    port: Annotated[
        # A string here: Settings checks it, with a message that names the flag, the variable and the value.
        str | None,
        typer.Option(envvar="CELLNODE_PORT", help="HTTP port. Default: 8080; 0 picks a free one."),
    ] = None,
    grpc_port: Annotated[
        str | None,
        typer.Option(
            envvar="CELLNODE_GRPC_PORT",
            help="Also serve gRPC on this port (NodeService, typed node services, reflection, health); 0 picks one. "
            "Default: no gRPC.",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(envvar="CELLNODE_DATA_DIR", help="Database, blobs and logs. Default: ~/.local/share/cellnode."),
    ] = None,
    idle_timeout: Annotated[
        str | None,
        typer.Option(
            envvar="CELLNODE_IDLE_TIMEOUT", help="Seconds an idle client connection stays open. Default: 300."
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(envvar="CELLNODE_LOG_LEVEL", help="debug, info, warning or error. Default: info.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(envvar="CELLNODE_TLS_CERT", help="PEM certificate: HTTPS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(envvar="CELLNODE_TLS_KEY", help="PEM key of --tls-cert.")] = None,
    insecure: Annotated[
        bool | None,
        typer.Option(
            "--insecure",
            envvar="CELLNODE_INSECURE",
            help="Plain HTTP on a non-loopback address: keys and data in clear. Only behind a local TLS proxy.",
        ),
    ] = None,
) -> None:
    """Run the server: the management and execute APIs, and the nodes' instances. Stop with Ctrl-C or SIGTERM.

    Example: cellnode serve --port 8080 --data-dir ./data
    """
    from cellnode.config import load_settings
    from cellnode.server.serve import serve as run

    run(
        load_settings(
            host=host,
            port=port,
            grpc_port=grpc_port,
            data_dir=data_dir,
            log_level=log_level,
            idle_timeout=idle_timeout,
            tls_cert=tls_cert,
            tls_key=tls_key,
            insecure=insecure,
        )
    )


def main() -> None:
    """Entry point: a CellnodeError becomes one line on stderr and exit code 1, never a traceback."""
    try:
        app(standalone_mode=True)
    except CellnodeError as exc:
        typer.echo(f"{type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
