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
    not in `nodes` (comment lines and other series stay)."""
    kept = []
    for line in text.split(b"\n"):
        if not line.startswith(b"#"):
            alias = _label(line, b'alias_name="')
            if alias is not None:
                if alias not in aliases:
                    continue
            else:
                node = _label(line, b'node_id="')
                if node is not None and node not in nodes:
                    continue
        kept.append(line)
    return b"\n".join(kept)


def _label(line: bytes, key: bytes) -> str | None:
    start = line.find(key)
    if start == -1:
        return None
    start += len(key)
    return line[start : line.find(b'"', start)].decode()
