"""`cellnode node ...`"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cellnode.cli._common import FolderOption, JsonOption, client, emit, fields, table
from cellnode.cli.usage import parse_since
from cellnode.runtime.variables import TYPES
from cellnode.telemetry.logs import MAX_TAIL

app = typer.Typer(help="Nodes: deployed cells, served as authenticated APIs.", no_args_is_help=True)

COLUMNS = [("id", "ID"), ("name", "NAME"), ("status", "STATUS"), ("inputs", "INPUTS"), ("outputs", "OUTPUTS")]
VARIABLE_HELP = f"NAME:TYPE, repeatable; TYPE is one of {', '.join(TYPES)}."


def parse_variable(option: str, text: str) -> dict[str, str]:
    """`NAME:TYPE` as a declaration; a usage error naming the option and the fix otherwise."""
    name, sep, kind = text.partition(":")
    if not sep or not name or kind not in TYPES:
        raise typer.BadParameter(
            f"{text!r} must be NAME:TYPE with TYPE one of {', '.join(TYPES)} (for example input_data:dict).",
            param_hint=option,
        )
    return {"name": name, "type": kind}


def _show(node: dict[str, Any]) -> None:
    fields(
        node,
        [
            ("id", "ID"),
            ("name", "Name"),
            ("folder_id", "Folder"),
            ("status", "Status"),
            ("status_message", "Reason"),
            ("checkpoint_id", "Checkpoint"),
            ("inputs", "Inputs"),
            ("outputs", "Outputs"),
            ("acl", "ACL"),
            ("timeout", "Timeout, s"),
            ("spec", "Spec"),
            ("state", "State"),
            ("instance_count", "Instances"),
            ("min_instances", "Min instances"),
            ("max_instances", "Max instances"),
            ("zones", "Zones"),
            ("max_queue", "Queue"),
            ("secrets", "Secrets"),
            ("description", "Description"),
        ],
    )
    if node.get("instances"):
        table(
            node["instances"],
            [
                ("id", "INSTANCE"),
                ("slot", "SLOT"),
                ("status", "STATUS"),
                ("status_since", "SINCE"),
                ("restarts", "RESTARTS"),
                ("zone", "ZONE"),
                ("host", "HOST"),
                ("pid", "PID"),
                ("last_error", "LAST ERROR"),
            ],
        )


MinOption = Annotated[int | None, typer.Option(help="Fewest instances the autoscaler keeps. Default: 1.")]
MaxOption = Annotated[int | None, typer.Option(help="Most instances the autoscaler starts. Default: the minimum.")]
SecretOption = Annotated[
    list[str] | None,
    typer.Option("--secret", help="Secret of the node's folder (name or ID), given as a variable; repeatable."),
]
ZoneOption = Annotated[
    list[str] | None,
    typer.Option("--zone", help="ZONE[:SUBNET] to spread instances over, repeatable. Default: every zone ('local')."),
]


@app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="Node name, unique in the folder.")],
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Pinned checkpoint: name or ID.")],
    output: Annotated[list[str], typer.Option("--output", help="Output variable: " + VARIABLE_HELP)],
    input: Annotated[list[str] | None, typer.Option("--input", help="Input variable: " + VARIABLE_HELP)] = None,
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    folder: FolderOption = None,
    acl: Annotated[
        list[str] | None,
        typer.Option("--acl", help="Folder ID allowed to call the node, repeatable. Default: its own."),
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds a request may run. Default: 60.")] = None,
    instances: Annotated[
        int | None, typer.Option(help="Instances to run, each serving one request at a time. Default: 1.")
    ] = None,
    min_instances: MinOption = None,
    max_instances: MaxOption = None,
    max_queue: Annotated[
        int | None, typer.Option(help="Requests that may wait when all instances are busy; then 429. Default: 64.")
    ] = None,
    spec: Annotated[
        str | None, typer.Option(help="Instance spec ('cellnode spec list'): vCPUs, RAM, GPUs. Default: c1.4.")
    ] = None,
    zone: ZoneOption = None,
    maintenance_limit: Annotated[
        int | None, typer.Option(help="Instances replaced at once in a roll. Default: 1.")
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(help="isolated (default: bindings restored per request), persistent (changes stay), fork."),
    ] = None,
    secret: SecretOption = None,
    wait: Annotated[bool, typer.Option(help="Wait until the node is HEALTHY.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Create a cell node from a pinned checkpoint.

    Give --instances N for a fixed count, or --min-instances/--max-instances to let the autoscaler choose.

    Example: cellnode node create --name randomizer-node --checkpoint randomizer-checkpoint
    --input input_data:dict --output output_data:dict --min-instances 1 --max-instances 4
    """
    inputs = [parse_variable("--input", text) for text in input or []]
    outputs = [parse_variable("--output", text) for text in output]
    with client() as api:
        node = api.create_node(
            name,
            checkpoint=checkpoint,
            inputs=inputs,
            outputs=outputs,
            description=description,
            folder_id=folder,
            acl=acl,
            timeout=timeout,
            instances=instances,
            min_instances=min_instances,
            max_instances=max_instances,
            max_queue=max_queue,
            spec=spec,
            zones=zone,
            maintenance_limit=maintenance_limit,
            state=state,
            secrets=secret,
            wait=wait,
        )
    emit(node, as_json, _show)


@app.command("list")
def list_(folder: FolderOption = None, as_json: JsonOption = False) -> None:
    """List the nodes of a folder.

    Example: cellnode node list
    """
    with client() as api:
        nodes = api.list_nodes(folder_id=folder)
    emit(nodes, as_json, lambda rows: table(rows, COLUMNS))


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
    emit(found, as_json, _show)


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


@app.command()
def update(
    node: Annotated[str, typer.Argument(help="Node name or ID.")],
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    description: Annotated[str | None, typer.Option(help="New description.")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="New pinned checkpoint (rolls the instances).")] = None,
    input: Annotated[
        list[str] | None, typer.Option("--input", help="Input variables, all of them (rolls): " + VARIABLE_HELP)
    ] = None,
    output: Annotated[
        list[str] | None, typer.Option("--output", help="Output variables, all of them (rolls): " + VARIABLE_HELP)
    ] = None,
    acl: Annotated[list[str] | None, typer.Option("--acl", help="Folder IDs allowed to call the node, all.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds a request may run.")] = None,
    instances: Annotated[int | None, typer.Option(help="A fixed number of instances.")] = None,
    min_instances: MinOption = None,
    max_instances: MaxOption = None,
    max_queue: Annotated[int | None, typer.Option(help="Requests that may wait when all instances are busy.")] = None,
    spec: Annotated[str | None, typer.Option(help="Instance spec (rolls the instances).")] = None,
    zone: Annotated[
        list[str] | None, typer.Option("--zone", help="ZONE[:SUBNET], repeatable: all the zones (rolls).")
    ] = None,
    move_to: Annotated[str | None, typer.Option(help="Move the node to this folder (ID or name).")] = None,
    state: Annotated[str | None, typer.Option(help="isolated, persistent or fork (rolls the instances).")] = None,
    maintenance_limit: Annotated[int | None, typer.Option(help="Instances replaced at once in a roll.")] = None,
    secret: Annotated[
        list[str] | None, typer.Option("--secret", help="Secrets (name or ID), repeatable: all (rolls if changed).")
    ] = None,
    no_secrets: Annotated[bool, typer.Option("--no-secrets", help="Take every secret from the node (rolls).")] = False,
    roll: Annotated[
        bool, typer.Option("--roll", help="Roll the instances even if nothing else changed (new secret values).")
    ] = False,
    folder: FolderOption = None,
    wait: Annotated[bool, typer.Option(help="Wait until every instance runs the new version.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Change a node. A new checkpoint, variables, spec, state or zones roll its instances with no downtime.

    Example: cellnode node update randomizer-node --checkpoint randomizer-v2 --maintenance-limit 1
    """
    changes: dict[str, Any] = {
        "name": name,
        "description": description,
        "checkpoint": checkpoint,
        "inputs": [parse_variable("--input", t) for t in input] if input else None,
        "outputs": [parse_variable("--output", t) for t in output] if output else None,
        "acl": acl,
        "timeout": timeout,
        "instances": instances,
        "min_instances": min_instances,
        "max_instances": max_instances,
        "max_queue": max_queue,
        "spec": spec,
        "zones": zone,
        "move_to": move_to,
        "state": state,
        "maintenance_limit": maintenance_limit,
        "secrets": [] if no_secrets else secret,
        "roll": roll or None,
    }
    if no_secrets and secret:
        raise typer.BadParameter("give --secret or --no-secrets, not both", param_hint="--no-secrets")
    with client() as api:
        found = api.update_node(
            node, folder_id=folder, wait=wait, **{key: value for key, value in changes.items() if value is not None}
        )
    emit(found, as_json, _show)


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
