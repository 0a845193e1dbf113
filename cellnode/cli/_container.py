"""The container flags of `cellnode node create` and `update` (docker nodes, and a cell node's kernel image): their
options, the API objects they make, and how `node get` shows them."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import typer

from cellnode._sizes import SIZE_HELP, format_size, parse_size
from cellnode.exceptions import InvalidArgument

DOCKER = "Docker node"
HEALTH = "Docker node: health check"
TELEMETRY = "Docker node: telemetry"
CELL = "Cell node"

ImageOption = Annotated[
    str | None,
    typer.Option(
        "--image",
        help="The image a docker node runs: [REGISTRY[:PORT]/]PATH[:TAG]. Makes a docker node, with --port.",
        rich_help_panel=DOCKER,
    ),
]
RegistryUserOption = Annotated[
    str | None,
    typer.Option(
        "--registry-username",
        help="Registry user for --image or --kernel-image. Default: json_key. Needs --registry-password-secret.",
        rich_help_panel=DOCKER,
    ),
]
RegistrySecretOption = Annotated[
    str | None,
    typer.Option(
        "--registry-password-secret",
        help="Secret of the node's folder (name or ID) holding the registry password; shown by name, never read back.",
        rich_help_panel=DOCKER,
    ),
]
EndpointOption = Annotated[
    Literal["http", "http2", "grpc"] | None,
    typer.Option(
        "--endpoint",
        help="What the service speaks: http (HTTP/1.1), http2 (h2c) or grpc. Default: http.",
        rich_help_panel=DOCKER,
    ),
]
PortOption = Annotated[
    int | None,
    typer.Option(
        "--port",
        help="The port the service listens on; each instance also gets its own as $PORT.",
        rich_help_panel=DOCKER,
    ),
]
IdleTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--idle-timeout",
        help="Seconds an idle connection to an instance is kept open. Default: 300.",
        rich_help_panel=DOCKER,
    ),
]
MemoryOption = Annotated[
    str | None,
    typer.Option(
        "--memory",
        help="Memory limit of each container, swap included. " + SIZE_HELP + " Default and most: the spec's RAM.",
        rich_help_panel=DOCKER,
    ),
]
DiskOption = Annotated[
    str | None,
    typer.Option(
        "--disk",
        help="Writable layer size of each container (needs an engine that can limit it). " + SIZE_HELP,
        rich_help_panel=DOCKER,
    ),
]
CommandOption = Annotated[
    str | None,
    typer.Option(
        "--command",
        help='Command to run instead of the image\'s own, split as a shell would: "python3 app.py --workers 2".',
        rich_help_panel=DOCKER,
    ),
]
TelemetryOption = Annotated[
    Literal["prometheus"] | None,
    typer.Option(
        "--telemetry",
        help="The service serves Prometheus metrics; cellnode adds them to its /metrics.",
        rich_help_panel=TELEMETRY,
    ),
]
TelemetryPathOption = Annotated[
    str | None,
    typer.Option(
        "--telemetry-path",
        help="Path of the metrics page. Default: /metrics. Implies --telemetry prometheus.",
        rich_help_panel=TELEMETRY,
    ),
]
TelemetryPortOption = Annotated[
    int | None,
    typer.Option(
        "--telemetry-port",
        help="Port of the metrics page. Default: --port. Implies --telemetry prometheus.",
        rich_help_panel=TELEMETRY,
    ),
]
HealthcheckOption = Annotated[
    Literal["http", "grpc"] | None,
    typer.Option(
        "--healthcheck",
        help="Check each instance: http (a 2xx answer passes) or grpc (grpc.health.v1). An instance is in rotation "
        "only while it passes. Default: no check (in rotation once its port accepts connections).",
        rich_help_panel=HEALTH,
    ),
]
HealthcheckPortOption = Annotated[
    int | None,
    typer.Option("--healthcheck-port", help="Port probed. Default: --port.", rich_help_panel=HEALTH),
]
HealthcheckPathOption = Annotated[
    str | None,
    typer.Option(
        "--healthcheck-path",
        help="http: the path probed (default /); grpc: the service checked (default '', the server).",
        rich_help_panel=HEALTH,
    ),
]
HealthcheckTimeoutOption = Annotated[
    float | None,
    typer.Option("--healthcheck-timeout", help="Seconds a probe may take. Default: 1.", rich_help_panel=HEALTH),
]
HealthcheckIntervalOption = Annotated[
    float | None,
    typer.Option("--healthcheck-interval", help="Seconds between probes. Default: 15.", rich_help_panel=HEALTH),
]
FailsOption = Annotated[
    int | None,
    typer.Option(
        "--fails-threshold",
        help="Failed probes in a row that take an instance out. Default: 3.",
        rich_help_panel=HEALTH,
    ),
]
PassesOption = Annotated[
    int | None,
    typer.Option(
        "--passes-threshold",
        help="Passed probes in a row that put it in rotation. Default: 3.",
        rich_help_panel=HEALTH,
    ),
]
KernelImageOption = Annotated[
    str | None,
    typer.Option(
        "--kernel-image",
        help="Run the cell node's instances in this image (Python >= 3.10 and the cell's packages) instead of the "
        "server's Python. With --registry-username/--registry-password-secret if the registry needs them.",
        rich_help_panel=CELL,
    ),
]

# `node update` only
NoKernelImageOption = Annotated[
    bool,
    typer.Option(
        "--no-kernel-image", help="Run the cell node in the server's Python again (rolls).", rich_help_panel=CELL
    ),
]
NewImageOption = Annotated[
    str | None, typer.Option("--image", help="The image a docker node runs.", rich_help_panel=DOCKER)
]
NoRegistryOption = Annotated[
    bool,
    typer.Option(
        "--no-registry-credentials",
        help="Pull the docker node's image without credentials.",
        rich_help_panel=DOCKER,
    ),
]
NoMemoryOption = Annotated[
    bool, typer.Option("--no-memory", help="No memory limit but the spec's RAM.", rich_help_panel=DOCKER)
]
NoDiskOption = Annotated[
    bool, typer.Option("--no-disk", help="No writable layer limit but the engine's.", rich_help_panel=DOCKER)
]
NoCommandOption = Annotated[
    bool, typer.Option("--no-command", help="Run the image's own command again.", rich_help_panel=DOCKER)
]
FixedPortsSwitch = Annotated[
    bool | None,
    typer.Option(
        "--fixed-ports/--no-fixed-ports",
        help="The image listens on --port whatever $PORT says (one instance per machine), or on $PORT.",
        rich_help_panel=DOCKER,
    ),
]
NoTelemetryOption = Annotated[
    bool, typer.Option("--no-telemetry", help="Stop scraping the node's metrics.", rich_help_panel=TELEMETRY)
]
HealthcheckChangeOption = Annotated[
    Literal["http", "grpc"] | None,
    typer.Option(
        "--healthcheck",
        help="A new health check of this type, its other fields from the flags given or their defaults. The "
        "--healthcheck-* flags alone change those fields of the node's current check.",
        rich_help_panel=HEALTH,
    ),
]
NoHealthcheckOption = Annotated[
    bool,
    typer.Option(
        "--no-healthcheck",
        help="No health check: in rotation once the port accepts connections.",
        rich_help_panel=HEALTH,
    ),
]


class FlagsError(typer.BadParameter):
    """Flags that do not go together, or one missing: a usage error (exit code 2) that says which and what to do.

    (Typer vendors click and names no UsageError; a BadParameter is one.)"""

    def format_message(self) -> str:
        return self.message


def size(option: str, text: str) -> int:
    """A size flag in bytes; a usage error naming the option, the value and an example otherwise."""
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise typer.BadParameter(exc.message, param_hint=option) from None


def command(text: str) -> list[str]:
    """`--command` split as a shell would."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} cannot be split as a shell would: {exc}.", param_hint="--command") from None
    if not words:
        raise typer.BadParameter("is empty; give the program and its arguments.", param_hint="--command")
    return words


Flags = Sequence[tuple[str, str, Any]]  # (option, API field, value) of a health check's or telemetry's sub-flags


def sub_fields(flags: Flags) -> dict[str, Any]:
    """The API fields of the sub-flags given."""
    return {key: value for _option, key, value in flags if value is not None}


def check_fields(kind: str | None, flags: Flags, *, implied: str | None) -> dict[str, Any] | None:
    """A health check's or telemetry's object from its type flag and its sub-flags. Sub-flags alone imply `implied`
    (telemetry: prometheus), or are a usage error (a health check has two types)."""
    fields = sub_fields(flags)
    if kind is None and fields:
        if implied is None:
            names = ", ".join(option for option, _key, value in flags if value is not None)
            raise FlagsError(f"{names} set a health check's fields; give its type too: --healthcheck http|grpc.")
        kind = implied
    return {"type": kind, **fields} if kind is not None else None


def exclusive(pairs: Sequence[tuple[str, object, str, bool]]) -> None:
    """Refuse `--x VALUE` given with `--no-x`."""
    for flag, value, off, is_off in pairs:
        if is_off and value is not None and value is not False:
            raise FlagsError(f"Give {flag} or {off}, not both: {off} clears what {flag} sets.")


def kernel_image_decl(image: str | None, registry: dict[str, Any]) -> dict[str, Any] | None:
    """The API's kernel image object: the image, and the registry credentials given."""
    if image is None:
        return None
    return {"image": image} | {key: value for key, value in registry.items() if value is not None}


def refuse(flags: dict[str, Any], whose: str, why: str) -> None:
    """Refuse the flags of the other kind of node, by name."""
    names = [flag for flag, value in flags.items() if value]
    if len(names) == 1:
        raise FlagsError(f"{names[0]} is a setting of {whose}; {why}, so drop it.")
    if names:
        raise FlagsError(f"{', '.join(names)} are settings of {whose}; {why}, so drop them.")


def telemetry_decl(kind: str | None, path: str | None, port: int | None) -> dict[str, Any] | None:
    """The telemetry object of the flags; a path or port alone means prometheus."""
    flags = (("--telemetry-path", "path", path), ("--telemetry-port", "port", port))
    return check_fields(kind, flags, implied="prometheus")


def healthcheck_flags(
    port: int | None,
    path: str | None,
    timeout: float | None,
    interval: float | None,
    fails: int | None,
    passes: int | None,
) -> list[tuple[str, str, Any]]:
    return [
        ("--healthcheck-port", "port", port),
        ("--healthcheck-path", "path", path),
        ("--healthcheck-timeout", "timeout", timeout),
        ("--healthcheck-interval", "interval", interval),
        ("--fails-threshold", "fails_threshold", fails),
        ("--passes-threshold", "passes_threshold", passes),
    ]


def changed(container: dict[str, Any], key: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The node's current health check or telemetry with these fields changed; a port that followed the service's
    keeps following it."""
    current = container.get(key)
    if not current:
        return fields
    merged = {**current, **fields}
    if "port" not in fields and current.get("port") == container.get("port"):
        merged["port"] = None
    return merged


def show_rows(node: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The container settings of a node as (record, rows) for `fields()`: a docker node's container, a cell node's
    kernel image; never a password, only the name of the secret that holds it."""
    container = node.get("container")
    if node.get("type") != "docker" or not container:
        kernel = node.get("kernel_image")
        image = f"{kernel['image']}{_registry(kernel)}" if kernel else "- (the server's Python)"
        return {"kernel_image": image}, [("kernel_image", "Kernel image")]
    record = {
        "image": container["image"],
        "registry": _registry(container).strip(" ()") or "-",
        "endpoint": f"{container['endpoint']} on port {container['port']}"
        + (", fixed ports (one instance per machine)" if container.get("fixed_ports") else ""),
        "command": shlex.join(container["command"]) if container.get("command") else "- (the image's)",
        "memory": format_size(container["memory_bytes"]) if container.get("memory_bytes") else "- (the spec's RAM)",
        "disk": format_size(container["disk_bytes"]) if container.get("disk_bytes") else "- (the engine's default)",
        "idle_timeout": container.get("idle_timeout"),
        "healthcheck": _healthcheck(container.get("healthcheck")),
        "telemetry": _telemetry(container.get("telemetry")),
    }
    rows = [
        ("image", "Image"),
        ("registry", "Registry"),
        ("endpoint", "Endpoint"),
        ("command", "Command"),
        ("memory", "Memory"),
        ("disk", "Disk"),
        ("idle_timeout", "Idle timeout, s"),
        ("healthcheck", "Health check"),
        ("telemetry", "Telemetry"),
    ]
    return record, rows


def _registry(image: dict[str, Any]) -> str:
    if not image.get("registry_password_secret"):
        return ""
    return f" (user {image['registry_username']}, password in secret {image['registry_password_secret']})"


def _healthcheck(check: dict[str, Any] | None) -> str:
    if not check:
        return "- (in rotation once its port accepts connections)"
    target = f"GET {check['path']}" if check["type"] == "http" else f"service {check['path']!r}"
    fails, passes = check["fails_threshold"], check["passes_threshold"]
    return (
        f"{check['type']} {target} on port {check['port']}, every {check['interval']:g} s, timeout "
        f"{check['timeout']:g} s; out after {fails} failure{'s' * (fails != 1)}, in after {passes} "
        f"pass{'es' * (passes != 1)}"
    )


def _telemetry(telemetry: dict[str, Any] | None) -> str:
    if not telemetry:
        return "-"
    return f"{telemetry['type']} {telemetry['path']} on port {telemetry['port']}"


def list_row(node: dict[str, Any]) -> dict[str, Any]:
    """A node as a row of `node list`: a docker node's image and endpoint where a cell node has its variables."""
    container = node.get("container")
    if node.get("type") == "docker" and container:
        return {**node, "inputs": container["image"], "outputs": f"{container['endpoint']}:{container['port']}"}
    return node
