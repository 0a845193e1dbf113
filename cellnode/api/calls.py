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
from cellnode.api.shadows import mirror, settle_shadows
from cellnode.exceptions import (
    APIError,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from cellnode.iam.access import subject
from cellnode.iam.credentials import Caller
from cellnode.router.alias import AliasRoute, pick, pick_sticky
from cellnode.router.instance import NotStarted
from cellnode.router.table import NodeRoute, RoutingTable
from cellnode.runtime.variables import check_input, type_name

# The header (gRPC: metadata) whose value routes an alias call to the same node every time.
ROUTE_KEY = "x-cellnode-route-key"
# How many instances a request may try when the ones it was given died before it reached them.
MAX_ATTEMPTS = 3
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
        node_id = _choose(svc.table, alias, call.route_key, tried)
        route = svc.table.get(node_id)
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
            _count_outcome(svc, alias, node_id, exc.status_code)
            settle_shadows(svc, alias, node_id, shadows, started, exc, exc.status_code, call.request_id)
            raise
        _count_outcome(svc, alias, node_id, 200)
        settle_shadows(svc, alias, node_id, shadows, started, output, 200, call.request_id)
        return output


async def dispatch(route: NodeRoute, payload: bytes, request_id: str, caller_deadline: float | None = None) -> bytes:
    """Run a checked request on one of the node's instances, within the node's timeout or the caller's deadline,
    whichever comes first (the cell is interrupted then). NotStarted when no instance could take it: nothing ran."""
    deadline = asyncio.get_running_loop().time() + route.timeout
    callers = caller_deadline is not None and caller_deadline < deadline
    if callers:
        assert caller_deadline is not None
        deadline = caller_deadline
    for attempt in range(MAX_ATTEMPTS):
        try:
            try:
                instance = route.choose()
            except NotStarted:
                raise
            except Unavailable as exc:
                raise NotStarted(exc.message) from None
            return await instance.execute(payload, deadline=deadline, request_id=request_id)
        except NotStarted:
            # The instance died before the request reached it: nothing ran, so another instance may take it.
            if attempt == MAX_ATTEMPTS - 1:
                raise
        except DeadlineExceeded as exc:
            if not callers:
                raise
            raise DeadlineExceeded(
                f"The caller's deadline passed before node {route.node_id!r} answered (its own timeout is "
                f"{route.timeout:g} s); {exc.message.partition('; ')[2] or 'the request was stopped.'}"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _any_left(table: RoutingTable, alias: AliasRoute, tried: set[str]) -> bool:
    return any(s.percent > 0 and s.node_id not in tried and table.serving(s.node_id) for s in alias.shares)


def _choose(table: RoutingTable, alias: AliasRoute, key: str | None, tried: set[str]) -> str:
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


def _count_outcome(svc: Services, alias: AliasRoute, node_id: str, code: int) -> None:
    """Feed the alias's rollback watch: 5xx answers count as the node's errors (4xx are the caller's)."""
    rate = alias.stats.outcome(alias.rollback, node_id, code >= 500, time.monotonic())
    if rate is not None:
        svc.supervisor.roll_back(alias, node_id, rate)


async def check_caller(svc: Services, caller: Caller, folder_id: str, what: str) -> None:
    await svc.access.refresh_async()
    if not svc.access.may_call(caller, folder_id):
        raise PermissionDenied(
            f"{subject(caller)} may not call {what} from folder {folder_id!r}: that needs the role "
            "'developer' (or more) on the folder, or a service account that lives in it. An admin of the folder "
            f"can grant it: 'cellnode folder add-access-binding {folder_id} --role developer --subject "
            f"{subject(caller)}'."
        )


def check_folder(acl: frozenset[str], folder_id: Any, what: str) -> None:
    if not folder_id:
        raise InvalidArgument(
            "The request names no folder: send 'folder_id' in the body or the 'x-folder-id' header, "
            f"naming a folder in the ACL of {what}."
        )
    if type(folder_id) is not str:
        raise InvalidArgument(f"'folder_id' must be a string; got {type_name(folder_id)}.")
    if folder_id not in acl:
        raise PermissionDenied(
            f"Folder {folder_id!r} is not in the ACL of {what}, so it may not call it. "
            "Use a folder its owner has added to the ACL."
        )


def check_inputs(route: NodeRoute, inputs: dict[str, Any], doubles: bool = False) -> None:
    """InvalidArgument for an unknown, missing or mistyped input. With `doubles` (the inputs came in a Struct, which
    holds every number as a double), a float variable's whole number is made a float again."""
    declared = route.inputs
    for name, value in inputs.items():
        kind = declared.get(name)
        if kind is None:
            raise InvalidArgument(f"Unknown input variable {name!r}; node {route.node_id!r} takes {_signature(route)}.")
        try:
            check_input(name, kind, value)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if doubles and kind == "float" and type(value) is int:
            inputs[name] = float(value)
    if len(inputs) != len(declared):
        missing = [name for name in declared if name not in inputs]
        raise InvalidArgument(
            f"Input variable {missing[0]!r} is missing; node {route.node_id!r} takes {_signature(route)}."
        )


def _signature(route: NodeRoute) -> str:
    if not route.inputs:
        return "no input variables"
    return ", ".join(f"{name} ({kind})" for name, kind in route.inputs.items())
