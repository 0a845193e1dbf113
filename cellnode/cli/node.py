"""`cellnode node ...`"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cellnode.cli._common import FolderOption, JsonOption, client, emit, fields, table
from cellnode.cli._container import (
    CELL,
    DOCKER,
    CommandOption,
    DiskOption,
    EndpointOption,
    FailsOption,
    FixedPortsSwitch,
    FlagsError,
    HealthcheckChangeOption,
    HealthcheckIntervalOption,
    HealthcheckOption,
    HealthcheckPathOption,
    HealthcheckPortOption,
    HealthcheckTimeoutOption,
    IdleTimeoutOption,
    ImageOption,
    KernelImageOption,
    MemoryOption,
    NewImageOption,
    NoCommandOption,
    NoDiskOption,
    NoHealthcheckOption,
    NoKernelImageOption,
    NoMemoryOption,
    NoRegistryOption,
    NoTelemetryOption,
    PassesOption,
    PortOption,
    RegistrySecretOption,
    RegistryUserOption,
    TelemetryOption,
    TelemetryPathOption,
    TelemetryPortOption,
    changed,
    check_fields,
    command as parse_command,
    exclusive,
    healthcheck_flags,
    kernel_image_decl,
    list_row,
    refuse,
    show_rows,
    size,
    sub_fields,
    telemetry_decl,
)
from cellnode.cli.usage import parse_since
from cellnode.runtime.variables import TYPES
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
    settings, rows = show_rows(node)
    kind = (
        [("checkpoint_id", "Checkpoint"), ("inputs", "Inputs"), ("outputs", "Outputs"), ("state", "State"), *rows]
        if node.get("type") != "docker"
        else rows
    )
    zones = [f"{z['zone']}:{z['subnet']}" if z.get("subnet") else z["zone"] for z in node.get("zones") or []]
    fields(
        {**node, **settings, "zones": zones},
        [
            ("id", "ID"),
            ("name", "Name"),
            ("type", "Type"),
            ("folder_id", "Folder"),
            ("status", "Status"),
            ("status_message", "Reason"),
            *kind,
            ("acl", "ACL"),
            ("timeout", "Timeout, s"),
            ("spec", "Spec"),
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
    checkpoint: Annotated[
        str | None,
        typer.Option("--checkpoint", help="Pinned checkpoint (name or ID): makes a cell node.", rich_help_panel=CELL),
    ] = None,
    output: Annotated[
        list[str] | None,
        typer.Option("--output", help="Output variable, 1+ for a cell node: " + VARIABLE_HELP, rich_help_panel=CELL),
    ] = None,
    input: Annotated[
        list[str] | None, typer.Option("--input", help="Input variable: " + VARIABLE_HELP, rich_help_panel=CELL)
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(
            help="isolated (default: bindings restored per request), persistent (changes stay), fork.",
            rich_help_panel=CELL,
        ),
    ] = None,
    kernel_image: KernelImageOption = None,
    image: ImageOption = None,
    registry_username: RegistryUserOption = None,
    registry_password_secret: RegistrySecretOption = None,
    endpoint: EndpointOption = None,
    port: PortOption = None,
    idle_timeout: IdleTimeoutOption = None,
    memory: MemoryOption = None,
    disk: DiskOption = None,
    command: CommandOption = None,
    fixed_ports: Annotated[
        bool,
        typer.Option(
            "--fixed-ports",
            help="The image listens on --port whatever $PORT says: then one instance per machine.",
            rich_help_panel=DOCKER,
        ),
    ] = False,
    telemetry: TelemetryOption = None,
    telemetry_path: TelemetryPathOption = None,
    telemetry_port: TelemetryPortOption = None,
    healthcheck: HealthcheckOption = None,
    healthcheck_port: HealthcheckPortOption = None,
    healthcheck_path: HealthcheckPathOption = None,
    healthcheck_timeout: HealthcheckTimeoutOption = None,
    healthcheck_interval: HealthcheckIntervalOption = None,
    fails_threshold: FailsOption = None,
    passes_threshold: PassesOption = None,
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    folder: FolderOption = None,
    acl: Annotated[
        list[str] | None,
        typer.Option("--acl", help="Folder ID allowed to call the node, repeatable. Default: its own."),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds a request may run (docker: until its answer starts). Default: 60 (cell), 15."),
    ] = None,
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
    secret: SecretOption = None,
    wait: Annotated[bool, typer.Option(help="Wait until the node is HEALTHY.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Create a node: a cell node from a pinned checkpoint (--checkpoint, --output), or a docker node that runs an
    image (--image, --port) and gets the requests sent with its x-node-id header, as they come.

    Give --instances N for a fixed count, or --min-instances/--max-instances to let the autoscaler choose.

    Example: cellnode node create --name randomizer-node --checkpoint randomizer-checkpoint
    --input input_data:dict --output output_data:dict --min-instances 1 --max-instances 4

    Example: cellnode node create --name model --image 127.0.0.1:5000/team/model:1 --endpoint http --port 8080
    --healthcheck http --healthcheck-path /health --memory 2G
    """
    docker_flags = {
        "--port": port,
        "--endpoint": endpoint,
        "--idle-timeout": idle_timeout,
        "--memory": memory,
        "--disk": disk,
        "--command": command,
        "--fixed-ports": fixed_ports or None,
        "--telemetry": telemetry,
        "--telemetry-path": telemetry_path,
        "--telemetry-port": telemetry_port,
        "--healthcheck": healthcheck,
        "--healthcheck-port": healthcheck_port,
        "--healthcheck-path": healthcheck_path,
        "--healthcheck-timeout": healthcheck_timeout,
        "--healthcheck-interval": healthcheck_interval,
        "--fails-threshold": fails_threshold,
        "--passes-threshold": passes_threshold,
    }
    cell_flags = {"--input": input, "--output": output, "--state": state, "--kernel-image": kernel_image}
    check_flags = healthcheck_flags(
        healthcheck_port, healthcheck_path, healthcheck_timeout, healthcheck_interval, fails_threshold, passes_threshold
    )
    if image is not None and checkpoint is not None:
        raise FlagsError("--image makes a docker node and --checkpoint a cell node; give one or the other.")
    if image is None and checkpoint is None:
        raise FlagsError("Give --checkpoint NAME (a cell node) or --image REF --port P (a docker node).")
    if image is not None:
        refuse(cell_flags, "a cell node (--checkpoint)", "a docker node runs its image and passes requests through")
        if port is None:
            raise FlagsError("A docker node needs --port: the port its service listens on.")
    else:
        refuse(docker_flags, "a docker node (--image)", "a cell node runs its checkpoint")
        if not output:
            raise FlagsError("A cell node needs at least one --output NAME:TYPE, the variable it returns.")
        if kernel_image is None and (registry_username or registry_password_secret):
            raise FlagsError(
                "--registry-username and --registry-password-secret are for --image or --kernel-image; give one."
            )
    if registry_username is not None and registry_password_secret is None:
        raise FlagsError(
            f"--registry-username {registry_username!r} needs --registry-password-secret SECRET: a secret of the "
            "node's folder that holds the registry password."
        )
    common: dict[str, Any] = {
        "description": description,
        "folder_id": folder,
        "acl": acl,
        "timeout": timeout,
        "instances": instances,
        "min_instances": min_instances,
        "max_instances": max_instances,
        "max_queue": max_queue,
        "spec": spec,
        "zones": zone,
        "maintenance_limit": maintenance_limit,
        "secrets": secret,
        "wait": wait,
    }
    registry: dict[str, Any] = {
        "registry_username": registry_username,
        "registry_password_secret": registry_password_secret,
    }
    if image is not None:
        assert port is not None
        docker: dict[str, Any] = {
            "image": image,
            "port": port,
            "endpoint": endpoint or "http",
            "idle_timeout": idle_timeout,
            "memory": size("--memory", memory) if memory is not None else None,
            "disk": size("--disk", disk) if disk is not None else None,
            "command": parse_command(command) if command is not None else None,
            "fixed_ports": fixed_ports,
            "telemetry": telemetry_decl(telemetry, telemetry_path, telemetry_port),
            "healthcheck": check_fields(healthcheck, check_flags, implied=None),
        }
        with client() as api:
            node = api.create_docker_node(name, **docker, **registry, **common)
    else:
        inputs = [parse_variable("--input", text) for text in input or []]
        outputs = [parse_variable("--output", text) for text in output or []]
        kernel = kernel_image_decl(kernel_image, registry)
        with client() as api:
            node = api.create_node(
                name, checkpoint=checkpoint, inputs=inputs, outputs=outputs, kernel_image=kernel, state=state, **common
            )
    emit(node, as_json, _show)


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
    checkpoint: Annotated[
        str | None, typer.Option(help="New pinned checkpoint (rolls the instances).", rich_help_panel=CELL)
    ] = None,
    input: Annotated[
        list[str] | None,
        typer.Option("--input", help="Input variables, all of them (rolls): " + VARIABLE_HELP, rich_help_panel=CELL),
    ] = None,
    output: Annotated[
        list[str] | None,
        typer.Option("--output", help="Output variables, all of them (rolls): " + VARIABLE_HELP, rich_help_panel=CELL),
    ] = None,
    state: Annotated[
        str | None, typer.Option(help="isolated, persistent or fork (rolls the instances).", rich_help_panel=CELL)
    ] = None,
    kernel_image: KernelImageOption = None,
    no_kernel_image: NoKernelImageOption = False,
    image: NewImageOption = None,
    registry_username: RegistryUserOption = None,
    registry_password_secret: RegistrySecretOption = None,
    no_registry_credentials: NoRegistryOption = False,
    endpoint: EndpointOption = None,
    port: PortOption = None,
    idle_timeout: IdleTimeoutOption = None,
    memory: MemoryOption = None,
    no_memory: NoMemoryOption = False,
    disk: DiskOption = None,
    no_disk: NoDiskOption = False,
    command: CommandOption = None,
    no_command: NoCommandOption = False,
    fixed_ports: FixedPortsSwitch = None,
    telemetry: TelemetryOption = None,
    telemetry_path: TelemetryPathOption = None,
    telemetry_port: TelemetryPortOption = None,
    no_telemetry: NoTelemetryOption = False,
    healthcheck: HealthcheckChangeOption = None,
    healthcheck_port: HealthcheckPortOption = None,
    healthcheck_path: HealthcheckPathOption = None,
    healthcheck_timeout: HealthcheckTimeoutOption = None,
    healthcheck_interval: HealthcheckIntervalOption = None,
    fails_threshold: FailsOption = None,
    passes_threshold: PassesOption = None,
    no_healthcheck: NoHealthcheckOption = False,
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
    """Change a node. A new checkpoint, variables, spec, state, zones, kernel image, or any change of a docker node's
    container (image, port, checks, limits, ...) rolls its instances with no downtime. The container flags change
    only what they name; --kernel-image replaces the whole kernel image, registry credentials included.

    Example: cellnode node update randomizer-node --checkpoint randomizer-v2 --maintenance-limit 1

    Example: cellnode node update model --image 127.0.0.1:5000/team/model:2 --port 9000 --no-healthcheck
    """
    exclusive(
        [
            ("--secret", secret, "--no-secrets", no_secrets),
            ("--kernel-image", kernel_image, "--no-kernel-image", no_kernel_image),
            ("--memory", memory, "--no-memory", no_memory),
            ("--disk", disk, "--no-disk", no_disk),
            ("--command", command, "--no-command", no_command),
            ("--registry-username", registry_username, "--no-registry-credentials", no_registry_credentials),
            (
                "--registry-password-secret",
                registry_password_secret,
                "--no-registry-credentials",
                no_registry_credentials,
            ),
            ("--telemetry", telemetry or telemetry_path or telemetry_port, "--no-telemetry", no_telemetry),
        ]
    )
    check_flags = healthcheck_flags(
        healthcheck_port, healthcheck_path, healthcheck_timeout, healthcheck_interval, fails_threshold, passes_threshold
    )
    if no_healthcheck and (healthcheck or sub_fields(check_flags)):
        raise FlagsError("Give --healthcheck (and its fields) or --no-healthcheck, not both.")
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
    changes = {key: value for key, value in changes.items() if value is not None}
    registry = {"registry_username": registry_username, "registry_password_secret": registry_password_secret}
    if no_kernel_image:
        changes["kernel_image"] = None
    elif kernel_image is not None:
        changes["kernel_image"] = kernel_image_decl(kernel_image, registry)
        registry = {}  # they go with the kernel image
    patch: dict[str, Any] = {
        "image": image,
        **registry,
        "endpoint": endpoint,
        "port": port,
        "idle_timeout": idle_timeout,
        "memory_bytes": size("--memory", memory) if memory is not None else None,
        "disk_bytes": size("--disk", disk) if disk is not None else None,
        "command": parse_command(command) if command is not None else None,
        "fixed_ports": fixed_ports,
    }
    patch = {key: value for key, value in patch.items() if value is not None}
    cleared = {
        "registry_username": no_registry_credentials,
        "registry_password_secret": no_registry_credentials,
        "memory_bytes": no_memory,
        "disk_bytes": no_disk,
        "command": no_command,
        "telemetry": no_telemetry,
        "healthcheck": no_healthcheck,
    }
    patch |= {key: None for key, off in cleared.items() if off}
    with client() as api:
        current: dict[str, Any] = {}
        if (telemetry is None and (telemetry_path or telemetry_port)) or (
            healthcheck is None and sub_fields(check_flags)
        ):
            current = api.get_node(node, folder_id=folder).get("container") or {}
        if not no_telemetry and (telemetry or telemetry_path or telemetry_port):
            decl = telemetry_decl(telemetry, telemetry_path, telemetry_port)
            patch["telemetry"] = decl if telemetry else changed(current, "telemetry", decl or {})
        if healthcheck is not None:
            patch["healthcheck"] = check_fields(healthcheck, check_flags, implied=None)
        elif sub_fields(check_flags):
            if not current.get("healthcheck"):
                raise FlagsError(
                    f"Node {node!r} has no health check to change; give its type too: --healthcheck http|grpc."
                )
            patch["healthcheck"] = changed(current, "healthcheck", sub_fields(check_flags))
        if patch:
            changes["container"] = patch
        found = api.update_node(node, folder_id=folder, wait=wait, **changes)
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
