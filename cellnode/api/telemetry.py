"""`/metrics`: Prometheus text, behind the same credentials as every other route.

A caller sees the series of the nodes in folders where it holds a role (a server admin, all of them), and the
series that name no node.
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
        visible = {route.node_id for route in svc.table.routes() if route.folder_id in folders}
        body = only_nodes(body, visible)
    return Response(body, media_type=CONTENT_TYPE)


def only_nodes(text: bytes, visible: set[str]) -> bytes:
    """The exposition without the samples of nodes not in `visible` (comment lines and other series stay)."""
    kept = []
    for line in text.split(b"\n"):
        start = line.find(b'node_id="')
        if start != -1 and not line.startswith(b"#"):
            end = line.find(b'"', start + 9)
            if line[start + 9 : end].decode() not in visible:
                continue
        kept.append(line)
    return b"\n".join(kept)
