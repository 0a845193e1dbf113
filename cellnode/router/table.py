"""The routing table: what the execute path knows about each node, kept in memory and updated on change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cellnode.exceptions import NotFound, TooManyRequests, Unavailable
from cellnode.router.alias import DEFAULT_PREFIX, AliasRoute

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

    @property
    def is_serving(self) -> bool:
        """Whether a request sent now would find a live instance."""
        return any(instance.is_alive for instance in self.instances)


class RoutingTable:
    """Node routes by ID and alias routes by routing name. Replacing an entry is one dict assignment, atomic for the
    event loop: a request holds the route it looked up, so a swap never changes a request under way."""

    def __init__(self) -> None:
        self._routes: dict[str, NodeRoute] = {}
        self._aliases: dict[str, AliasRoute] = {}

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

    def serving(self, node_id: str) -> bool:
        route = self._routes.get(node_id)
        return route is not None and route.is_serving

    def get_alias(self, name: str) -> AliasRoute:
        """An alias by its routing name (`datasphere.user.NAME`), or by NAME alone for the default prefix."""
        route = self._aliases.get(name) or self._aliases.get(f"{DEFAULT_PREFIX}.{name}")
        if route is None:
            raise NotFound(
                f"Alias {name!r} not found. Name it as '<prefix>.<name>' (for example '{DEFAULT_PREFIX}.my-alias'); "
                "'cellnode alias list' shows the aliases you can see."
            )
        return route

    def find_alias(self, name: str) -> AliasRoute | None:
        return self._aliases.get(name)

    def put_alias(self, route: AliasRoute) -> None:
        """Put an alias's route, unless the table already has a newer version of it (a reload that read the store
        before an update landed must not undo it). The new route keeps the old one's statistics."""
        current = self._aliases.get(route.name)
        if current is not None and current.alias_id == route.alias_id:
            if current.version > route.version:
                return
            route.stats = current.stats
        self._aliases[route.name] = route

    def remove_alias(self, name: str) -> AliasRoute | None:
        return self._aliases.pop(name, None)

    def aliases(self) -> list[AliasRoute]:
        return list(self._aliases.values())
