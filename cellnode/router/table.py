"""The routing table: what the execute path knows about each node, kept in memory and updated on change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cellnode.exceptions import NotFound, TooManyRequests, Unavailable

if TYPE_CHECKING:
    from cellnode.router.instance import Instance


@dataclass
class NodeRoute:
    """One node as the front routes to it. The supervisor replaces `instances`; the API never touches them."""

    node_id: str
    name: str
    folder_id: str
    acl: frozenset[str]
    inputs: dict[str, str]
    outputs: dict[str, str]
    timeout: float
    max_queue: int = 64
    status: str = "CREATED"
    status_message: str = ""
    instances: list[Instance] = field(default_factory=list)

    def choose(self) -> Instance:
        """The live instance with the fewest outstanding requests.

        Unavailable when there is none; TooManyRequests when every instance is busy and `max_queue` requests
        already wait.
        """
        best: Instance | None = None
        outstanding = alive = 0
        for instance in self.instances:
            if instance.is_alive:
                alive += 1
                outstanding += instance.outstanding
                if best is None or instance.outstanding < best.outstanding:
                    best = instance
        if best is not None and outstanding - alive >= self.max_queue:
            raise TooManyRequests(
                f"Node {self.node_id!r} is busy: {outstanding} requests on {alive} instance(s), and its queue holds "
                f"at most {self.max_queue}. Retry after the Retry-After seconds, or give the node more instances."
            )
        if best is None and self.status in ("SUSPENDING", "SUSPENDED"):
            raise Unavailable(
                f"Node {self.node_id!r} is suspended, so no instance runs. Its owner can start it again with "
                f"'cellnode node resume {self.node_id}'."
            )
        if best is None:
            # Not the status message: it can quote the node's log, which is the owner's to read, not the caller's.
            raise Unavailable(
                f"Node {self.node_id!r} has no ready instance (status {self.status}). "
                "Retry shortly; its owner can see why with 'cellnode node get'."
            )
        return best


class RoutingTable:
    """Node routes by ID. Replacing an entry is one dict assignment, atomic for the event loop."""

    def __init__(self) -> None:
        self._routes: dict[str, NodeRoute] = {}

    def get(self, node_id: str) -> NodeRoute:
        route = self._routes.get(node_id)
        if route is None:
            raise NotFound(f"Node {node_id!r} not found. 'cellnode node list' shows the nodes you can see.")
        return route

    def find(self, node_id: str) -> NodeRoute | None:
        return self._routes.get(node_id)

    def put(self, route: NodeRoute) -> None:
        self._routes[route.node_id] = route

    def remove(self, node_id: str) -> NodeRoute | None:
        return self._routes.pop(node_id, None)

    def routes(self) -> list[NodeRoute]:
        return list(self._routes.values())
