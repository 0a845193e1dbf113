"""`cellnode alias ...`

An alias is one routing name (`datasphere.user.NAME`) whose calls are split over nodes by percentage: a canary at
10 %, a switch from 100/0 to 0/100, copies of requests to a mirror, and automatic rollback when a node's error rate
passes a threshold. Shares are given as `--node NODE=PERCENT`, repeatable.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cellnode.cli._common import FolderOption, JsonOption, client, emit, fields, table

app = typer.Typer(help="Aliases: one routing name for several nodes, with a percentage each.", no_args_is_help=True)

SHARE_FIX = (
    "give NODE=PERCENT: a node name or ID, '=' and a whole percent from 0 to 100 (for example {option} {example})"
)
EXAMPLES = {"--node": "churn-v1=90", "--mirror": "churn-v3=10"}
COLUMNS = [
    ("id", "ID"),
    ("routing_name", "ROUTING NAME"),
    ("nodes", "NODES"),
    ("mirrors", "MIRRORS"),
    ("access", "ACCESS"),
    ("rollback", "ROLLBACK"),
]

RefArgument = Annotated[str, typer.Argument(help="Alias ID, routing name (datasphere.user.NAME) or name.")]
NODE_HELP = (
    "NODE=PERCENT, repeatable: a node (name or ID) and its whole percent of the requests. The percents sum to 100; "
    "a node at 0 is named but takes no requests."
)
NodeOption = Annotated[list[str] | None, typer.Option("--node", help=NODE_HELP + " Replaces the list whole.")]
MirrorOption = Annotated[
    list[str] | None,
    typer.Option(
        "--mirror",
        help="NODE=PERCENT, repeatable: a node that gets a copy of PERCENT % of the requests. Its answers are "
        "compared with the primary's and never returned; 'alias get' shows how they compare.",
    ),
]
MetadataOption = Annotated[
    list[str] | None, typer.Option("--metadata", help="KEY=VALUE, repeatable: free labels of the alias.")
]
PublicOption = Annotated[
    bool | None,
    typer.Option(
        "--public/--private",
        help="Public: any authenticated principal may call it (no --acl). Private (default): the folders in --acl.",
    ),
]
AclOption = Annotated[
    list[str] | None,
    typer.Option("--acl", help="Folder ID allowed to call a private alias, repeatable. Default: its own folder."),
]
RateOption = Annotated[
    float | None,
    typer.Option(
        "--rollback-on-error-rate",
        help="Move a node's share to the other nodes once its error rate (5xx) over --rollback-window passes "
        "this fraction (0.05 = 5 %). Needs --rollback-window. Default: no automatic rollback.",
    ),
]
WindowOption = Annotated[
    float | None, typer.Option("--rollback-window", help="Seconds of the error-rate window, at most 86400.")
]
MinRequestsOption = Annotated[
    int | None,
    typer.Option(
        "--rollback-min-requests",
        help="Answers a node must give in the window before it can be taken out. Default: 10.",
    ),
]
DescriptionOption = Annotated[str | None, typer.Option("--description", help="Free text.")]


def parse_share(option: str, text: str) -> tuple[str, int]:
    """`NODE=PERCENT` as a share; a usage error naming the option, the value and the fix otherwise."""
    fix = SHARE_FIX.format(option=option, example=EXAMPLES.get(option, "churn-v1=90"))
    node, sep, percent = text.partition("=")
    if not sep or not node.strip():
        raise typer.BadParameter(f"{text!r} is not NODE=PERCENT; {fix}.", param_hint=option)
    try:
        value = int(percent)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: the percent {percent!r} is not a whole number; {fix}.", param_hint=option
        ) from None
    if not 0 <= value <= 100:
        raise typer.BadParameter(
            f"{text!r}: the percent {value} is {'negative' if value < 0 else 'over 100'}; {fix}.",
            param_hint=option,
        )
    return node.strip(), value


def parse_shares(option: str, texts: list[str] | None) -> list[tuple[str, int]] | None:
    return None if not texts else [parse_share(option, text) for text in texts]


def parse_metadata(texts: list[str] | None) -> dict[str, str] | None:
    """`KEY=VALUE` labels as a dict; a usage error naming the value and the fix otherwise."""
    if not texts:
        return None
    labels: dict[str, str] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise typer.BadParameter(
                f"{text!r} is not KEY=VALUE; give a key, '=' and a value (for example --metadata team=churn).",
                param_hint="--metadata",
            )
        if key in labels:
            raise typer.BadParameter(
                f"key {key!r} is given twice ({key}={labels[key]} and {text}); give each key once.",
                param_hint="--metadata",
            )
        labels[key] = value
    return labels


def _shares_text(shares: list[dict[str, Any]]) -> str:
    return ", ".join(f"{share['node_name'] or share['node_id']}={share['percent']}" for share in shares) or "-"


def _rollback_text(alias: dict[str, Any]) -> str:
    if alias["rollback_error_rate"] is None:
        return "off"
    return (
        f"a node's share moves to the others when its error rate passes {_percent(alias['rollback_error_rate'])} "
        f"over {alias['rollback_window']:g} s, once it has {alias['rollback_min_requests']} answers there"
    )


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _row(alias: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": alias["id"],
        "routing_name": alias["routing_name"],
        "nodes": _shares_text(alias["nodes"]),
        "mirrors": _shares_text(alias["mirrors"]),
        "access": "public" if alias["public"] else ", ".join(alias["acl"]),
        "rollback": "off"
        if alias["rollback_error_rate"] is None
        else f"{_percent(alias['rollback_error_rate'])} over {alias['rollback_window']:g} s",
    }


def _show(alias: dict[str, Any], url: str) -> None:
    summary = alias | {
        "access": "public: any authenticated principal" if alias["public"] else "private",
        "acl": alias["acl"] or None,
        "metadata": ", ".join(f"{key}={value}" for key, value in alias["metadata"].items()) or None,
        "rollback": _rollback_text(alias),
        "description": alias["description"] or None,
    }
    fields(
        summary,
        [
            ("id", "ID"),
            ("routing_name", "Routing name"),
            ("folder_id", "Folder"),
            ("access", "Access"),
            ("acl", "ACL"),
            ("rollback", "Rollback"),
            ("metadata", "Metadata"),
            ("description", "Description"),
            ("version", "Version"),
            ("created_by", "Created by"),
            ("updated_at", "Updated"),
        ],
    )
    yes_no = {True: "yes", False: "no"}
    table(
        [
            share
            | {
                "percent": f"{share['percent']}%",
                "effective": f"{share['effective_percent']:g}%",
                "serving": yes_no[share["serving"]],
            }
            for share in alias["nodes"]
        ],
        [
            ("node_name", "NODE"),
            ("node_id", "ID"),
            ("percent", "PERCENT"),
            ("effective", "EFFECTIVE"),
            ("status", "STATUS"),
            ("serving", "SERVING"),
        ],
        title="Nodes",
    )
    names = {share["node_id"]: share["node_name"] for share in (*alias["nodes"], *alias["mirrors"])}
    if alias["mirrors"]:
        table(
            [
                share | {"percent": f"{share['percent']}% copied", "serving": yes_no[share["serving"]]}
                for share in alias["mirrors"]
            ],
            [
                ("node_name", "MIRROR"),
                ("node_id", "ID"),
                ("percent", "PERCENT"),
                ("status", "STATUS"),
                ("serving", "SERVING"),
            ],
            title="Mirrors",
        )
    if alias.get("mirror_stats"):
        table(
            [stats | {"node_name": names.get(stats["node_id"], "")} for stats in alias["mirror_stats"]],
            [
                ("node_name", "MIRROR"),
                ("requests", "REQUESTS"),
                ("agree", "AGREE"),
                ("differ", "DIFFER"),
                ("error", "ERROR"),
                ("mean_primary_ms", "MEAN MS PRIMARY"),
                ("mean_shadow_ms", "MEAN MS SHADOW"),
            ],
            title="Mirror comparisons (this server)",
        )
    if alias["rollbacks"]:
        table(
            [
                event
                | {
                    "node_name": names.get(event["node_id"], event["node_id"]),
                    "error_rate": _percent(event["error_rate"]),
                    "before": ", ".join(f"{names.get(n) or n}={p}" for n, p in event["before"].items()),
                    "after": ", ".join(f"{names.get(n) or n}={p}" for n, p in event["after"].items()),
                }
                for event in alias["rollbacks"]
            ],
            [
                ("at", "AT"),
                ("node_name", "NODE TAKEN OUT"),
                ("error_rate", "ERROR RATE"),
                ("requests", "ANSWERS"),
                ("window", "WINDOW, S"),
                ("before", "BEFORE"),
                ("after", "AFTER"),
            ],
            title="Automatic rollbacks",
        )
    for warning in alias["warnings"]:
        typer.echo(f"Warning: {warning}")
    _show_call(alias, url)


def _show_call(alias: dict[str, Any], url: str) -> None:
    """The two execute forms, as curl lines; `{...}` stands for the input variables."""
    name, folder = alias["routing_name"], (alias["acl"] or [alias["folder_id"]])[0]
    token = '-H "Authorization: Bearer $(cellnode iam create-token)"'
    typer.echo(
        f"Call:  curl -X POST '{url}/datasphere/v1/aliases/{name}:execute' {token} "
        f'-H \'Content-Type: application/json\' --data-raw \'{{"folder_id": "{folder}", "input": {{...}}}}\''
    )
    typer.echo(f"  or:  curl -H 'x-node-alias: {name}' -H 'x-folder-id: {folder}' {token} --data '{{...}}' {url}/")
    typer.echo("Add -H 'x-cellnode-route-key: KEY' to send every call with the same KEY to the same node.")


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Alias name: lowercase letters, digits, hyphens; unique per prefix.")],
    node: Annotated[list[str], typer.Option("--node", help=NODE_HELP)],
    prefix: Annotated[
        str | None,
        typer.Option(
            help="Routing-name prefix, one of the server's CELLNODE_ALIAS_PREFIXES. Default: datasphere.user."
        ),
    ] = None,
    metadata: MetadataOption = None,
    folder: FolderOption = None,
    public: PublicOption = None,
    acl: AclOption = None,
    mirror: MirrorOption = None,
    rollback_on_error_rate: RateOption = None,
    rollback_window: WindowOption = None,
    rollback_min_requests: MinRequestsOption = None,
    description: DescriptionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an alias: a routing name whose calls go to its nodes by percentage.

    Example: cellnode alias create churn --node churn-v1=90 --node churn-v2=10
    """
    nodes = parse_shares("--node", node) or []
    mirrors = parse_shares("--mirror", mirror)
    labels = parse_metadata(metadata)
    with client() as api:
        alias = api.create_alias(
            name,
            nodes=nodes,
            prefix=prefix,
            mirrors=mirrors,
            metadata=labels,
            folder_id=folder,
            public=public,
            acl=acl,
            description=description,
            rollback_error_rate=rollback_on_error_rate,
            rollback_window=rollback_window,
            rollback_min_requests=rollback_min_requests,
        )
        url = api.url
    emit(alias, as_json, lambda found: _show(found, url))


@app.command()
def update(
    alias: RefArgument,
    node: NodeOption = None,
    mirror: MirrorOption = None,
    no_mirror: Annotated[bool, typer.Option("--no-mirror", help="Remove every mirror.")] = False,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", help="KEY=VALUE, repeatable: all the labels (replaces them).")
    ] = None,
    public: PublicOption = None,
    acl: Annotated[
        list[str] | None,
        typer.Option("--acl", help="Folder IDs allowed to call a private alias, repeatable: all of them."),
    ] = None,
    rollback_on_error_rate: RateOption = None,
    rollback_window: WindowOption = None,
    rollback_min_requests: MinRequestsOption = None,
    no_rollback: Annotated[bool, typer.Option("--no-rollback", help="Turn automatic rollback off.")] = False,
    description: Annotated[str | None, typer.Option("--description", help="New description.")] = None,
    move_to: Annotated[str | None, typer.Option(help="Move the alias to this folder (ID or name).")] = None,
    folder: FolderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change an alias; only the options given change, and --node and --mirror replace the lists whole.

    The new shares are in force when the command returns: calls under way finish on the node they started on.

    Example: cellnode alias update churn --node churn-v1=0 --node churn-v2=100
    """
    if no_mirror and mirror:
        raise typer.BadParameter("give --mirror or --no-mirror, not both", param_hint="--no-mirror")
    if no_rollback and (rollback_on_error_rate is not None or rollback_window is not None):
        raise typer.BadParameter(
            "--no-rollback turns automatic rollback off, and --rollback-on-error-rate/--rollback-window set it; "
            "give one or the other",
            param_hint="--no-rollback",
        )
    nodes = parse_shares("--node", node)
    mirrors = [] if no_mirror else parse_shares("--mirror", mirror)
    labels = parse_metadata(metadata)
    with client() as api:
        found = api.update_alias(
            alias,
            nodes=nodes,
            mirrors=mirrors,
            metadata=labels,
            public=public,
            acl=acl,
            description=description,
            move_to=move_to,
            rollback_error_rate=rollback_on_error_rate,
            rollback_window=rollback_window,
            rollback_min_requests=rollback_min_requests,
            rollback_off=no_rollback,
            folder_id=folder,
        )
        url = api.url
    emit(found, as_json, lambda changed: _show(changed, url))


@app.command("list")
def list_(folder: FolderOption = None, as_json: JsonOption = False) -> None:
    """List the aliases of a folder, with their nodes and percents.

    Example: cellnode alias list
    """
    with client() as api:
        aliases = api.list_aliases(folder_id=folder)
    emit(aliases, as_json, lambda rows: table([_row(row) for row in rows], COLUMNS))


@app.command()
def get(alias: RefArgument, folder: FolderOption = None, as_json: JsonOption = False) -> None:
    """Show an alias: its nodes with their percent, effective percent and status now; its mirrors and how their
    answers compare; its automatic rollbacks; and how to call it.

    Example: cellnode alias get churn
    """
    with client() as api:
        found = api.get_alias(alias, folder_id=folder)
        url = api.url
    emit(found, as_json, lambda shown: _show(shown, url))


@app.command()
def delete(alias: RefArgument, folder: FolderOption = None, as_json: JsonOption = False) -> None:
    """Delete an alias; its nodes stay. Callers of its routing name get 404 from now on.

    Example: cellnode alias delete churn
    """
    with client() as api:
        found = api.delete_alias(alias, folder_id=folder)
    emit(found, as_json, lambda gone: typer.echo(f"Deleted alias {gone['routing_name']} ({gone['id']})."))
