"""`cellnode node update`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cellnode.cli._common import FolderOption, JsonOption, client, emit
from cellnode.cli._container import (
    CELL,
    CommandOption,
    DiskOption,
    EndpointOption,
    FailsOption,
    FixedPortsSwitch,
    FlagsError,
    HealthcheckChangeOption,
    HealthcheckIntervalOption,
    HealthcheckPathOption,
    HealthcheckPortOption,
    HealthcheckTimeoutOption,
    IdleTimeoutOption,
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
    size,
    sub_fields,
    telemetry_decl,
)
from cellnode.cli._node_common import VARIABLE_HELP, MaxOption, MinOption, parse_variable, show_node


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
    emit(found, as_json, show_node)
