"""The execute call, whatever carried it: the REST front (`cellnode/api/execute.py`) and the gRPC front
(`cellnode/grpc/`) parse their requests into a `Call` and run it here, so both share one hot path.

A call runs on a node (`run_node`) or on an alias (`run_alias`), which picks one of its serving nodes by weight or
route key, copies the request to the alias's mirrors (`cellnode/api/shadows.py`), and moves to another node when
the one it picked had no instance left to take it. Per call: no database query and no new connection; the output
comes back from the instance as JSON bytes, which the front wraps as it needs.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson

from cellnode.api.deps import Services
from cellnode.api.dispatch import check_caller, check_cell, check_folder, check_inputs, dispatch
from cellnode.api.shadows import mirror, settle_shadows
from cellnode.exceptions import (
    APIError,
    InvalidArgument,
    Unavailable,
)
from cellnode.iam.credentials import Caller
from cellnode.router.alias import AliasRoute, pick, pick_sticky
from cellnode.router.instance import NotStarted
from cellnode.router.table import NodeRoute, RoutingTable

# The header (gRPC: metadata) whose value routes an alias call to the same node every time.
ROUTE_KEY = "x-cellnode-route-key"
# How many of an alias's nodes a request may try when the one it picked had no instance left to take it.
MAX_ALIAS_NODES_TRIED = 3


@dataclass(slots=True)
class Call:
    """One execute request, as its front parsed it. `alias` and `node_id` are filled in as the call runs: the alias's
    routing name, and the node that took the request (for the metrics and the audit log)."""

    caller: Caller
    folder_id: Any  # as sent: checked to be a string in the node's or the alias's ACL
    inputs: dict[str, Any]
    request_id: str
    payload: bytes | None = None  # the inputs as JSON, when the front has them already
    route_key: str | None = None  # an alias call's sticky-routing key
    deadline: float | None = None  # loop time by which the caller stops waiting (a gRPC deadline)
    doubles: bool = False  # numbers came as doubles (a Struct): a float variable gets a float, not a whole int
    alias: str | None = None
    node_id: str | None = None


async def run_node(svc: Services, call: Call, node_id: str) -> bytes:
    """The JSON object of the node's outputs for a checked call."""
    route = svc.table.get(node_id)
    call.node_id = route.node_id
    check_folder(route.acl, call.folder_id, f"node {route.node_id!r}")
    await check_caller(svc, call.caller, call.folder_id, f"node {route.node_id!r}")
    check_cell(route)
    check_inputs(route, call.inputs, call.doubles)
    if call.payload is None:
        call.payload = orjson.dumps(call.inputs)
    return await dispatch(route, call.payload, call.request_id, call.deadline)


async def run_alias(svc: Services, call: Call, name: str) -> bytes:
    """Route a call to one of the alias's serving nodes, by weight (or by its route key), copying it to the alias's
    mirrors; the node it starts on answers it, whatever happens to the alias meanwhile. `call.node_id` names the node
    that answered."""
    alias = svc.table.get_alias(name)
    call.alias = alias.name
    if not alias.public:
        check_folder(alias.acl, call.folder_id, f"alias {alias.name!r}")
        await check_caller(svc, call.caller, call.folder_id, f"alias {alias.name!r}")
    tried: set[str] = set()
    shadows = None
    started = time.perf_counter()
    while True:
        node_id = choose_node(svc.table, alias, call.route_key, tried)
        route = svc.table.get(node_id)
        check_cell(route)
        check_inputs(route, call.inputs, call.doubles)
        if call.payload is None:
            call.payload = orjson.dumps(call.inputs)
        payload = call.payload
        if shadows is None:  # once per request, beside the first node it tries
            shadows = mirror(svc, alias, node_id, call.inputs, payload, call.request_id) if alias.mirrors else []
        call.node_id = node_id
        try:
            output = await dispatch(route, payload, call.request_id, call.deadline)
        except asyncio.CancelledError:
            # The caller left (a gRPC cancel): its mirrors are still compared, but a node is not blamed for it.
            settle_shadows(svc, alias, node_id, shadows, started, None, 499, call.request_id)
            raise
        except NotStarted as exc:
            # No instance of the node could take it, and nothing ran: another node may, while there is one.
            call.node_id = None
            tried.add(node_id)
            if len(tried) >= MAX_ALIAS_NODES_TRIED or not _any_left(svc.table, alias, tried):
                settle_shadows(svc, alias, node_id, shadows, started, exc, exc.status_code, call.request_id)
                raise
            continue
        except APIError as exc:
            count_outcome(svc, alias, node_id, exc.status_code)
            settle_shadows(svc, alias, node_id, shadows, started, exc, exc.status_code, call.request_id)
            raise
        count_outcome(svc, alias, node_id, 200)
        settle_shadows(svc, alias, node_id, shadows, started, output, 200, call.request_id)
        return output


async def named_target(
    svc: Services, caller: Caller, folder_id: str, node_id: str | None, alias_name: str | None
) -> tuple[NodeRoute | None, AliasRoute | None]:
    """The node or the alias a pass-through call names in its headers (metadata), once its folder is in the ACL and
    the caller may call from it (a public alias takes any caller): `(route, None)` or `(None, alias)`."""
    if node_id and alias_name:
        raise InvalidArgument(
            f"The call names both node {node_id!r} (x-node-id) and alias {alias_name!r} (x-node-alias); send one of "
            "the two."
        )
    if alias_name:
        alias = svc.table.get_alias(alias_name)
        if not alias.public:
            check_folder(alias.acl, folder_id, f"alias {alias.name!r}")
            await check_caller(svc, caller, folder_id, f"alias {alias.name!r}")
        return None, alias
    route = svc.table.get(node_id or "")
    check_folder(route.acl, folder_id, f"node {route.node_id!r}")
    await check_caller(svc, caller, folder_id, f"node {route.node_id!r}")
    return route, None


def _any_left(table: RoutingTable, alias: AliasRoute, tried: set[str]) -> bool:
    return any(s.percent > 0 and s.node_id not in tried and table.serving(s.node_id) for s in alias.shares)


def choose_node(table: RoutingTable, alias: AliasRoute, key: str | None, tried: set[str]) -> str:
    """The node for this request: weighted at random, or by rendezvous hash of the route key."""

    def serving(node_id: str) -> bool:
        return node_id not in tried and table.serving(node_id)

    if key is not None:
        node_id = pick_sticky(alias.shares, serving, key.encode())
    else:
        node_id = pick(alias.shares, serving, random.random)
    if node_id is None:
        raise Unavailable(_none_serving(table, alias, tried))
    return node_id


def _none_serving(table: RoutingTable, alias: AliasRoute, tried: set[str]) -> str:
    states = []
    for share in alias.shares:
        route = table.find(share.node_id)
        status = "ABSENT" if route is None else route.status
        if share.node_id in tried:
            status += ", its instances went away during this request"
        elif route is not None and status == "HEALTHY" and not route.is_serving:
            status += ", no live instance"
        named = f"{route.name} ({share.node_id}" if route is not None else f"{share.node_id} ("
        states.append(f"{named}, {share.percent}%: {status})")
    return (
        f"Alias {alias.name!r} has no node that can take the request: {'; '.join(states)}. A node with 0% takes no "
        "requests. Retry shortly; the alias's owner can see more with 'cellnode alias get'."
    )


def count_outcome(svc: Services, alias: AliasRoute, node_id: str, code: int) -> None:
    """Feed the alias's rollback watch: 5xx answers count as the node's errors (4xx are the caller's)."""
    rate = alias.stats.outcome(alias.rollback, node_id, code >= 500, time.monotonic())
    if rate is not None:
        svc.supervisor.aliases.roll_back(alias, node_id, rate)
