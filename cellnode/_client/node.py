"""`Client` methods for nodes: cell and docker nodes, their lifecycle, logs, documents and execution."""

from __future__ import annotations

import shlex
import time
from typing import Any
from urllib.parse import quote

from cellnode._client.base import BaseClient, folder_params
from cellnode._sizes import parse_size
from cellnode.exceptions import APIError, InternalError

SIZE_FIELDS = ("memory_bytes", "disk_bytes")
Variables = dict[str, str] | list[tuple[str, str]] | list[dict[str, str]]


class NodeMethods(BaseClient):
    """Nodes: created (cell or docker), waited for, updated, suspended, resumed, deleted, read and executed."""

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
            "PATCH", f"/cellnode/v1/nodes/{quote(ref, safe='')}", json=changes, params=folder_params(folder_id)
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
        node = self._request(
            "POST", f"/cellnode/v1/nodes/{quote(ref, safe='')}:suspend", params=folder_params(folder_id)
        )
        return self._wait_status(node["id"], "SUSPENDED") if wait else node

    def resume_node(self, ref: str, *, folder_id: str | None = None, wait: bool = True) -> dict[str, Any]:
        """Start a suspended node again; with `wait`, return once it is HEALTHY."""
        node = self._request(
            "POST", f"/cellnode/v1/nodes/{quote(ref, safe='')}:resume", params=folder_params(folder_id)
        )
        return self.wait_node(node["id"]) if wait else node

    def _wait_status(self, node_id: str, status: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (node := self.get_node(node_id))["status"] != status:
            if time.monotonic() > deadline:
                raise InternalError(f"Node {node_id!r} is still {node['status']} after {timeout:.0f} s, not {status}.")
            time.sleep(0.1)
        return node

    def list_nodes(self, *, folder_id: str | None = None) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/nodes", params=folder_params(folder_id))[
            "nodes"
        ]
        return nodes

    def get_node(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        return self._request("GET", f"/cellnode/v1/nodes/{quote(ref, safe='')}", params=folder_params(folder_id))

    def delete_node(self, ref: str, *, folder_id: str | None = None, wait: bool = True) -> dict[str, Any]:
        node = self._request("DELETE", f"/cellnode/v1/nodes/{quote(ref, safe='')}", params=folder_params(folder_id))
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
        return self._request(
            "GET", f"/cellnode/v1/nodes/{quote(ref, safe='')}/openapi.json", params=folder_params(folder_id)
        )

    def node_proto(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        """The node's typed gRPC service: `proto` (the .proto text), `file_name`, `service` and `method`."""
        return self._request("GET", f"/cellnode/v1/nodes/{quote(ref, safe='')}/proto", params=folder_params(folder_id))

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


def _zones(zones: list[str] | None) -> list[dict[str, str]] | None:
    """`ZONE` or `ZONE:SUBNET` strings as the API's zone objects."""
    if zones is None:
        return None
    return [dict(zip(("zone", "subnet"), text.split(":", 1), strict=False)) for text in zones]
