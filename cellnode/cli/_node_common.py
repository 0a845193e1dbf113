"""What the `cellnode node` commands share: variable declarations, autoscaler options, and a node shown for people."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cellnode.cli._common import fields, table
from cellnode.cli._container import show_rows
from cellnode.runtime.variables import TYPES

VARIABLE_HELP = f"NAME:TYPE, repeatable; TYPE is one of {', '.join(TYPES)}."
MinOption = Annotated[int | None, typer.Option(help="Fewest instances the autoscaler keeps. Default: 1.")]
MaxOption = Annotated[int | None, typer.Option(help="Most instances the autoscaler starts. Default: the minimum.")]


def parse_variable(option: str, text: str) -> dict[str, str]:
    """`NAME:TYPE` as a declaration; a usage error naming the option and the fix otherwise."""
    name, sep, kind = text.partition(":")
    if not sep or not name or kind not in TYPES:
        raise typer.BadParameter(
            f"{text!r} must be NAME:TYPE with TYPE one of {', '.join(TYPES)} (for example input_data:dict).",
            param_hint=option,
        )
    return {"name": name, "type": kind}


def show_node(node: dict[str, Any]) -> None:
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
