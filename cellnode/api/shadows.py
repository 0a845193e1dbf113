"""Shadow traffic of an alias: copies of a request sent to its mirror nodes beside the primary (never instead),
compared with the primary's answer once both are in, and recorded in the alias's statistics, the metrics and the
log. The caller never waits for a shadow, and a shadow's failure never reaches the caller."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import orjson

from cellnode.api.dispatch import check_inputs, dispatch
from cellnode.exceptions import APIError, CellExecutionError, InternalError
from cellnode.router.alias import AliasRoute, MirrorRecord, Share
from cellnode.router.table import RoutingTable

if TYPE_CHECKING:
    from cellnode.api.deps import Services

logger = logging.getLogger("cellnode.alias")

ShadowTask = tuple[Share, "asyncio.Task[tuple[int, bytes | APIError, float]]"]
_shadows: set[asyncio.Task[tuple[int, bytes | APIError, float]]] = set()


def mirror(
    svc: Services, alias: AliasRoute, primary: str, inputs: dict[str, Any], payload: bytes, request_id: str
) -> list[ShadowTask]:
    """Start the copies of this request that the alias's mirrors ask for, beside the primary (never instead)."""
    tasks: list[ShadowTask] = []
    for share in alias.mirrors:
        if share.node_id != primary and random.random() * 100 < share.percent:
            task = asyncio.create_task(_shadow(svc.table, share.node_id, inputs, payload, f"{request_id}-shadow"))
            _shadows.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(_shadows.discard)
            tasks.append((share, task))
    return tasks


async def _shadow(
    table: RoutingTable, node_id: str, inputs: dict[str, Any], payload: bytes, request_id: str
) -> tuple[int, bytes | APIError, float]:
    """Run a copy on the shadow node: its status code, output or error, and milliseconds. Never raises."""
    started = time.perf_counter()

    try:
        route = table.get(node_id)
        check_inputs(route, inputs)
        output = await dispatch(route, payload, request_id)
    except APIError as exc:
        return exc.status_code, exc, (time.perf_counter() - started) * 1000
    except Exception as exc:  # a bug; the shadow must never hurt the primary
        logger.exception("Shadow request %s failed unexpectedly.", request_id)
        return 500, InternalError(str(exc)), (time.perf_counter() - started) * 1000
    return 200, output, (time.perf_counter() - started) * 1000


def settle_shadows(
    svc: Services,
    alias: AliasRoute,
    primary: str,
    shadows: list[ShadowTask],
    started: float,
    answer: bytes | APIError | None,
    code: int,
    request_id: str,
) -> None:
    """Once the shadows have answered too, compare, record and count; the caller does not wait for it."""
    if not shadows:
        return
    primary_ms = (time.perf_counter() - started) * 1000
    for share, task in shadows:

        def done(task: asyncio.Task[tuple[int, bytes | APIError, float]], share: Share = share) -> None:
            if task.cancelled():
                return  # the server is stopping
            shadow_code, shadow_answer, shadow_ms = task.result()
            result, detail = compare(answer, code, shadow_answer, shadow_code)
            record = MirrorRecord(
                at=time.time(),
                request_id=request_id,
                primary_node_id=primary,
                shadow_node_id=share.node_id,
                result=result,
                primary_code=code,
                shadow_code=shadow_code,
                primary_ms=round(primary_ms, 3),
                shadow_ms=round(shadow_ms, 3),
                detail=detail,
            )
            alias.stats.add_mirror(record)
            svc.metrics.mirror_results.labels(alias.name, share.node_id, result).inc()
            svc.metrics.mirror_durations.labels(alias.name, primary, "primary").observe(primary_ms)
            svc.metrics.mirror_durations.labels(alias.name, share.node_id, "shadow").observe(shadow_ms)
            logger.info(
                "Alias %s mirrored a request: primary %s answered %d in %.1f ms, shadow %s answered %d in %.1f ms: "
                "%s%s",
                alias.name,
                primary,
                code,
                primary_ms,
                share.node_id,
                shadow_code,
                shadow_ms,
                result,
                f" ({detail})" if detail else "",
            )

        task.add_done_callback(done)


def compare(
    primary: bytes | APIError | None, primary_code: int, shadow: bytes | APIError, shadow_code: int
) -> tuple[str, str]:
    """`agree`, `differ` or `error`, and why: equal bytes agree at once, else the outputs are compared as JSON
    values; two failures agree when they are the same error (for a cell, the same exception class)."""
    if isinstance(primary, bytes) and isinstance(shadow, bytes):
        if primary == shadow or orjson.loads(primary) == orjson.loads(shadow):
            return "agree", ""
        return "differ", "the outputs differ"
    if isinstance(shadow, CellExecutionError) and isinstance(primary, CellExecutionError):
        if primary.error_name == shadow.error_name:
            return "agree", f"both raised {shadow.error_name}"
        return "differ", f"the primary raised {primary.error_name}, the shadow {shadow.error_name}"
    if isinstance(shadow, CellExecutionError) and isinstance(primary, bytes):
        return "differ", f"the shadow raised {shadow.error_name}"
    if isinstance(primary, CellExecutionError) and isinstance(shadow, bytes):
        return "differ", f"the primary raised {primary.error_name}"
    if isinstance(shadow, APIError) and shadow_code != 500:
        return "error", f"the shadow did not answer: {shadow.message}"
    if primary is None or (isinstance(primary, APIError) and primary_code != 500):
        return "error", "the primary did not answer"
    if type(primary) is type(shadow):
        return "agree", f"both failed with {type(shadow).__name__}"
    return "differ", f"the primary failed with {type(primary).__name__}, the shadow with {type(shadow).__name__}"
