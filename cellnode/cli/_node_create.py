"""`cellnode node create`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cellnode.cli._common import FolderOption, JsonOption, client, emit
from cellnode.cli._container import (
    CELL,
    DOCKER,
    CommandOption,
    DiskOption,
    EndpointOption,
    FailsOption,
    FlagsError,
    HealthcheckIntervalOption,
    HealthcheckOption,
    HealthcheckPathOption,
    HealthcheckPortOption,
    HealthcheckTimeoutOption,
    IdleTimeoutOption,
    ImageOption,
    KernelImageOption,
    MemoryOption,
    PassesOption,
    PortOption,
    RegistrySecretOption,
    RegistryUserOption,
    TelemetryOption,
    TelemetryPathOption,
    TelemetryPortOption,
    check_fields,
    command as parse_command,
    healthcheck_flags,
    kernel_image_decl,
    refuse,
    size,
    telemetry_decl,
)
from cellnode.cli._node_common import VARIABLE_HELP, MaxOption, MinOption, parse_variable, show_node

SecretOption = Annotated[
    list[str] | None,
    typer.Option("--secret", help="Secret of the node's folder (name or ID), given as a variable; repeatable."),
]
ZoneOption = Annotated[
    list[str] | None,
    typer.Option("--zone", help="ZONE[:SUBNET] to spread instances over, repeatable. Default: every zone ('local')."),
]


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
    emit(node, as_json, show_node)
