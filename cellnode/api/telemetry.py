"""`/metrics`: Prometheus text, behind the same credentials as every other route."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from starlette.responses import Response

from cellnode.api.deps import CallerDep, ServicesDep
from cellnode.telemetry.metrics import CONTENT_TYPE

router = APIRouter(tags=["telemetry"])


@router.get("/metrics", response_class=Response)
async def metrics(svc: ServicesDep, _caller: CallerDep) -> Response:
    """Node and instance metrics in Prometheus text format; scrape with a Bearer token or an API key."""
    body = await asyncio.to_thread(svc.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)
