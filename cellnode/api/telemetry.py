"""`/metrics`: Prometheus text, behind the same credentials as every other route.

A caller sees the series of the nodes and aliases in folders where it holds a role (a server admin, all of them),
and the series that name neither. An alias's series are the alias's: they name the nodes that answered, but belong
to whoever may read the alias.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from starlette.responses import Response

from cellnode.api.deps import CallerDep, ServicesDep
from cellnode.telemetry.metrics import CONTENT_TYPE

router = APIRouter(tags=["telemetry"])


@router.get("/metrics", response_class=Response)
async def metrics(svc: ServicesDep, caller: CallerDep) -> Response:
    """Node and instance metrics in Prometheus text format, for the nodes in the caller's folders; scrape with a
    Bearer token or an API key."""
    body = await asyncio.to_thread(svc.metrics.render)
    folders = svc.access.folders(caller)
    if folders is not None:
        nodes = {route.node_id for route in svc.table.routes() if route.folder_id in folders}
        aliases = {alias.name for alias in svc.table.aliases() if alias.folder_id in folders}
        body = only_visible(body, nodes, aliases)
    return Response(body, media_type=CONTENT_TYPE)


def only_visible(text: bytes, nodes: set[str], aliases: set[str]) -> bytes:
    """The exposition without the samples of aliases not in `aliases` and, for samples that name no alias, of nodes
    not in `nodes` (comment lines and other series stay). Labels are read as Prometheus writes them, so that a label
    value, or a scraped instance's own label such as `exported_node_id`, cannot pass for ours."""
    kept = []
    for line in text.split(b"\n"):
        if line and not line.startswith(b"#"):
            labels = _labels(line)
            if labels is None:
                continue  # not as prometheus_client writes: shown to nobody but an admin
            alias = labels.get("alias_name")
            if alias is not None:
                if alias not in aliases:
                    continue
            else:
                node = labels.get("node_id")
                if node is not None and node not in nodes:
                    continue
        kept.append(line)
    return b"\n".join(kept)


def _labels(line: bytes) -> dict[str, str] | None:
    """The labels of a sample line, `name{a="x",b="y\\"z"} 1`, with their values as written (escapes kept); None
    for a line that is not well formed."""
    labels: dict[str, str] = {}
    start = line.find(b"{")
    if start == -1:
        return labels
    position, end = start + 1, len(line)
    while position < end and line[position : position + 1] != b"}":
        equals = line.find(b'="', position)
        if equals == -1:
            return None
        name = line[position:equals].decode()
        value_start = position = equals + 2
        while position < end and line[position : position + 1] != b'"':
            position += 2 if line[position : position + 1] == b"\\" else 1
        if position >= end:
            return None
        labels[name] = line[value_start:position].decode()
        position += 1
        if line[position : position + 1] == b",":
            position += 1
    return labels
