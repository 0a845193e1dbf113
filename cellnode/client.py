"""The SDK: `cellnode.Client` over the public HTTP API. The CLI uses nothing else.

Example:
    >>> from cellnode import Client
    >>> client = Client()  # URL and key from CELLNODE_URL / CELLNODE_TOKEN, or the profile `serve` wrote
    >>> node = client.get_node("randomizer-node")
    >>> client.execute(node["id"], {"input_data": {"left_bound": 1, "right_bound": 10}})
    {'output_data': {'generated_value': 6}}
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from cellnode._sizes import parse_size
from cellnode.config import DEFAULT_PORT, default_profile_path
from cellnode.exceptions import (
    ERROR_DOMAIN,
    ERROR_INFO_TYPE,
    APIError,
    ConfigError,
    InternalError,
    InvalidArgument,
    NotFound,
    TransportError,
)
from cellnode.iam.formats import authorization

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
ROUTE_KEY_HEADER = "x-cellnode-route-key"
OWN_PREFIXES = ("/cellnode/v1/", "/datasphere/v1/")  # cellnode's own API: never passed through to a node
SIZE_FIELDS = ("memory_bytes", "disk_bytes")
Variables = dict[str, str] | list[tuple[str, str]] | list[dict[str, str]]
# An alias's nodes (or mirrors) and their whole percents: {"churn-v1": 90, "churn-v2": 10}, or the same as pairs.
Shares = dict[str, int] | list[tuple[str, int]]


def resolve_connection(url: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """URL and credential: arguments, then CELLNODE_URL / CELLNODE_TOKEN, then the profile `serve` wrote."""
    url = url or os.environ.get("CELLNODE_URL")
    token = token or os.environ.get("CELLNODE_TOKEN")
    if url is None or token is None:
        profile_path = default_profile_path()
        if profile_path.exists():
            try:
                profile = json.loads(profile_path.read_text())
                url = url or profile.get("url")
                # The profile's key goes only to the profile's server, never to a URL given elsewhere.
                if token is None and profile.get("key_file") and url == profile.get("url"):
                    token = Path(profile["key_file"]).read_text().strip()
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"Cannot read the profile {str(profile_path)!r}: {exc}. "
                    "Fix or delete it, or pass --url and --token."
                ) from exc
    return (url or DEFAULT_URL).rstrip("/"), token


class Client:
    """A synchronous client of a cellnode server.

    Parameters:
        url: the server, e.g. `http://127.0.0.1:8080`. Default: CELLNODE_URL, then the profile.
        token: an API key or an IAM token. Default: CELLNODE_TOKEN, then the key file named in the profile.
        timeout: seconds to wait for an answer; checkpoint capture passes its own, longer one.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0) -> None:
        self.url, self._token = resolve_connection(url, token)
        headers = {"Authorization": authorization(self._token)} if self._token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        # `request()`'s pass-through headers by (node, folder_id, alias): one lookup per node and client.
        self._targets: dict[tuple[str, str | None, bool], dict[str, str]] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- folders and IAM
    def list_folders(self) -> list[dict[str, Any]]:
        folders: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/folders")["folders"]
        return folders

    def create_token(self) -> dict[str, Any]:
        """A new IAM token (`{"iam_token": ..., "expires_at": ...}`), valid 12 hours."""
        return self._request("POST", "/cellnode/v1/iam/tokens")

    def create_folder(self, name: str, *, description: str = "") -> dict[str, Any]:
        """A new folder (server admins only)."""
        return self._request("POST", "/cellnode/v1/folders", json={"name": name, "description": description})

    def get_folder(self, ref: str) -> dict[str, Any]:
        return self._request("GET", f"/cellnode/v1/folders/{quote(ref, safe='')}")

    def update_folder(self, ref: str, *, name: str | None = None, description: str | None = None) -> dict[str, Any]:
        changes = {key: value for key, value in (("name", name), ("description", description)) if value is not None}
        return self._request("PATCH", f"/cellnode/v1/folders/{quote(ref, safe='')}", json=changes)

    def delete_folder(self, ref: str) -> dict[str, Any]:
        """Delete an empty folder (server admins only)."""
        return self._request("DELETE", f"/cellnode/v1/folders/{quote(ref, safe='')}")

    def list_access_bindings(self, folder: str) -> list[dict[str, Any]]:
        path = f"/cellnode/v1/folders/{quote(folder, safe='')}/access-bindings"
        bindings: list[dict[str, Any]] = self._request("GET", path)["bindings"]
        return bindings

    def add_access_binding(self, folder: str, *, role: str, subject: str) -> dict[str, Any]:
        """Grant `role` (viewer, developer, admin) on the folder to `subject` (serviceAccount:ID or user:ID)."""
        path = f"/cellnode/v1/folders/{quote(folder, safe='')}/access-bindings"
        return self._request("POST", path, json={"role": role, "subject": subject})

    def remove_access_binding(self, folder: str, *, role: str, subject: str) -> dict[str, Any]:
        path = f"/cellnode/v1/folders/{quote(folder, safe='')}/access-bindings"
        return self._request("DELETE", path, params={"role": role, "subject": subject})

    def whoami(self) -> dict[str, Any]:
        """The caller: its ID, kind, subject and roles by folder."""
        return self._request("GET", "/cellnode/v1/iam/whoami")

    def create_user(self, name: str, *, description: str = "", server_admin: bool = False) -> dict[str, Any]:
        body = {"name": name, "description": description, "server_admin": server_admin}
        return self._request("POST", "/cellnode/v1/iam/users", json=body)

    def list_users(self) -> list[dict[str, Any]]:
        users: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/iam/users")["principals"]
        return users

    def delete_user(self, user_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/cellnode/v1/iam/users/{quote(user_id, safe='')}")

    def create_service_account(
        self, name: str, *, folder_id: str | None = None, description: str = ""
    ) -> dict[str, Any]:
        body = {"name": name, "folder_id": folder_id, "description": description}
        return self._request("POST", "/cellnode/v1/iam/service-accounts", json=body)

    def list_service_accounts(self, *, folder_id: str | None = None) -> list[dict[str, Any]]:
        answer = self._request("GET", "/cellnode/v1/iam/service-accounts", params=_folder(folder_id))
        accounts: list[dict[str, Any]] = answer["principals"]
        return accounts

    def delete_service_account(self, account_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/cellnode/v1/iam/service-accounts/{quote(account_id, safe='')}")

    def create_api_key(self, *, principal_id: str | None = None, description: str = "") -> dict[str, Any]:
        """A new API key (for the caller, or a principal it manages); `secret` is in this answer only."""
        body = {"principal_id": principal_id, "description": description}
        return self._request("POST", "/cellnode/v1/iam/api-keys", json=body)

    def list_api_keys(self, *, principal_id: str | None = None) -> list[dict[str, Any]]:
        params = {"principal_id": principal_id} if principal_id else None
        keys: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/iam/api-keys", params=params)["api_keys"]
        return keys

    def revoke_api_key(self, key_id: str) -> dict[str, Any]:
        """Revoke a key and the IAM tokens made from it."""
        return self._request("DELETE", f"/cellnode/v1/iam/api-keys/{quote(key_id, safe='')}")

    def list_specs(self) -> dict[str, Any]:
        """The instance specs the server offers (`specs`), its CPUs and GPUs, and its overcommit `policy`."""
        return self._request("GET", "/cellnode/v1/specs")

    def usage(
        self, *, folder_id: str | None = None, node_id: str | None = None, since: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Instance uptime and units per node (and spec) of a folder, since a time."""
        params = {key: value for key, value in (("folder_id", folder_id), ("node_id", node_id)) if value}
        if since is not None:
            params["since"] = since.isoformat()
        result: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/usage", params=params)["usage"]
        return result

    def audit(
        self, folder_id: str | None = None, *, since: datetime | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Audit events, newest first (`at`, `subject`, `action`, `resource`, `result`, `code`, `client`, ...): of a
        folder you are an admin of, or of every such folder (a server admin: all). `limit` is at most 10000."""
        params = {"limit": str(limit)} | ({"folder_id": folder_id} if folder_id else {})
        if since is not None:
            params["since"] = since.isoformat()
        events: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/audit", params=params)["events"]
        return events

    # -- secrets
    def create_secret(
        self, name: str, value: str, *, description: str = "", folder_id: str | None = None
    ) -> dict[str, Any]:
        """A new secret in a folder (admin there). The answer, as every later one, shows the value as `***`."""
        body = {"name": name, "value": value, "description": description, "folder_id": folder_id}
        return self._request("POST", "/cellnode/v1/secrets", json=body)

    def list_secrets(self, *, folder_id: str | None = None) -> list[dict[str, Any]]:
        """The secrets of a folder, without their values."""
        result: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/secrets", params=_folder(folder_id))[
            "secrets"
        ]
        return result

    def get_secret(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        """A secret's metadata (ID or name); never its value."""
        return self._request("GET", f"/cellnode/v1/secrets/{quote(ref, safe='')}", params=_folder(folder_id))

    def update_secret(
        self, ref: str, *, value: str | None = None, description: str | None = None, folder_id: str | None = None
    ) -> dict[str, Any]:
        """A new value (bumps `version`; nodes get it in instances started from now on, as at their next roll:
        `update_node(ref, roll=True)`), a new description, or both."""
        changes = {key: val for key, val in (("value", value), ("description", description)) if val is not None}
        path = f"/cellnode/v1/secrets/{quote(ref, safe='')}"
        return self._request("PATCH", path, json=changes, params=_folder(folder_id))

    def delete_secret(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        """Delete a secret; FailedPrecondition naming the nodes that still use it."""
        return self._request("DELETE", f"/cellnode/v1/secrets/{quote(ref, safe='')}", params=_folder(folder_id))

    # -- checkpoints
    def create_checkpoint(
        self,
        notebook: str | Path,
        *,
        cell: int | None = None,
        name: str | None = None,
        folder_id: str | None = None,
        timeout: float = 900.0,
    ) -> dict[str, Any]:
        """Run the notebook's code cells 1..`cell` in a fresh kernel on the server and save its state."""
        path = Path(notebook)
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read the notebook {str(path)!r}: {exc}.") from exc
        body = {"notebook": content, "notebook_name": path.name, "cell": cell, "name": name, "folder_id": folder_id}
        return self._request("POST", "/cellnode/v1/checkpoints", json=body, timeout=timeout)

    def list_checkpoints(self, *, folder_id: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/checkpoints", params=_folder(folder_id))[
            "checkpoints"
        ]
        return result

    def get_checkpoint(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        return self._request("GET", f"/cellnode/v1/checkpoints/{quote(ref, safe='')}", params=_folder(folder_id))

    def pin_checkpoint(self, ref: str, name: str, *, folder_id: str | None = None) -> dict[str, Any]:
        return self._request(
            "POST",
            f"/cellnode/v1/checkpoints/{quote(ref, safe='')}:pin",
            json={"name": name},
            params=_folder(folder_id),
        )

    def unpin_checkpoint(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        return self._request("POST", f"/cellnode/v1/checkpoints/{quote(ref, safe='')}:unpin", params=_folder(folder_id))

    def delete_checkpoint(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        return self._request("DELETE", f"/cellnode/v1/checkpoints/{quote(ref, safe='')}", params=_folder(folder_id))

    # -- nodes
    def create_node(
        self,
        name: str,
        *,
        checkpoint: str | None = None,
        inputs: Variables | None = None,
        outputs: Variables | None = None,
        container: dict[str, Any] | None = None,
        kernel_image: str | dict[str, Any] | None = None,
        description: str = "",
        folder_id: str | None = None,
        acl: list[str] | None = None,
        timeout: float | None = None,
        instances: int | None = None,
        min_instances: int | None = None,
        max_instances: int | None = None,
        max_queue: int | None = None,
        spec: str | None = None,
        zones: list[str] | None = None,
        maintenance_limit: int | None = None,
        state: str | None = None,
        secrets: list[str] | None = None,
        wait: bool = True,
        wait_timeout: float = 180.0,
    ) -> dict[str, Any]:
        """Create a node; with `wait`, return once it is HEALTHY (or raise InternalError with the reason if it FAILED).

        A cell node takes `checkpoint` (a pinned checkpoint's name or ID) and `outputs` (and `inputs`), and may take
        a `kernel_image` to run in: an image reference, or `{"image", "registry_username",
        "registry_password_secret"}`. A docker node takes `container`, the API's container object (see
        `create_docker_node`, which builds it); its `memory_bytes` and `disk_bytes` may be size strings ("2G").

        `instances` fixes the number of instances; `min_instances`/`max_instances` let the autoscaler move it.
        `zones` are `ZONE` or `ZONE:SUBNET` strings; instances are spread over them in turn. `secrets` names secrets
        of the node's folder; its instances get each as an environment variable of the secret's name. `timeout` is
        the seconds a request may run: 60 by default for a cell node, 15 for a docker node.

        Example:
            >>> client.create_node("randomizer-node", checkpoint="randomizer-checkpoint",
            ...                    inputs={"input_data": "dict"}, outputs={"output_data": "dict"})["status"]
            'HEALTHY'
        """
        body: dict[str, Any] = {"name": name, "description": description, "folder_id": folder_id, "acl": acl}
        optional = (
            ("checkpoint", checkpoint),
            ("inputs", _variables(inputs) if inputs is not None else None),
            ("outputs", _variables(outputs) if outputs is not None else None),
            ("container", _container_sizes(container)),
            ("kernel_image", _kernel_image(kernel_image)),
            ("timeout", timeout),
            ("instance_count", instances),
            ("min_instances", min_instances),
            ("max_instances", max_instances),
            ("max_queue", max_queue),
            ("spec", spec),
            ("zones", _zones(zones)),
            ("maintenance_limit", maintenance_limit),
            ("state", state),
            ("secrets", secrets),
        )
        for key, value in optional:
            if value is not None:
                body[key] = value
        node = self._request("POST", "/cellnode/v1/nodes", json=body)
        return self.wait_node(node["id"], timeout=wait_timeout) if wait else node

    def create_docker_node(
        self,
        name: str,
        *,
        image: str,
        port: int,
        endpoint: str = "http",
        registry_username: str | None = None,
        registry_password_secret: str | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        memory: int | str | None = None,
        disk: int | str | None = None,
        command: list[str] | str | None = None,
        fixed_ports: bool = False,
        telemetry: dict[str, Any] | bool | None = None,
        healthcheck: dict[str, Any] | None = None,
        description: str = "",
        folder_id: str | None = None,
        acl: list[str] | None = None,
        instances: int | None = None,
        min_instances: int | None = None,
        max_instances: int | None = None,
        max_queue: int | None = None,
        spec: str | None = None,
        zones: list[str] | None = None,
        maintenance_limit: int | None = None,
        secrets: list[str] | None = None,
        wait: bool = True,
        wait_timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Create a docker node: its instances run `image`, and requests with its `x-node-id` header pass through to
        the service (`request()`). With `wait`, return once it is HEALTHY (the image pulled, the service up).

        Parameters:
            image: `[REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST]`.
            port: the port the service listens on; the instance gets it as $PORT too (see `fixed_ports`).
            endpoint: what it speaks there: "http" (HTTP/1.1), "http2" (h2c) or "grpc".
            registry_username: the registry user; "json_key" when only `registry_password_secret` is given.
            registry_password_secret: a secret of the node's folder (name or ID) holding the registry password.
            timeout: seconds an answer may take to start (15).
            idle_timeout: seconds an idle connection to an instance is kept open (300).
            memory: each container's memory limit, swap included: bytes or a size ("512M", "2G", "1.5GiB"; powers
                of 1024). Default: the spec's RAM, which is also the most it may be.
            disk: each container's writable layer size, bytes or a size; needs an engine that can limit it.
            command: the command to run instead of the image's own: a list, or a string split as a shell would.
            fixed_ports: the image listens on `port` whatever $PORT says: then one instance per machine.
            telemetry: where it serves Prometheus metrics: True for `/metrics` on `port`, or `{"path", "port"}`.
            healthcheck: `{"type": "http" | "grpc", "port", "path", "timeout", "interval", "fails_threshold",
                "passes_threshold"}`; only `type` is required (path "/" for HTTP, service "" for gRPC; 1 s, 15 s,
                3, 3).

        The other arguments are `create_node`'s.

        Example:
            >>> node = client.create_docker_node("model", image="127.0.0.1:5000/team/model:1", port=8080,
            ...                                  healthcheck={"type": "http", "path": "/health"}, memory="2G")
            >>> client.request(node["id"], "POST", "/predict", json={"x": 1}).json()
            {'y': 2}
        """
        container: dict[str, Any] = {"image": image, "port": port, "endpoint": endpoint, "fixed_ports": fixed_ports}
        optional = (
            ("registry_username", registry_username),
            ("registry_password_secret", registry_password_secret),
            ("idle_timeout", idle_timeout),
            ("memory_bytes", memory),
            ("disk_bytes", disk),
            ("command", _command(command)),
            ("telemetry", {} if telemetry is True else telemetry or None),
            ("healthcheck", healthcheck),
        )
        container |= {key: value for key, value in optional if value is not None}
        return self.create_node(
            name,
            container=container,
            description=description,
            folder_id=folder_id,
            acl=acl,
            timeout=timeout,
            instances=instances,
            min_instances=min_instances,
            max_instances=max_instances,
            max_queue=max_queue,
            spec=spec,
            zones=zones,
            maintenance_limit=maintenance_limit,
            secrets=secrets,
            wait=wait,
            wait_timeout=wait_timeout,
        )

    def wait_node(self, ref: str, *, timeout: float = 180.0) -> dict[str, Any]:
        """Poll until the node is HEALTHY; InternalError if it FAILED, TransportError-free timeout otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            node = self.get_node(ref)
            if node["status"] == "HEALTHY":
                return node
            if node["status"] == "FAILED":
                raise InternalError(f"Node {node['name']!r} ({node['id']}) failed to start: {node['status_message']}")
            if time.monotonic() > deadline:
                raise InternalError(
                    f"Node {node['name']!r} ({node['id']}) is still {node['status']} after {timeout:.0f} s; "
                    "see 'cellnode node get' for its status."
                )
            time.sleep(0.1)

    def update_node(
        self, ref: str, *, folder_id: str | None = None, wait: bool = True, wait_timeout: float = 300.0, **changes: Any
    ) -> dict[str, Any]:
        """Change a node: `name`, `description`, `move_to` (a folder), `checkpoint`, `inputs`, `outputs`, `acl`,
        `timeout`, `instances`, `min_instances`, `max_instances`, `max_queue`, `spec`, `zones`, `state`,
        `maintenance_limit`, `secrets` (all of them; a changed list rolls), `roll` (True: roll even if nothing else
        asks for it, to pick up changed secret values). `folder_id` is where to find the node by name. With `wait`,
        return once every instance runs the new version.

        A docker node's `container` is a patch: the fields given replace the node's (`memory_bytes` and `disk_bytes`
        may be size strings), and None clears `telemetry`, `healthcheck`, `memory_bytes`, `disk_bytes`, `command` or
        the registry credentials. A cell node's `kernel_image` is an image reference or `{"image",
        "registry_username", "registry_password_secret"}`; `kernel_image=None` runs it in the server's Python again.
        Any container or kernel image change rolls the instances.

        Example:
            >>> client.update_node("model", container={"port": 9000, "healthcheck": None})["container"]["port"]
            9000
        """
        if "container" in changes:
            changes["container"] = _container_sizes(changes["container"])
        if changes.get("kernel_image") is not None:
            changes["kernel_image"] = _kernel_image(changes["kernel_image"])
        if "instances" in changes:
            changes["instance_count"] = changes.pop("instances")
        if "move_to" in changes:
            changes["folder_id"] = changes.pop("move_to")
        if changes.get("zones") is not None:
            changes["zones"] = _zones(changes["zones"])
        for key in ("inputs", "outputs"):
            if changes.get(key) is not None:
                changes[key] = _variables(changes[key])
        node = self._request(
            "PATCH", f"/cellnode/v1/nodes/{quote(ref, safe='')}", json=changes, params=_folder(folder_id)
        )
        if not wait:
            return node
        deadline = time.monotonic() + wait_timeout
        while True:
            found = self.get_node(node["id"])
            current = [i for i in found["instances"] if i["generation"] == found["generation"]]
            if (
                found["status"] == "HEALTHY"
                and len(found["instances"]) == len(current) == found["instance_count"]
                and all(i["status"] == "HEALTHY" for i in current)
            ):
                return found
            if found["rollout_error"] or time.monotonic() > deadline:
                raise InternalError(
                    f"Node {found['name']!r} ({found['id']}) did not finish its update: "
                    f"{found['rollout_error'] or found['status'] + '. ' + found['status_message']}"
                )
            time.sleep(0.1)

    def suspend_node(self, ref: str, *, folder_id: str | None = None, wait: bool = True) -> dict[str, Any]:
        """Stop the node's instances, keeping the node; with `wait`, return once it is SUSPENDED."""
        node = self._request("POST", f"/cellnode/v1/nodes/{quote(ref, safe='')}:suspend", params=_folder(folder_id))
        return self._wait_status(node["id"], "SUSPENDED") if wait else node

    def resume_node(self, ref: str, *, folder_id: str | None = None, wait: bool = True) -> dict[str, Any]:
        """Start a suspended node again; with `wait`, return once it is HEALTHY."""
        node = self._request("POST", f"/cellnode/v1/nodes/{quote(ref, safe='')}:resume", params=_folder(folder_id))
        return self.wait_node(node["id"]) if wait else node

    def _wait_status(self, node_id: str, status: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (node := self.get_node(node_id))["status"] != status:
            if time.monotonic() > deadline:
                raise InternalError(f"Node {node_id!r} is still {node['status']} after {timeout:.0f} s, not {status}.")
            time.sleep(0.1)
        return node

    def list_nodes(self, *, folder_id: str | None = None) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/nodes", params=_folder(folder_id))["nodes"]
        return nodes

    def get_node(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        return self._request("GET", f"/cellnode/v1/nodes/{quote(ref, safe='')}", params=_folder(folder_id))

    def delete_node(self, ref: str, *, folder_id: str | None = None, wait: bool = True) -> dict[str, Any]:
        node = self._request("DELETE", f"/cellnode/v1/nodes/{quote(ref, safe='')}", params=_folder(folder_id))
        deadline = time.monotonic() + 60
        while wait and time.monotonic() < deadline:
            try:
                self.get_node(node["id"])
            except APIError as exc:
                if exc.status_code == 404:
                    break
                raise
            time.sleep(0.1)
        return node

    def node_logs(
        self,
        ref: str,
        *,
        folder_id: str | None = None,
        since: str | None = None,
        instance: str | None = None,
        tail: int = 100,
    ) -> list[dict[str, Any]]:
        """The node's log lines, oldest first: `time`, `instance_id`, `request_id`, `stream`, `text`."""
        params: dict[str, str] = {"tail": str(tail)}
        for key, value in (("folder_id", folder_id), ("since", since), ("instance", instance)):
            if value:
                params[key] = value
        lines: list[dict[str, Any]] = self._request(
            "GET", f"/cellnode/v1/nodes/{quote(ref, safe='')}/logs", params=params
        )["lines"]
        return lines

    def node_openapi(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        return self._request("GET", f"/cellnode/v1/nodes/{quote(ref, safe='')}/openapi.json", params=_folder(folder_id))

    def node_proto(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        """The node's typed gRPC service: `proto` (the .proto text), `file_name`, `service` and `method`."""
        return self._request("GET", f"/cellnode/v1/nodes/{quote(ref, safe='')}/proto", params=_folder(folder_id))

    def execute(
        self, node: str, input: dict[str, Any], *, folder_id: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Run a node (ID or name) with these input variables; the output variables."""
        found = self.get_node(node, folder_id=folder_id)
        body = {"folder_id": folder_id or found["folder_id"], "input": input}
        response = self._request(
            "POST",
            f"/datasphere/v1/nodes/{quote(found['id'], safe='')}:execute",
            json=body,
            timeout=timeout or found["timeout"] + 5,
        )
        output: dict[str, Any] = response["output"]
        return output

    def request(
        self,
        node: str,
        method: str,
        path: str,
        *,
        folder_id: str | None = None,
        alias: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """Call a docker node's own service (or a docker alias's, with `alias=True`) through the pass-through: the
        request goes out with `x-node-id` (or `x-node-alias`) and `x-folder-id`, and the service's answer comes back
        as it is, whatever its status: check it as you would any `httpx.Response`.

        Parameters:
            node: node ID or name; with `alias`, a routing name (`datasphere.user.NAME`), a name or an ID.
            method, path: what the service gets (not under `/cellnode/v1/` or `/datasphere/v1/`, cellnode's own).
            folder_id: the folder to call from (`x-folder-id`), and where to find a node or alias by name.
                Default: the node's (alias's) own folder. Looked up once per client and kept until a NotFound.
            kwargs: passed to `httpx.Client.request`: `params`, `headers`, `json`, `content`, `timeout`, ...

        Raises the matching APIError only when cellnode itself answered with its own error (no instance took the
        request: NotFound, PermissionDenied, Unavailable while the node starts, DeadlineExceeded past the node's
        timeout, ...), which it recognizes by the `google.rpc.Status` body of domain `cellnode`. A service that
        answers that very shape would be read the same way. TransportError if the server cannot be reached, or
        drops the connection once the service's answer has started.

        Example:
            >>> client.request("model", "POST", "/predict", json={"x": 1}).json()
            {'y': 2}
        """
        if not path.startswith("/"):
            path = "/" + path
        if path.startswith(OWN_PREFIXES):
            raise InvalidArgument(
                f"Path {path!r} is under cellnode's own API, which never passes through to a node; give the path "
                "the service answers."
            )
        key = (node, folder_id, alias)
        target = self._targets.get(key) or self._target(node, folder_id, alias)
        headers = httpx.Headers(kwargs.pop("headers", None))
        headers.update(target)
        with self._transport_errors(method, path):
            response = self._http.request(method, path, headers=headers, **kwargs)
        error = _cellnode_error(response)
        if error is None:
            self._targets[key] = target
            return response
        if isinstance(error, NotFound):
            self._targets.pop(key, None)  # the node may have gone, or come back under the same name
        raise error

    def _target(self, ref: str, folder_id: str | None, alias: bool) -> dict[str, str]:
        """The pass-through headers that name a node (or alias) and the folder it is called from."""
        if not alias:
            found = self.get_node(ref, folder_id=folder_id)
            return {"x-node-id": found["id"], "x-folder-id": folder_id or found["folder_id"]}
        routing_name, folder = ref, folder_id
        if "." not in ref or folder_id is None:
            try:
                found = self.get_alias(ref, folder_id=folder_id)
            except NotFound:
                if "." not in ref:
                    raise
                # A public alias of another folder: callable, not readable.
            else:
                routing_name, folder = found["routing_name"], folder_id or found["folder_id"]
        return {"x-node-alias": routing_name} | ({"x-folder-id": folder} if folder else {})

    # -- aliases
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
        aliases: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/aliases", params=_folder(folder_id))[
            "aliases"
        ]
        return aliases

    def get_alias(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        """An alias by ID, routing name (`datasphere.user.NAME`) or name in the folder: its nodes with their status
        and effective percent now, its mirrors and their comparison stats, and its automatic rollbacks."""
        return self._request("GET", f"/cellnode/v1/aliases/{quote(ref, safe='')}", params=_folder(folder_id))

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
        return self._request("PATCH", path, json=changes, params=_folder(folder_id))

    def delete_alias(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        """Delete an alias; its nodes stay. Callers of its routing name get NotFound from now on."""
        return self._request("DELETE", f"/cellnode/v1/aliases/{quote(ref, safe='')}", params=_folder(folder_id))

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

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        with self._transport_errors(method, path):
            response = self._http.request(
                method,
                path,
                json=json,
                params=params,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.is_success:
            if not isinstance(body, dict):
                raise InternalError(
                    f"{method} {path} answered {response.status_code} with a body that is not an object."
                )
            return body
        raise APIError.from_status(response.status_code, body)

    @contextmanager
    def _transport_errors(self, method: str, path: str) -> Iterator[None]:
        """httpx's errors as our TransportError, which says what to check."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise TransportError(f"{self.url} did not answer {method} {path} in time: {exc}.") from exc
        except httpx.HTTPError as exc:
            raise TransportError(
                f"Cannot reach the cellnode server at {self.url}: {exc}. Is 'cellnode serve' running? "
                "Set the address with --url or CELLNODE_URL."
            ) from exc


def _cellnode_error(response: httpx.Response) -> APIError | None:
    """The error in a pass-through answer, if cellnode gave it rather than the service: a `google.rpc.Status`
    body whose ErrorInfo names our domain."""
    if response.status_code < 400 or "json" not in response.headers.get("content-type", ""):
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        return None
    details = body.get("details")
    if not isinstance(details, list) or not any(
        isinstance(d, dict) and d.get("@type") == ERROR_INFO_TYPE and d.get("domain") == ERROR_DOMAIN for d in details
    ):
        return None
    return APIError.from_status(response.status_code, body)


def _container_sizes(container: dict[str, Any] | None) -> dict[str, Any] | None:
    """A container object with its sizes in bytes (`memory_bytes` and `disk_bytes` may be given as "2G")."""
    if container is None:
        return None
    sizes = {key: parse_size(container[key]) for key in SIZE_FIELDS if container.get(key) is not None}
    return {**container, **sizes}


def _kernel_image(image: str | dict[str, Any] | None) -> dict[str, Any] | None:
    return {"image": image} if isinstance(image, str) else image


def _command(command: list[str] | str | None) -> list[str] | None:
    return shlex.split(command) if isinstance(command, str) else command


def _folder(folder_id: str | None) -> dict[str, str] | None:
    return {"folder_id": folder_id} if folder_id else None


def _variables(variables: Variables) -> list[dict[str, str]]:
    if isinstance(variables, dict):
        return [{"name": name, "type": kind} for name, kind in variables.items()]
    result = []
    for item in variables:
        if isinstance(item, dict):
            result.append({"name": item["name"], "type": item["type"]})
        else:
            name, kind = item
            result.append({"name": name, "type": kind})
    return result


def _shares(shares: Shares | None) -> list[dict[str, Any]] | None:
    """Node-to-percent pairs as the API's share objects."""
    if shares is None:
        return None
    pairs = shares.items() if isinstance(shares, dict) else shares
    return [{"node": node, "percent": percent} for node, percent in pairs]


def _zones(zones: list[str] | None) -> list[dict[str, str]] | None:
    """`ZONE` or `ZONE:SUBNET` strings as the API's zone objects."""
    if zones is None:
        return None
    return [dict(zip(("zone", "subnet"), text.split(":", 1), strict=False)) for text in zones]
