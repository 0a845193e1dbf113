"""`cellnode node ...`"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from cellnode.cli._common import FolderOption, JsonOption, client, emit, table
from cellnode.cli._container import list_row
from cellnode.cli._node_common import show_node
from cellnode.cli._node_create import create
from cellnode.cli._node_update import update
from cellnode.cli.usage import parse_since
from cellnode.telemetry.logs import MAX_TAIL

app = typer.Typer(help="Nodes: deployed cells or docker images, served as authenticated APIs.", no_args_is_help=True)

COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("type", "TYPE"),
    ("status", "STATUS"),
    ("inputs", "INPUTS / IMAGE"),
    ("outputs", "OUTPUTS / ENDPOINT"),
]

app.command()(create)


@app.command("list")
def list_(folder: FolderOption = None, as_json: JsonOption = False) -> None:
    """List the nodes of a folder.

    Example: cellnode node list
    """
    with client() as api:
        nodes = api.list_nodes(folder_id=folder)
    emit(nodes, as_json, lambda rows: table([list_row(row) for row in rows], COLUMNS))


@app.command()
def get(
    node: Annotated[str, typer.Argument(help="Node name or ID.")],
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a node and its status.

    Example: cellnode node get randomizer-node
    """
    with client() as api:
        found = api.get_node(node, folder_id=folder)
    emit(found, as_json, show_node)


@app.command()
def delete(
    node: Annotated[str, typer.Argument(help="Node name or ID.")],
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a node and stop its instances.

    Example: cellnode node delete randomizer-node
    """
    with client() as api:
        found = api.delete_node(node, folder_id=folder)
    emit(found, as_json, lambda n: typer.echo(f"Deleted node {n['name']} ({n['id']})."))


app.command()(update)


@app.command()
def suspend(
    node: Annotated[str, typer.Argument(help="Node name or ID.")],
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop a node's instances and keep the node; requests get 503 until it is resumed.

    Example: cellnode node suspend randomizer-node
    """
    with client() as api:
        found = api.suspend_node(node, folder_id=folder)
    emit(found, as_json, lambda n: typer.echo(f"Suspended node {n['name']} ({n['id']})."))


@app.command()
def resume(
    node: Annotated[str, typer.Argument(help="Node name or ID.")],
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a suspended node again, from its pinned checkpoint; waits until it is HEALTHY.

    Example: cellnode node resume randomizer-node
    """
    with client() as api:
        found = api.resume_node(node, folder_id=folder)
    emit(found, as_json, lambda n: typer.echo(f"Resumed node {n['name']} ({n['id']}): {n['status']}."))


@app.command()
def execute(
    node: Annotated[str, typer.Argument(help="Node name or ID.")],
    input: Annotated[str, typer.Option("--input", help="The input variables as a JSON object.")] = "{}",
    folder: FolderOption = None,
) -> None:
    """Call a node through the execute API and print its output variables as JSON.

    Example: cellnode node execute randomizer-node --input '{"input_data": {"left_bound": 1, "right_bound": 10}}'
    """
    try:
        variables = json.loads(input)
    except ValueError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--input") from None
    if not isinstance(variables, dict):
        raise typer.BadParameter("must be a JSON object of input variables", param_hint="--input")
    with client() as api:
        output = api.execute(node, variables, folder_id=folder)
    typer.echo(json.dumps({"output": output}, indent=2, ensure_ascii=False))


@app.command()
def logs(
    node: Annotated[str, typer.Argument(help="Node name or ID.")],
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Keep printing new lines until Ctrl-C.")] = False,
    since: Annotated[str | None, typer.Option(help="Only lines from this long ago: 90s, 30m, 12h, 7d.")] = None,
    instance: Annotated[str | None, typer.Option(help="Only this instance's lines.")] = None,
    tail: Annotated[int, typer.Option(help="How many of the last lines to print first.")] = 100,
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a node's log: its instances' output, the cell's prints included, with time, instance and request ID.

    Example: cellnode node logs randomizer-node --since 10m --follow
    """
    start = parse_since(since).strftime("%Y-%m-%dT%H:%M:%S.000Z") if since else None
    seen: set[tuple[str, ...]] = set()
    with client() as api:
        while True:
            lines = api.node_logs(node, folder_id=folder, since=start, instance=instance, tail=tail)
            for line in lines:
                key = (line["time"], line["instance_id"], line["request_id"], line["stream"], line["text"])
                if key in seen:
                    continue
                seen.add(key)
                if as_json:
                    typer.echo(json.dumps(line))
                else:
                    typer.echo(
                        f"{line['time']} {line['instance_id']} {line['request_id']} {line['stream']} {line['text']}"
                    )
            if not follow:
                return
            if lines:
                start = lines[-1]["time"]
                seen = {key for key in seen if key[0] >= start}
            tail = MAX_TAIL
            time.sleep(1)


@app.command()
def openapi(node: Annotated[str, typer.Argument(help="Node name or ID.")], folder: FolderOption = None) -> None:
    """Print the node's OpenAPI document, with its typed variables, for generating a client.

    Example: cellnode node openapi randomizer-node > randomizer.json
    """
    with client() as api:
        document = api.node_openapi(node, folder_id=folder)
    typer.echo(json.dumps(document, indent=2))


@app.command()
def proto(
    node: Annotated[str, typer.Argument(help="Node name or ID.")],
    folder: FolderOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the file here instead of printing it.")
    ] = None,
) -> None:
    """Print the .proto of the node's typed gRPC service (one typed field per variable), for generating a client.

    Example: cellnode node proto randomizer-node -o randomizer.proto
    """
    with client() as api:
        found = api.node_proto(node, folder_id=folder)
    if output is None:
        typer.echo(found["proto"], nl=False)
        return
    output.write_text(found["proto"])
    typer.echo(f"Wrote {output}: service {found['service']}, method {found['method']}.", err=True)
