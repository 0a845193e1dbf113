"""The routing table: what the execute path knows about each node, kept in memory and updated on change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cellnode.exceptions import NotFound, TooManyRequests, Unavailable
from cellnode.router.alias import DEFAULT_PREFIX, AliasRoute


class Routable(Protocol):
    """What the router reads of an instance: a cell node's `Instance`, or a docker node's `ProxyInstance` (HTTP) or
    `GrpcProxyInstance`."""

    timeout: float

    @property
    def instance_id(self) -> str: ...

    @property
    def node_id(self) -> str: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def outstanding(self) -> int: ...

    @property
    def pid(self) -> int | None:
        """The instance's main process, as this machine sees it (for its memory gauge), if it is known."""
        ...

    def close(self) -> None: ...


@dataclass
class NodeRoute:
    """One node as the front routes to it. The supervisor replaces `instances`; the API never touches them.

    `kind` is "cell" (the execute API: `inputs` and `outputs` are its variables) or "docker" (requests pass through to
    the image's own service, which speaks `endpoint`: "http", "http2" or "grpc")."""

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
    instances: list[Routable] = field(default_factory=list)
    kind: str = "cell"
    endpoint: str = ""
    turn: int = field(default=0, repr=False)  # where `choose()` starts looking: ties go to each instance in turn

    def choose(self) -> Routable:
        """The live instance with the fewest outstanding requests; among equals, each in turn.

        Unavailable when there is none; TooManyRequests when every instance is busy and `max_queue` requests
        already wait.
        """
        best: Routable | None = None
        outstanding = alive = 0
        instances = self.instances
        count = len(instances)
        self.turn = start = (self.turn + 1) % count if count > 1 else 0
        for index in range(count):
            instance = instances[(start + index) % count]
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
        if best is None and self.status == "FAILED":
            raise Unavailable(
                f"Node {self.node_id!r} has failed, so no instance runs; retrying will not help. Its owner can see "
                "why with 'cellnode node get', and start it again with an update, or a suspend and resume."
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
    """Node routes by ID and alias routes by routing name. Replacing an entry is one dict assignment: a request holds
    the route it looked up, so a swap never changes a request under way.

    Only the event loop writes to the table (the API's threads go through `anyio.from_thread`), so a write is never
    interleaved with another. `alias_changes` counts alias writes, so that a reload that read the store before a
    write can tell it is stale.
    """

    def __init__(self, default_prefix: str = DEFAULT_PREFIX) -> None:
        self._routes: dict[str, NodeRoute] = {}
        self._aliases: dict[str, AliasRoute] = {}
        self.default_prefix = default_prefix
        self.alias_changes = 0

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
        route = self._aliases.get(name) or self._aliases.get(f"{self.default_prefix}.{name}")
        if route is None:
            raise NotFound(
                f"Alias {name!r} not found. Name it as '<prefix>.<name>' (for example "
                f"'{self.default_prefix}.my-alias'); 'cellnode alias list' shows the aliases you can see."
            )
        return route

    def find_alias(self, name: str) -> AliasRoute | None:
        return self._aliases.get(name)

    def put_alias(self, route: AliasRoute) -> bool:
        """Put an alias's route, unless the table already has a newer version of it, or the same version with a
        rollback not yet written; the new route keeps the old one's statistics. Whether it was put."""
        current = self._aliases.get(route.name)
        if current is not None and current.alias_id == route.alias_id:
            if current.version > route.version or (
                current.version == route.version and current.pending_rollback and not route.pending_rollback
            ):
                return False
            route.stats = current.stats
        self._aliases[route.name] = route
        self.alias_changes += 1
        return True

    def remove_alias(self, name: str) -> AliasRoute | None:
        removed = self._aliases.pop(name, None)
        self.alias_changes += 1
        return removed

    def sync_aliases(self, routes: list[AliasRoute], changes_before: int) -> list[str]:
        """Replace the aliases with those loaded from the store, unless the table changed since the load began
        (`alias_changes` was `changes_before`): the next reload will be fresher. The routing names removed."""
        if self.alias_changes != changes_before:
            return []
        for route in routes:
            self.put_alias(route)
        names = {route.name for route in routes}
        gone = [name for name in self._aliases if name not in names]
        for name in gone:
            self.remove_alias(name)
        return gone

    def aliases(self) -> list[AliasRoute]:
        return list(self._aliases.values())
