"""`Client` methods for aliases: one routing name whose calls are split over nodes by percentage."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from cellnode._client.base import BaseClient, folder_params
from cellnode.exceptions import NotFound

ROUTE_KEY_HEADER = "x-cellnode-route-key"
# An alias's nodes (or mirrors) and their whole percents: {"churn-v1": 90, "churn-v2": 10}, or the same as pairs.
Shares = dict[str, int] | list[tuple[str, int]]


class AliasMethods(BaseClient):
    """Aliases: created, listed, read, updated, deleted and executed."""

    def create_alias(
        self,
        name: str,
        *,
        nodes: Shares,
        prefix: str | None = None,
        mirrors: Shares | None = None,
        metadata: dict[str, str] | None = None,
        folder_id: str | None = None,
        public: bool | None = None,
        acl: list[str] | None = None,
        description: str | None = None,
        rollback_error_rate: float | None = None,
        rollback_window: float | None = None,
        rollback_min_requests: int | None = None,
    ) -> dict[str, Any]:
        """Create an alias: one routing name (`<prefix>.<name>`) whose calls are split over nodes by percentage.

        Parameters:
            nodes: node (ID, or name in the alias's folder) to whole percent; the percents sum to 100, and a node at
                0 is named but takes no requests.
            prefix: one of the server's alias prefixes. Default: the first, `datasphere.user`.
            mirrors: node to the percent of requests it gets a copy of; its answers are compared with the
                primary's, never returned. A node with a share above 0 cannot also be a mirror.
            public: any authenticated principal may call a public alias; a private one (default) only from the
                folders in `acl` (default: its own folder). A public alias takes no `acl`.
            rollback_error_rate: with `rollback_window` (seconds), move a node's share to the others once its
                error rate (5xx) over the window passes this, after `rollback_min_requests` answers (default 10).

        Example:
            >>> client.create_alias("churn", nodes={"churn-v1": 90, "churn-v2": 10})["routing_name"]
            'datasphere.user.churn'
        """
        body: dict[str, Any] = {"name": name, "nodes": _shares(nodes)}
        optional = (
            ("prefix", prefix),
            ("mirrors", _shares(mirrors)),
            ("metadata", metadata),
            ("folder_id", folder_id),
            ("public", public),
            ("acl", acl),
            ("description", description),
            ("rollback_error_rate", rollback_error_rate),
            ("rollback_window", rollback_window),
            ("rollback_min_requests", rollback_min_requests),
        )
        body |= {key: value for key, value in optional if value is not None}
        return self._request("POST", "/cellnode/v1/aliases", json=body)

    def list_aliases(self, *, folder_id: str | None = None) -> list[dict[str, Any]]:
        aliases: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/aliases", params=folder_params(folder_id))[
            "aliases"
        ]
        return aliases

    def get_alias(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        """An alias by ID, routing name (`datasphere.user.NAME`) or name in the folder: its nodes with their status
        and effective percent now, its mirrors and their comparison stats, and its automatic rollbacks."""
        return self._request("GET", f"/cellnode/v1/aliases/{quote(ref, safe='')}", params=folder_params(folder_id))

    def update_alias(
        self,
        ref: str,
        *,
        nodes: Shares | None = None,
        mirrors: Shares | None = None,
        metadata: dict[str, str] | None = None,
        public: bool | None = None,
        acl: list[str] | None = None,
        description: str | None = None,
        move_to: str | None = None,
        rollback_error_rate: float | None = None,
        rollback_window: float | None = None,
        rollback_min_requests: int | None = None,
        rollback_off: bool = False,
        folder_id: str | None = None,
    ) -> dict[str, Any]:
        """Change an alias; only the arguments given change. `nodes`, `mirrors`, `metadata` and `acl` replace the
        old values whole (`mirrors={}` removes every mirror). `move_to` moves it to another folder; `rollback_off`
        turns automatic rollback off. `folder_id` is where to find the alias by name.

        The new shares are in force when this returns: requests under way finish on the node they started on.

        Example:
            >>> client.update_alias("churn", nodes={"churn-v1": 0, "churn-v2": 100})["nodes"][1]["percent"]
            100
        """
        optional = (
            ("nodes", _shares(nodes)),
            ("mirrors", _shares(mirrors)),
            ("metadata", metadata),
            ("public", public),
            ("acl", acl),
            ("description", description),
            ("folder_id", move_to),
            ("rollback_error_rate", rollback_error_rate),
            ("rollback_window", rollback_window),
            ("rollback_min_requests", rollback_min_requests),
            ("rollback_off", rollback_off or None),
        )
        changes = {key: value for key, value in optional if value is not None}
        path = f"/cellnode/v1/aliases/{quote(ref, safe='')}"
        return self._request("PATCH", path, json=changes, params=folder_params(folder_id))

    def delete_alias(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        """Delete an alias; its nodes stay. Callers of its routing name get NotFound from now on."""
        return self._request("DELETE", f"/cellnode/v1/aliases/{quote(ref, safe='')}", params=folder_params(folder_id))

    def execute_alias(
        self,
        name: str,
        input: dict[str, Any],
        *,
        folder_id: str | None = None,
        route_key: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Run an alias with these input variables; the output variables of the node it picked.

        `name` is a routing name (`datasphere.user.NAME`), a name or an ID; `folder_id`, a folder in the alias's ACL.
        Without `folder_id` the alias is looked up for its folder; a routing name of an alias you may not read goes
        out without one, as a public alias needs none. Calls with the same `route_key` go to the same node while
        the shares stay. `timeout` defaults to the client's.
        """
        routing_name, folder = name, folder_id
        if "." not in name or folder_id is None:
            try:
                found = self.get_alias(name, folder_id=folder_id)
            except NotFound:
                if "." not in name:
                    raise
            else:
                routing_name, folder = found["routing_name"], folder_id or found["folder_id"]
        body: dict[str, Any] = {"input": input} | ({"folder_id": folder} if folder else {})
        response = self._request(
            "POST",
            f"/datasphere/v1/aliases/{quote(routing_name, safe='')}:execute",
            json=body,
            headers={ROUTE_KEY_HEADER: route_key} if route_key is not None else None,
            timeout=timeout,
        )
        output: dict[str, Any] = response["output"]
        return output


def _shares(shares: Shares | None) -> list[dict[str, Any]] | None:
    """Node-to-percent pairs as the API's share objects."""
    if shares is None:
        return None
    pairs = shares.items() if isinstance(shares, dict) else shares
    return [{"node": node, "percent": percent} for node, percent in pairs]
