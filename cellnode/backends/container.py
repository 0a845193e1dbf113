"""The container backend: each instance is a container run through the Docker Engine API (dockerd, or podman's).

The engine is the one at `DOCKER_HOST` (with `DOCKER_TLS_VERIFY` and `DOCKER_CERT_PATH`, as the docker CLI reads
them), or the `base_url` given. Every blocking engine call runs in a thread; each instance has three threads of its
own while it runs: one waits for its exit, two copy its stdout and stderr into the node's log directory.

`InstanceSpec.launch["container"]` says what to run: see `ContainerConfig` (`cellnode.backends.container_config`)
for its keys.

`InstanceSpec.env` (secrets, thread limits) goes into the container's environment; its values are never logged.

Ports. Containers use the host's network, so two instances of one image on one machine would clash on a fixed port.
For each instance the backend picks free loopback ports, one for each distinct port the node declares (endpoint,
health check, telemetry: a health check or telemetry on the endpoint's port shares the instance's endpoint port), and
tells the container through its environment:

    PORT, CELLNODE_PORT         the endpoint port to listen on
    CELLNODE_HOST               127.0.0.1, the address to bind (nothing else on the machine needs to reach it)
    CELLNODE_HEALTHCHECK_PORT   the health check's port (with a health check)
    CELLNODE_TELEMETRY_PORT     the metrics port (with telemetry)
    CELLNODE_NODE_ID, CELLNODE_INSTANCE_ID
    PYTHONUNBUFFERED=1          so that a Python service's output reaches the log as it is printed

An image must listen on `$CELLNODE_HOST:$PORT` (for example `uvicorn app:app --host $CELLNODE_HOST --port $PORT`).
An image that ignores PORT runs with `"assign_ports": False`: its instance gets the declared ports, so a node of that
kind runs one instance per machine (a second start whose ports a running instance of this backend holds fails).
The handle's `address` is `127.0.0.1:<endpoint port>`; `healthcheck_port` and `telemetry_port` give the others.

Containers run detached, with host networking, an init process (so SIGTERM reaches the service), the memory and CPU
limits, read-only mounts, labels `cellnode.node_id`, `cellnode.instance_id` and `cellnode.owner`, and the name
`cellnode-<instance_id>`. A container is removed once it has ended and its logs are copied. A disk limit
(`"disk_bytes"`) is the engine's `--storage-opt size=`; overlay2 enforces it only on xfs mounted with `pquota`, and an
engine that cannot refuses the container, which fails the node at once (`DISK_REFUSED`).

`start_container()` starts a container from a checked `ContainerConfig`; the kernel image backend
(`cellnode.backends.kernel_image`) calls it with a `RunDir`: a config without a port, and one private directory mounted
writable, where the runtime instance in the container binds its Unix socket (the handle's `address`) and writes its
log records into a FIFO, which the container's log copies as they are.

Logs. Each instance writes `<instance_id>.log` in the node's log directory (`InstanceSpec.log_path`, mode 0700), in
the records of `cellnode.runtime.logs`: `TIMESTAMP INSTANCE_ID - out|err TEXT`, rotated at 10 MiB with 2 backups
(`"log_max_bytes"` and `"log_backups"` in the launch spec change that). The timestamp is the engine's, the time it
read the line; the request ID is always `-`; a line the engine split (over 16 KiB) is joined again. Lines of the two
streams are appended as the two copying threads get them, so within the file they are ordered per stream, and
`read_logs` orders them by time. (A container with a `RunDir` adds the records its runtime writes into the FIFO, with
their own timestamps and request IDs.)

Errors. A start that no retry can fix raises `ContainerFailed` with `permanent=True`: an engine that cannot be
reached, an image that does not exist, credentials the registry refuses, an invalid launch spec. Other pull or create
errors (a registry that is down, say) are not permanent.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import os
import socket
import tarfile
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import LogConfig, Mount
from docker.utils import parse_repository_tag

from cellnode.backends.base import Backend, InstanceFailed, InstanceHandle, InstanceSpec
from cellnode.backends.container_config import ContainerConfig, RunDir
from cellnode.backends.container_logs import ENGINE_ERRORS, ContainerLog
from cellnode.backends.health import wait_until_ready
from cellnode.backends.zygote import make_log_dir
from cellnode.runtime.logs import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
ENGINE_TIMEOUT = 120  # seconds one engine call (a pull's next progress message, say) may take
LOG_DRAIN = 5.0  # seconds to wait for a stream's last lines once the container has ended

ENGINE_UNREACHABLE = "Cannot reach the Docker engine at {host}: {error}. Check DOCKER_HOST and that the engine runs."
NO_IMAGE = "Image {image!r} does not exist in its registry: {error}."
BAD_REFERENCE = "Image reference {image!r} is not valid: {error}."
REFUSED = "The registry of image {image!r} refused the credentials of user {user!r}: {error}."
NO_CREDENTIALS = (
    "The registry of image {image!r} asks for credentials, and the node gives none: {error}. Set the registry "
    "username and password secret of the node."
)
PULL_FAILED = "Image {image!r} could not be pulled: {error}."
CREATE_FAILED = "The container of instance {instance_id!r} of node {node_id!r} could not be {what}: {error}."
DISK_REFUSED = (
    "Node {node_id!r} asks for a disk limit of {disk_bytes} bytes per instance (its --disk setting), and the engine "
    "refused it: {error}. Drop --disk from the node, or run the engine's storage on xfs mounted with the pquota option."
)
PORTS_TAKEN = (
    "Instance {instance_id!r} of node {node_id!r} needs ports {ports} (its image listens on fixed ports: assign_ports "
    "is false), and another instance of this machine holds them; such a node runs one instance per machine."
)


class ContainerFailed(InstanceFailed):
    """A container instance could not start; `permanent` when no retry can help (a missing image, say)."""


class ContainerHandle(InstanceHandle):
    """A running (or ended) container instance.

    `interrupt()` does nothing: a container runs no cell to interrupt, and the front answers 504 on its own when the
    endpoint timeout passes. `oom_killed` tells, once it has ended, whether the engine killed it for passing its
    memory limit.
    """

    def __init__(
        self,
        spec: InstanceSpec,
        container: Container,
        config: ContainerConfig,
        ports: dict[str, int],
        log: ContainerLog,
        run_dir: RunDir | None = None,
    ) -> None:
        address = run_dir.socket if run_dir is not None else f"{HOST}:{ports['endpoint']}"
        super().__init__(instance_id=spec.instance_id, node_id=spec.node_id, address=address)
        self.container = container
        self.image = config.image
        self.endpoint = config.endpoint
        self.port = ports.get("endpoint", 0)  # 0 for a container with a RunDir: it listens on no port
        self.healthcheck_port = ports.get("healthcheck")
        self.telemetry_port = ports.get("telemetry")
        self.telemetry_path = config.telemetry["path"] if config.telemetry is not None else ""
        # The node's health check, aimed at this instance's port: what a `HealthMonitor` of it probes.
        self.health_check = replace(config.healthcheck, port=ports["healthcheck"]) if config.healthcheck else None
        self.memory_bytes = config.memory_bytes
        self.log = log
        self.oom_killed = False
        self._pid: int | None = container.attrs["State"]["Pid"] or None
        self._error = ""
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[int] = self._loop.create_future()
        self._followers = [
            threading.Thread(target=log.follow, args=(container, stream), name=f"logs-{stream}-{self.instance_id}")
            for stream in ("out", "err")
        ]
        for thread in self._followers:
            thread.daemon = True
            thread.start()
        threading.Thread(target=self._watch, name=f"wait-{self.instance_id}", daemon=True).start()

    @property
    def ports(self) -> set[int]:
        return {port for port in (self.port, self.healthcheck_port, self.telemetry_port) if port}  # 0: no port

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    async def wait_ready(self, timeout: float) -> None:
        """Ready once the health check passes `passes_threshold` times in a row, or without one once the endpoint port
        accepts connections (see `health.wait_until_ready`); a container not ready in time is killed."""
        assert self.port, "a container with a RunDir is waited for by the backend that started it"
        error = await wait_until_ready(self.health_check, HOST, self.port, timeout, ended=self._exit)
        if error is None:
            return
        if self.returncode is None:
            self.kill()
            await self.wait()
            raise self._failure(f"was not ready within {timeout:g} s, so it was killed (last check: {error})")
        raise self._failure(f"exited with code {self.returncode} before it was ready")

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def interrupt(self) -> None:
        """Nothing to interrupt in a container (see the class docstring)."""

    async def stop(self, grace: float = 5.0) -> None:
        """`docker stop`: SIGTERM (through the container's init), SIGKILL after `grace` seconds; then it is removed."""
        if self.returncode is None:
            with contextlib.suppress(*ENGINE_ERRORS):  # Already gone.
                await asyncio.to_thread(self.container.stop, timeout=math.ceil(grace))
        await self.wait()

    def kill(self) -> None:
        """SIGKILL, sent from a thread: the engine call blocks."""
        if self.returncode is None:
            threading.Thread(target=self._kill, name=f"kill-{self.instance_id}", daemon=True).start()

    def last_log_line(self) -> str:
        return self._error or self.log.last_line

    def _kill(self) -> None:
        with contextlib.suppress(*ENGINE_ERRORS):  # Not running any more, or removed.
            self.container.kill()

    def _watch(self) -> None:
        """In a thread: wait for the container to end, let its logs drain, read why it ended, and remove it."""
        code = -1
        try:
            code = int(self.container.wait()["StatusCode"])
        except ENGINE_ERRORS as exc:
            self._error = f"The engine lost track of container {self.container.name}: {exc}"
        for thread in self._followers:
            thread.join(LOG_DRAIN)
        with contextlib.suppress(*ENGINE_ERRORS):
            self.container.reload()
            self.oom_killed = bool(self.container.attrs["State"].get("OOMKilled"))
        with contextlib.suppress(*ENGINE_ERRORS):
            self.container.remove(force=True)
        self.log.close()
        with contextlib.suppress(RuntimeError):  # The event loop is closed: nobody waits any more.
            self._loop.call_soon_threadsafe(self._end, code)

    def _end(self, code: int) -> None:
        if not self._exit.done():
            self._exit.set_result(code)

    def _failure(self, what: str) -> ContainerFailed:
        if self.oom_killed:
            what += f" (the engine killed it for passing its memory limit of {self.memory_bytes} bytes)"
        line = self.last_log_line()
        said = f"; its last log line: {line}" if line else "; it logged nothing"
        return ContainerFailed(
            f"Instance {self.instance_id!r} of node {self.node_id!r} (image {self.image!r}) {what}{said} "
            f"(log: {self.log.path})."
        )


class ContainerBackend(Backend):
    """Runs instances as containers on a Docker engine (see the module docstring).

    Parameters:
        base_url: the engine's address (`unix:///run/docker.sock`, `tcp://host:2376`); by default `DOCKER_HOST`
            and the other `DOCKER_*` variables, as the docker CLI reads them.
        owner: the `cellnode.owner` label of the containers; `remove_leftovers()` removes only containers of its
            owner, so servers that share an engine must each have their own.
    """

    name = "docker"

    def __init__(self, *, base_url: str | None = None, owner: str = "cellnode") -> None:
        self.base_url = base_url
        self.owner = owner
        self.handles: dict[str, ContainerHandle] = {}
        self._client: docker.DockerClient | None = None
        self._session = uuid.uuid4().hex  # labels what this backend object started, for close()
        self._reserved: set[int] = set()
        self._connecting = threading.Lock()  # two starts at once must not both make a client

    @property
    def engine_host(self) -> str:
        return self.base_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST

    async def start(self, spec: InstanceSpec) -> ContainerHandle:
        try:
            config = ContainerConfig.parse(spec.launch.get("container"))
        except ValueError as exc:
            raise ContainerFailed(f"Node {spec.node_id!r}: {exc}", permanent=True) from exc
        return await self.start_container(spec, config)

    async def start_container(
        self, spec: InstanceSpec, config: ContainerConfig, *, run_dir: RunDir | None = None
    ) -> ContainerHandle:
        """Start a container from a checked config (`spec.launch` gives only the log settings); with `run_dir` (and
        then no port in `config`), the container also gets that writable mount, and its log the FIFO's records."""
        assert (config.port is None) == (run_dir is not None), "a container has either a port or a RunDir"
        client = await asyncio.to_thread(self._connect)
        await asyncio.to_thread(self._ensure_image, client, config)
        ports = self._assign_ports(spec, config) if config.port is not None else {}
        self._reserved |= set(ports.values())
        try:
            make_log_dir(spec.log_path)
            log = ContainerLog(
                spec.log_path / f"{spec.instance_id}.log",
                spec.instance_id,
                max_bytes=spec.launch.get("log_max_bytes", DEFAULT_MAX_BYTES),
                backups=spec.launch.get("log_backups", DEFAULT_BACKUPS),
            )
            if run_dir is not None:
                log.copy_records(run_dir.records)
            run = asyncio.ensure_future(asyncio.to_thread(self._run, client, spec, config, ports, run_dir))
            try:
                container = await asyncio.shield(run)
            except asyncio.CancelledError:
                # The thread goes on and may still start the container: wait for it, then remove what it made.
                log.close()
                with contextlib.suppress(Exception):
                    started = await run
                    await asyncio.to_thread(started.remove, force=True)
                raise
            except BaseException:
                log.close()
                raise
            handle = ContainerHandle(spec, container, config, ports, log, run_dir)
        finally:
            self._reserved -= set(ports.values())
        self.handles[spec.instance_id] = handle
        logger.info("Instance %s of node %s: container %s, pid %s.", handle.instance_id, handle.node_id,
                    container.short_id, handle.pid)  # fmt: skip
        return handle

    async def close(self) -> None:
        handles, self.handles = list(self.handles.values()), {}
        await asyncio.gather(*(handle.stop() for handle in handles))
        if self._client is not None:
            try:
                # Those whose start was cancelled between create and the handle.
                with contextlib.suppress(*ENGINE_ERRORS):  # the engine is gone: nothing more to remove
                    await asyncio.to_thread(self._remove, {"cellnode.session": self._session})
            finally:
                self._client.close()
                self._client = None

    async def image_attrs(self, image: str, registry_auth: dict[str, str] | None = None) -> dict[str, Any]:
        """The engine's inspection of `image` (`Id`, `Config.User`, `Config.Env`...), pulled first if the engine does
        not have it; ContainerFailed as `start()` raises it when the image cannot be had."""
        client = await asyncio.to_thread(self._connect)
        config = ContainerConfig(image=image, registry_auth=registry_auth)
        await asyncio.to_thread(self._ensure_image, client, config)
        try:
            attrs: dict[str, Any] = (await asyncio.to_thread(client.images.get, image)).attrs
        except ENGINE_ERRORS as exc:  # removed in between, or the engine went away: a retry may do
            raise ContainerFailed(f"Image {image!r} cannot be inspected: {exc}.") from exc
        return attrs

    async def read_image_file(self, image: str, path: str) -> bytes | None:
        """The content of the regular file `path` of `image` (which the engine has), read from a container that is
        created, never started, and removed; None if there is no such file."""
        client = await asyncio.to_thread(self._connect)
        return await asyncio.to_thread(self._read_image_file, client, image, path)

    async def remove_leftovers(self) -> list[str]:
        """Remove the containers of this owner that this backend did not start (a previous run's); their names."""
        await asyncio.to_thread(self._connect)
        return await asyncio.to_thread(self._remove, {"cellnode.owner": self.owner}, keep=self._session)

    # -- in threads

    def _connect(self) -> docker.DockerClient:
        with self._connecting:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def _new_client(self) -> docker.DockerClient:
        host = self.engine_host
        try:
            if host.startswith("unix://"):
                # Our own first try: docker-py leaks the socket of a failed connect to a Unix socket.
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(ENGINE_TIMEOUT)
                    sock.connect(host.removeprefix("unix://"))
            if self.base_url is None:
                client = docker.from_env(timeout=ENGINE_TIMEOUT, max_pool_size=64)
            else:
                client = docker.DockerClient(base_url=self.base_url, timeout=ENGINE_TIMEOUT, max_pool_size=64)
            client.ping()
        except (*ENGINE_ERRORS, OSError) as exc:
            raise ContainerFailed(ENGINE_UNREACHABLE.format(host=host, error=exc), permanent=True) from exc
        return client

    def _ensure_image(self, client: docker.DockerClient, config: ContainerConfig) -> None:
        """Pull the image unless the engine has it; ContainerFailed saying why it cannot be had."""
        image, auth = config.image, config.registry_auth
        password = auth["password"] if auth else ""
        try:
            try:
                client.images.get(image)
                return
            except docker.errors.ImageNotFound:
                pass
            repository, tag = parse_repository_tag(image)
            began = time.monotonic()
            for message in client.api.pull(repository, tag or "latest", stream=True, decode=True, auth_config=auth):
                if "error" in message:  # The engine reports some failures inside the progress stream.
                    raise docker.errors.APIError(str(message["error"]))
            logger.info("Pulled image %s in %.1f s.", image, time.monotonic() - began)
        except docker.errors.APIError as exc:
            error = str(exc.explanation or exc)
            if password:
                error = error.replace(password, "***")
            raise _pull_failure(image, auth, error, exc.status_code) from None
        except ENGINE_ERRORS as exc:  # The engine answered a moment ago: a broken connection may well mend.
            # Not chained: the failed request holds the credentials.
            raise ContainerFailed(PULL_FAILED.format(image=image, error=exc)) from None

    def _run(
        self,
        client: docker.DockerClient,
        spec: InstanceSpec,
        config: ContainerConfig,
        ports: dict[str, int],
        run_dir: RunDir | None,
    ) -> Container:
        env = {"PYTHONUNBUFFERED": "1", **spec.env}
        env.update(CELLNODE_NODE_ID=spec.node_id, CELLNODE_INSTANCE_ID=spec.instance_id)
        if "endpoint" in ports:
            env.update(PORT=str(ports["endpoint"]), CELLNODE_PORT=str(ports["endpoint"]), CELLNODE_HOST=HOST)
        if "healthcheck" in ports:
            env["CELLNODE_HEALTHCHECK_PORT"] = str(ports["healthcheck"])
        if "telemetry" in ports:
            env["CELLNODE_TELEMETRY_PORT"] = str(ports["telemetry"])
        labels = {
            "cellnode.node_id": spec.node_id,
            "cellnode.instance_id": spec.instance_id,
            "cellnode.owner": self.owner,
            "cellnode.session": self._session,
        }
        # Mounts, not volumes: a bind "volume" whose source is missing makes the engine create it on the host.
        mounts = [Mount(m["target"], m["source"], type="bind", read_only=True) for m in config.mounts]
        if run_dir is not None:
            mounts.append(Mount(run_dir.target, run_dir.source, type="bind", read_only=False))
        what, container = "created", None
        try:
            container = client.containers.create(
                config.image,
                config.command,
                entrypoint=config.entrypoint,
                name=f"cellnode-{spec.instance_id}",
                network_mode="host",
                init=True,
                environment=env,
                labels=labels,
                mounts=mounts,
                working_dir=config.working_dir,
                mem_limit=config.memory_bytes,
                memswap_limit=config.memory_bytes,
                nano_cpus=round(config.cpus * 1e9) if config.cpus is not None else None,
                storage_opt={"size": str(config.disk_bytes)} if config.disk_bytes is not None else None,
                # We keep the logs ourselves; the engine's copy only has to last until they are read.
                log_config=LogConfig(type="json-file", config={"max-size": "10m", "max-file": "1"}),
            )
            what = "started"
            container.start()
            container.reload()  # The state after the start: its pid.
            return container
        except ENGINE_ERRORS as exc:
            if container is not None:
                with contextlib.suppress(*ENGINE_ERRORS):
                    container.remove(force=True)
            status = exc.status_code if isinstance(exc, docker.errors.APIError) else None
            error = str(exc.explanation) if isinstance(exc, docker.errors.APIError) else str(exc)
            if config.disk_bytes is not None and "storage-opt" in error:
                # overlay2 answers 500 to a size it cannot enforce; no retry can change the engine's filesystem.
                disk = DISK_REFUSED.format(node_id=spec.node_id, disk_bytes=config.disk_bytes, error=error)
                raise ContainerFailed(disk, permanent=True) from exc
            message = CREATE_FAILED.format(instance_id=spec.instance_id, node_id=spec.node_id, what=what, error=error)
            # 400: the engine refused the configuration (a mount source that does not exist, a limit too small).
            raise ContainerFailed(message, permanent=status == 400) from exc

    def _read_image_file(self, client: docker.DockerClient, image: str, path: str) -> bytes | None:
        labels = {"cellnode.owner": self.owner, "cellnode.session": self._session}  # close() removes a leftover
        try:
            container = client.containers.create(image, ["true"], network_mode="none", labels=labels)
            try:
                chunks, _ = container.get_archive(path)
                archive = b"".join(chunks)
            finally:
                with contextlib.suppress(*ENGINE_ERRORS):
                    container.remove(force=True)
        except docker.errors.NotFound:
            return None
        except ENGINE_ERRORS as exc:
            raise ContainerFailed(f"File {path!r} of image {image!r} cannot be read: {exc}.") from exc
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            member = tar.next()
            content = tar.extractfile(member) if member is not None and member.isfile() else None
            return content.read() if content is not None else None

    def _remove(self, labels: dict[str, str], keep: str = "") -> list[str]:
        assert self._client is not None, "connected first"
        removed = []
        filters: dict[str, str | list[str] | bool] = {"label": [f"{key}={value}" for key, value in labels.items()]}
        for container in self._client.containers.list(all=True, filters=filters):
            if keep and container.labels.get("cellnode.session") == keep:
                continue
            with contextlib.suppress(*ENGINE_ERRORS):
                container.remove(force=True)
                removed.append(container.name or container.id or "")
        return removed

    # -- in the event loop

    def _assign_ports(self, spec: InstanceSpec, config: ContainerConfig) -> dict[str, int]:
        """The instance's ports by role: one per distinct declared port, free ones unless `assign_ports` is off."""
        live = [handle for handle in self.handles.values() if handle.returncode is None]
        self.handles = {handle.instance_id: handle for handle in live}
        taken = self._reserved.union(*(handle.ports for handle in live))
        assert config.port is not None, "only a container with a port gets ports"
        declared = {"endpoint": config.port}
        if config.healthcheck is not None:
            declared["healthcheck"] = config.healthcheck.port
        if config.telemetry is not None:
            declared["telemetry"] = config.telemetry["port"]
        if not config.assign_ports:
            if taken & set(declared.values()):
                ports = sorted(set(declared.values()))
                raise ContainerFailed(
                    PORTS_TAKEN.format(instance_id=spec.instance_id, node_id=spec.node_id, ports=ports)
                )
            return declared
        chosen: dict[int, int] = {}
        for number in declared.values():
            if number not in chosen:
                chosen[number] = _free_port(taken | set(chosen.values()))
        return {role: chosen[number] for role, number in declared.items()}


def _free_port(taken: set[int]) -> int:
    """A loopback port nothing listens on now, and not in `taken`."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


def _pull_failure(image: str, auth: dict[str, str] | None, error: str, status: int | None) -> ContainerFailed:
    lowered = error.lower()
    if "no basic auth credentials" in lowered or (auth is None and "unauthorized" in lowered):
        return ContainerFailed(NO_CREDENTIALS.format(image=image, error=error), permanent=True)
    if auth is not None and any(word in lowered for word in ("unauthorized", "authentication required", "denied")):
        return ContainerFailed(REFUSED.format(image=image, user=auth["username"], error=error), permanent=True)
    if status == 404 or any(words in lowered for words in ("manifest unknown", "not found", "does not exist")):
        return ContainerFailed(NO_IMAGE.format(image=image, error=error), permanent=True)
    if status == 400 or "invalid reference" in lowered:
        return ContainerFailed(BAD_REFERENCE.format(image=image, error=error), permanent=True)
    return ContainerFailed(PULL_FAILED.format(image=image, error=error))
