"""One checked request to one node: the folder, caller and input checks, and the hop to one of its instances.
Used by the execute core (`cellnode/api/calls.py`) and by alias shadows (`cellnode/api/shadows.py`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from cellnode.exceptions import DeadlineExceeded, FailedPrecondition, InvalidArgument, PermissionDenied, Unavailable
from cellnode.iam.access import subject
from cellnode.iam.credentials import Caller
from cellnode.router.instance import Instance, NotStarted
from cellnode.router.table import NodeRoute
from cellnode.runtime.variables import check_input, type_name

if TYPE_CHECKING:
    from cellnode.api.deps import Services

# How many instances a request may try when the ones it was given died before it reached them.
MAX_ATTEMPTS = 3


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
            assert isinstance(instance, Instance), "the execute API routes to cell nodes only"
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


def check_cell(route: NodeRoute) -> None:
    """The execute API runs cells: a docker node serves its image's own API, which the node-proxy form reaches."""
    if route.kind != "cell":
        raise FailedPrecondition(
            f"Node {route.node_id!r} is a docker node: it serves its image's own API, not the execute API. Send the "
            f"request to the path its service answers, with the header x-node-id: {route.node_id} (and x-folder-id)"
            + (" on the server's gRPC port." if route.endpoint == "grpc" else ".")
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
