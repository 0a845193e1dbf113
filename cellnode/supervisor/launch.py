"""What the supervisor gives a backend to start an instance of a docker node, or of a cell node in a kernel image, and
what the front routes to once a docker node's instance is ready; and a cell node's runtime launch spec
(`InstanceSpecs`).

A docker node's stored container settings (`cellnode.api.containers`) become the container backend's
`launch["container"]` (`cellnode.backends.container_config`): the spec's CPUs and RAM as limits (the node's own memory
limit when it has one), its registry password decrypted from its secret, its health check and telemetry ports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.orm import Session

from cellnode.backends.base import InstanceFailed, InstanceSpec
from cellnode.checkpoint.blobs import BlobStore
from cellnode.exceptions import ConfigError
from cellnode.iam.secrets import SecretBox
from cellnode.router.proxied import ProxiedInstance
from cellnode.router.proxy import DEFAULT_LIMITS, ProxyInstance
from cellnode.store.db import Database
from cellnode.store.models import Checkpoint, Node, Secret
from cellnode.supervisor.specs import Spec


def registry_auth(session: Session, box: SecretBox | None, node: Node) -> dict[str, str] | None:
    """The node's registry credentials, the password read from its secret now; None without them."""
    container = node.container or {}
    secret_id = container.get("registry_password_secret")
    if secret_id is None:
        return None
    secret = session.get(Secret, secret_id)
    if secret is None:
        raise InstanceFailed(
            f"Secret {secret_id!r}, which holds the registry password of node {node.id!r}, no longer exists. Give the "
            f"node another: 'cellnode node update {node.id} --registry-password-secret NAME'.",
            permanent=True,
        )
    assert box is not None, "a server with secrets gives its supervisor a SecretBox"
    try:
        password = box.decrypt(secret)
    except ConfigError as exc:  # names the secret, never its value
        raise InstanceFailed(f"The node's registry password cannot be read: {exc}", permanent=True) from exc
    return {"username": container["registry_username"], "password": password}


def container_launch(node: Node, spec: Spec, cpus_here: int, auth: dict[str, str] | None) -> dict[str, Any]:
    """The container backend's launch spec of one instance of a docker node."""
    container = node.container
    assert container is not None and node.type == "docker", "a docker node has container settings"
    check = container.get("healthcheck")
    telemetry = container.get("telemetry")
    return {
        "container": {
            "image": container["image"],
            "registry_auth": auth,
            "endpoint": container["endpoint"],
            "port": container["port"],
            "healthcheck": None
            if check is None
            else {
                "kind": check["type"],
                "port": check["port"],
                "path": check["path"],
                "timeout": check["timeout"],
                "interval": check["interval"],
                "fails_threshold": check["fails_threshold"],
                "passes_threshold": check["passes_threshold"],
            },
            "telemetry": None if telemetry is None else {"path": telemetry["path"], "port": telemetry["port"]},
            "memory_bytes": container.get("memory_bytes") or spec.memory_cap,
            "cpus": float(max(1, min(spec.vcpu, cpus_here))),
            "command": container.get("command"),
            "assign_ports": not container.get("fixed_ports", False),
            **({"disk_bytes": container["disk_bytes"]} if container.get("disk_bytes") else {}),
        }
    }


def kernel_launch(node: Node, spec: Spec, cpus_here: int, auth: dict[str, str] | None) -> dict[str, Any]:
    """The kernel image backend's `launch["kernel_image"]` of a cell node's instance (without `python_version`, which
    is the checkpoint's). Memory is capped as for local instances, by the supervisor; the CPUs by the engine."""
    assert node.container is not None and node.type == "cell", "a cell node with a kernel image"
    return {"image": node.container["image"], "registry_auth": auth, "cpus": float(max(1, min(spec.vcpu, cpus_here)))}


def proxy_instance(node: Node, instance_id: str, address: str, pid: int | None) -> ProxiedInstance:
    """What the front routes a docker node's requests to: an HTTP proxy, or a gRPC one for a gRPC endpoint."""
    container = node.container
    assert container is not None, "a docker node has container settings"
    idle = float(container.get("idle_timeout", 300.0))
    instance: ProxiedInstance
    if container["endpoint"] == "grpc":
        from cellnode.grpc.passthrough import GrpcProxyInstance

        instance = GrpcProxyInstance(instance_id, node.id, address, node.timeout, idle_timeout=idle)
    else:
        limits = httpx.Limits(
            max_connections=DEFAULT_LIMITS.max_connections,
            max_keepalive_connections=DEFAULT_LIMITS.max_keepalive_connections,
            keepalive_expiry=idle,
        )
        instance = ProxyInstance(instance_id, node.id, address, container["endpoint"], node.timeout, limits=limits)
    instance.pid = pid
    return instance


@dataclass
class InstanceSpecs:
    """Builds each instance's launch spec from the store: a cell node's runtime spec (its cell, checkpoint variables
    and state policy) or a docker node's container, with the node's secrets decrypted at that moment."""

    db: Database
    blobs: BlobStore
    specs: dict[str, Spec]
    logs_dir: Path
    secret_box: SecretBox | None
    cpus: int

    def build(self, node: Node, instance_id: str, zone: dict[str, str]) -> InstanceSpec:
        """The backend's launch spec of one instance: the node's settings, checkpoint and secrets as of now."""
        spec = self.specs.get(node.spec)
        if spec is None:
            raise InstanceFailed(
                f"Spec {node.spec!r} of the node is not in this server's spec table; add it back to the table, "
                "or update the node to another spec."
            )
        if node.type == "docker":
            with self.db.session() as session:
                auth = registry_auth(session, self.secret_box, node)
                secrets = self._secret_env(session, node)
            return InstanceSpec(
                node_id=node.id,
                instance_id=instance_id,
                launch=container_launch(node, spec, self.cpus, auth),
                log_path=self.logs_dir / node.id,
                env={**secrets, **spec.environment(self.cpus)},
                zone=zone["zone"],
                subnet=zone.get("subnet", ""),
            )
        with self.db.session() as session:
            checkpoint = session.get(Checkpoint, node.checkpoint_id)
            if checkpoint is None:
                raise InstanceFailed(f"Checkpoint {node.checkpoint_id!r} of the node no longer exists.")
            variables = [
                {"name": v["name"], "path": str(self.blobs.path(v["sha256"])), "sha256": v["sha256"]}
                for v in checkpoint.variables
            ]
            imports = dict(checkpoint.imports)
            secrets = self._secret_env(session, node)
            kernel = None
            if node.container is not None:  # a kernel image: the instance runs in a container of it
                kernel = kernel_launch(node, spec, self.cpus, registry_auth(session, self.secret_box, node))
                kernel["python_version"] = checkpoint.python_version
        launch = {
            "node_id": node.id,
            "instance_id": instance_id,
            "cell": {"source": node.cell_code, "uses_ipython": node.uses_ipython},
            "inputs": {v["name"]: v["type"] for v in node.inputs},
            "outputs": {v["name"]: v["type"] for v in node.outputs},
            "variables": variables,
            "imports": imports,
            "state": node.state,
        }
        if kernel is not None:
            launch["kernel_image"] = kernel
        return InstanceSpec(
            node_id=node.id,
            instance_id=instance_id,
            launch=launch,
            log_path=self.logs_dir / node.id,
            env={**secrets, **spec.environment(self.cpus)},
            zone=zone["zone"],
            subnet=zone.get("subnet", ""),
        )

    def _secret_env(self, session: Session, node: Node) -> dict[str, str]:
        """The node's secrets, decrypted now, so that a changed value reaches every instance started from here on."""
        if not node.secrets:
            return {}
        assert self.secret_box is not None, "a server with secrets gives its supervisor a SecretBox"
        try:
            return self.secret_box.environment(session, node.secrets, node.id)
        except ConfigError as exc:  # gone or undecryptable; the message names the secret, never a value
            raise InstanceFailed(f"The node's secrets cannot be given to the instance: {exc}") from exc
