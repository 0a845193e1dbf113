"""The supervisor: reconciles the nodes in the store with running instances, and is the only writer of statuses.

A node wants `instance_count` instances, in slots 0..N-1; slot i runs in the node's zone i mod (number of zones).
An empty slot gets an instance (after a backoff if the slot's last one crashed); a slot past the count is drained and
removed. For a node with a range (`min_instances` < `max_instances`) the autoscaler moves the count
(`cellnode.supervisor.autoscale`). Each instance's observed state is a row of the `instances` table, through
CREATED (asked of the backend), STARTED (the backend is starting it), PREPARING (its process exists and loads or
warms up), HEALTHY, UNHEALTHY (missed a liveness check; being replaced), DELETING (draining), FAILED (could not
start; the reason is kept until the slot's next instance), and UNDEFINED (left by a previous server run, until its
process is confirmed gone). Each node's status follows from how many of its instances are healthy.

Every second the supervisor also reads each instance's resident memory (with its children's): one past its spec's
RAM is killed and replaced, with the reason kept.

It also keeps the aliases of the routing table in line with the store (changes made through another server that
shares the database arrive within a reconcile interval), and writes the automatic rollbacks the front asks for
(`cellnode.supervisor.aliases.AliasKeeper`). Its reads and writes of the store are `cellnode.supervisor.records`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellnode.backends.base import Backend, InstanceFailed, InstanceHandle
from cellnode.backends.container import ContainerBackend, ContainerHandle
from cellnode.backends.health import HealthMonitor
from cellnode.checkpoint.blobs import BlobStore
from cellnode.exceptions import Unavailable
from cellnode.iam.secrets import SecretBox
from cellnode.router.instance import Instance
from cellnode.router.proxied import ProxiedInstance
from cellnode.router.table import NodeRoute, Routable, RoutingTable
from cellnode.store.db import Database
from cellnode.store.models import Node, new_id
from cellnode.supervisor.aliases import AliasKeeper
from cellnode.supervisor.autoscale import SAMPLE_INTERVAL, AutoscalePolicy, Scaler
from cellnode.supervisor.launch import InstanceSpecs, proxy_instance
from cellnode.supervisor.processes import exists, resident_bytes
from cellnode.supervisor.records import HOST, Records
from cellnode.supervisor.specs import GIB, REFERENCE_SPECS, Spec, count_cpus
from cellnode.telemetry.logs import prune_logs
from cellnode.telemetry.metrics import Metrics
from cellnode.telemetry.scrape import Scraper

logger = logging.getLogger("cellnode.supervisor")

RECONCILE_INTERVAL = 2.0
# Exit codes of `python -m cellnode.runtime` that no restart can fix (a corrupt or unloadable checkpoint).
PERMANENT_EXIT_CODES = {2, 3, 4}
CRASH_WINDOW = 60.0
MAX_CRASHES = 3
LOG_PRUNE_INTERVAL = 300.0
PREVIOUS_RUN_GRACE = 10.0  # seconds a previous server's instance may take to exit after that server died


class LaunchFailed(Exception):
    """An instance could not be started; `permanent` when no retry can help (a corrupt checkpoint, say)."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


@dataclass
class _Running:
    handle: InstanceHandle
    instance: Routable  # a cell node's Instance, or a docker node's proxy
    spec: Spec
    watcher: asyncio.Task[None] | None = None
    hung: bool = False  # killed because it did not answer a liveness check
    over_memory: str = ""  # why it was killed for passing its memory cap


@dataclass
class _Slot:
    index: int
    running: _Running | None = None
    generation: int = 0  # of the running instance
    starting: bool = False
    replacing: bool = False  # a newer generation's instance is starting beside the running one
    restarts: int = 0
    last_error: str = ""
    not_before: float = 0.0


@dataclass
class _NodeState:
    slots: dict[int, _Slot] = field(default_factory=dict)
    failed: bool = False
    generation: int = 0  # the node's, as last read
    failed_at: int = 0  # the generation that failed: a newer one (an update) tries again
    failed_generation: int = 0  # a rollout to this generation could not start an instance; wait for the next
    crashes: list[float] = field(default_factory=list)
    bounds: tuple[int, int, int] = (1, 1, 1)  # instance_count, min_instances, max_instances, as last read
    scaler: Scaler | None = None  # for a node with a range


class Supervisor:
    """Keeps every node at its instance count, replaces crashed instances with backoff, stops deleted nodes."""

    def __init__(
        self,
        db: Database,
        backend: Backend,
        blobs: BlobStore,
        table: RoutingTable,
        *,
        logs_dir: Path,
        start_timeout: float,
        specs: dict[str, Spec] | None = None,
        liveness: tuple[float, float] = (5.0, 10.0),
        autoscale: AutoscalePolicy | None = None,
        metrics: Metrics | None = None,
        log_limits: tuple[float, int] = (7 * 86_400.0, 200 * 2**20),
        secret_box: SecretBox | None = None,
        containers: ContainerBackend | None = None,
        scraper: Scraper | None = None,
        kernels: Backend | None = None,
    ) -> None:
        self._kernels = kernels  # cell nodes with a kernel image (on the container backend's engine)
        self._scraper = scraper  # docker nodes' metrics pages
        self._containers = containers  # docker nodes' instances (the engine is reached at their first start)
        self._secret_box = secret_box  # decrypts nodes' secrets into their instances' environment
        self._log_retention, self._log_max_bytes = log_limits
        self._liveness_interval, self._liveness_timeout = liveness
        self._autoscale = autoscale or AutoscalePolicy()
        self._metrics = metrics
        if metrics is not None:
            metrics.view = self.view
        self._specs = specs if specs is not None else dict(REFERENCE_SPECS)
        self._cpus = count_cpus()
        self._db = db
        self._records = Records(db)
        self.aliases = AliasKeeper(db, table, metrics, self._spawn)
        self._launch_specs = InstanceSpecs(db, blobs, self._specs, logs_dir, secret_box, self._cpus)
        self._backend = backend
        self._blobs = blobs
        self._table = table
        self._logs_dir = logs_dir
        self._start_timeout = start_timeout
        self._nodes: dict[str, _NodeState] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    async def start(self) -> None:
        """Load the routing table from the store and start reconciling in the background."""
        self._loop = asyncio.get_running_loop()
        previous = await asyncio.to_thread(self._records.mark_restarting)
        await self._remove_leftover_containers()
        await self.reconcile()
        self._task = asyncio.create_task(self._run(), name="cellnode-supervisor")
        self._spawn(self._check_liveness(), "cellnode-liveness")
        self._spawn(self._watch_resources(), "cellnode-resources")
        self._spawn(self._prune_logs(), "cellnode-log-pruning")
        if previous:
            self._spawn(self._forget_previous(previous), "cellnode-previous-run")

    def view(self) -> tuple[dict[str, dict[str, int]], dict[str, tuple[int, int, int]]]:
        """Instances per node and status, and each node's wanted count and range (for `/metrics`)."""
        statuses: dict[str, dict[str, int]] = {}
        for node_id, status in self._records.statuses.copy().values():
            per_node = statuses.setdefault(node_id, {})
            per_node[status] = per_node.get(status, 0) + 1
        return statuses, {node_id: state.bounds for node_id, state in self._nodes.copy().items()}

    def notify(self) -> None:
        """Wake the supervisor after a change to desired state; safe from any thread."""
        if self._loop is not None and not self._closing:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def close(self) -> None:
        """Stop reconciling and stop every instance."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop_node(node_id) for node_id in list(self._nodes)), return_exceptions=True)
        await self._backend.close()
        if self._kernels is not None:
            await self._kernels.close()
        if self._containers is not None:
            await self._containers.close()

    async def _remove_leftover_containers(self) -> None:
        """A previous run that died left its containers running (they hold ports, and may answer): remove them."""
        uses_containers = await asyncio.to_thread(self._records.has_docker_nodes)
        if self._containers is None or not uses_containers:
            return
        try:
            removed = await self._containers.remove_leftovers()
        except InstanceFailed as exc:  # the engine is unreachable: the nodes will say so when they start
            logger.warning("Could not look for a previous run's containers: %s", exc)
            return
        if removed:
            logger.warning("Removed %d container(s) a previous run left: %s.", len(removed), ", ".join(removed))

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RECONCILE_INTERVAL)
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:  # pragma: no cover - a bug; keep supervising the rest
                logger.exception("Reconcile failed; retrying in %.0f s.", RECONCILE_INTERVAL)

    async def _check_liveness(self) -> None:
        """Every interval, ask each idle cell instance for a PONG; one that does not answer in time is killed (and so
        replaced), with the reason recorded. (A docker node's instances have their health checks instead.)"""
        while True:
            await asyncio.sleep(self._liveness_interval)
            checks = [
                (node_id, slot.running, slot.running.instance)
                for node_id, state in self._nodes.items()
                for slot in state.slots.values()
                if slot.running is not None and isinstance(slot.running.instance, Instance)
            ]
            answers = await asyncio.gather(*(instance.ping(self._liveness_timeout) for _, _, instance in checks))
            for (node_id, running, instance), is_alive in zip(checks, answers, strict=True):
                if not is_alive and instance.is_alive and not running.hung:
                    running.hung = True
                    logger.error(
                        "Node %s: instance %s did not answer a liveness check within %g s; replacing it.",
                        node_id,
                        running.handle.instance_id,
                        self._liveness_timeout,
                    )
                    await asyncio.to_thread(
                        self._records.write_instance_status, running.handle.instance_id, "UNHEALTHY"
                    )
                    running.handle.kill()

    async def _watch_resources(self) -> None:
        """Every second: usage units, the memory cap of each instance, and the autoscaler's samples."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            now = time.monotonic()
            elapsed, last = now - last, now
            for node_id, state in list(self._nodes.items()):
                try:
                    for slot in list(state.slots.values()):
                        if slot.running is not None:
                            self._account(node_id, slot.running, elapsed)
                    if state.scaler is not None and not state.failed:
                        await self._autoscale_node(node_id, state, now)
                except Exception:  # pragma: no cover - a bug; keep watching the other nodes
                    logger.exception("Node %s: watching resources failed.", node_id)

    async def _prune_logs(self) -> None:
        """Now and every few minutes: remove the log files of ended instances past the retention or the size cap."""
        while True:
            live = set(self._records.statuses.copy())
            for state in self._nodes.copy().values():
                live.update(s.running.handle.instance_id for s in state.slots.values() if s.running is not None)
            directories = await asyncio.to_thread(
                lambda: [d for d in self._logs_dir.iterdir() if d.is_dir()] if self._logs_dir.is_dir() else []
            )
            for directory in directories:
                removed = await asyncio.to_thread(
                    prune_logs, directory, live=live, retention=self._log_retention, max_bytes=self._log_max_bytes
                )
                if removed:
                    logger.info("Node %s: removed %d log file(s) of ended instances.", directory.name, len(removed))
            await asyncio.sleep(LOG_PRUNE_INTERVAL)

    def _account(self, node_id: str, running: _Running, elapsed: float) -> None:
        if self._metrics is not None:
            self._metrics.usage_units.labels(node_id, running.spec.name).inc(elapsed * running.spec.units_per_second)
        if running.over_memory or not isinstance(running.instance, Instance) or not running.instance.is_alive:
            return  # a container's memory limit is the engine's to enforce
        used = resident_bytes(running.handle.pid)
        if used is not None and used > running.spec.memory_cap:
            running.over_memory = (
                f"Instance {running.handle.instance_id} used {used / GIB:.2f} GB of memory, over the "
                f"{running.spec.ram_gb:g} GB of spec {running.spec.name}, so it was killed. Give the node a spec "
                "with more RAM, or make the cell use less."
            )
            logger.error("Node %s: %s", node_id, running.over_memory)
            running.instance.kill(
                f"it was killed for using {used / GIB:.2f} GB of memory, over the {running.spec.ram_gb:g} GB of its "
                f"spec {running.spec.name}; it is being replaced. The node's owner can give it a larger spec."
            )

    async def _autoscale_node(self, node_id: str, state: _NodeState, now: float) -> None:
        route, scaler = self._table.find(node_id), state.scaler
        if route is None or scaler is None:
            return
        scaler.sample(now, sum(instance.outstanding for instance in route.instances if instance.is_alive))
        count, low, high = state.bounds
        wanted = scaler.decide(now, count=count, low=low, high=high)
        if wanted == count:
            return
        direction = "up" if wanted > count else "down"
        logger.info("Node %s: autoscaling %s from %d to %d instances.", node_id, direction, count, wanted)
        if self._metrics is not None:
            self._metrics.scaling.labels(node_id, direction).inc()
        if await asyncio.to_thread(self._records.write_count, node_id, wanted):
            state.bounds = (wanted, low, high)
            self.notify()

    async def reconcile(self) -> None:
        """One pass: bring routes and instances in line with the store."""
        nodes = await asyncio.to_thread(self._records.load_nodes)
        await asyncio.to_thread(self._records.touch_usage)
        wanted = {node.id for node in nodes if node.status != "DELETING"}
        for node in nodes:
            if node.status == "DELETING":
                await self._delete(node.id)
                continue
            self._put_route(node)
            state = self._nodes.setdefault(node.id, _NodeState())
            state.bounds = (node.instance_count, node.min_instances, node.max_instances)
            if node.suspended:
                state.scaler = None
                await self._suspend(node.id, state)
                continue
            if node.min_instances == node.max_instances:
                state.scaler = None
            elif state.scaler is None:
                state.scaler = Scaler(self._autoscale, started=time.monotonic())
            route = self._table.find(node.id)
            if route is not None and route.status in ("SUSPENDING", "SUSPENDED"):
                await self._set_status(node.id, "RESUMING", "Starting instances from the pinned checkpoint.")
            for index in [i for i in state.slots if i >= node.instance_count]:
                slot = state.slots.pop(index)
                self._spawn(self._retire(node.id, slot, node.timeout), f"retire-{node.id}-{index}")
            state.generation = node.generation
            if state.failed and node.generation > state.failed_at:
                state.failed, state.crashes = False, []  # an update: the owner's way to try again
                await self._set_status(node.id, "UNHEALTHY", "Starting instances of the updated node.")
            if state.failed:
                continue
            now = time.monotonic()
            for index in range(node.instance_count):
                slot = state.slots.setdefault(index, _Slot(index))
                if slot.running is None and not slot.starting and now >= slot.not_before:
                    slot.starting = True
                    self._spawn(self._start(node, slot), f"start-{node.id}-{index}")
            self._roll(node, state)
            await self._update_node_status(node.id)
        for node_id in [route.node_id for route in self._table.routes() if route.node_id not in wanted]:
            await self._stop_node(node_id)
            self._table.remove(node_id)
        await self.aliases.sync()

    def _roll(self, node: Node, state: _NodeState) -> None:
        """Replace instances of an older generation, at most `maintenance_limit` at once, each beside its old one."""
        if state.failed_generation == node.generation:
            return
        stale = [s for s in state.slots.values() if s.running is not None and s.generation < node.generation]
        busy = sum(1 for s in state.slots.values() if s.replacing)
        for slot in [s for s in stale if not s.replacing][: max(0, node.maintenance_limit - busy)]:
            slot.replacing = True
            self._spawn(self._replace(node, state, slot), f"replace-{node.id}-{slot.index}")

    async def _replace(self, node: Node, state: _NodeState, slot: _Slot) -> None:
        """Start the new instance; once it is healthy, route to it, let the old one finish its requests, stop it."""
        try:
            new = await self._launch(node, slot)
        except LaunchFailed as exc:
            slot.replacing = False
            state.failed_generation = node.generation
            slot.last_error = f"Update to generation {node.generation} failed: {exc}"
            logger.error("Node %s: %s The previous version keeps serving.", node.id, slot.last_error)
            await asyncio.to_thread(self._records.write_rollout_error, node.id, slot.last_error)
            await self._set_status(node.id, "UNHEALTHY", slot.last_error + " The previous version keeps serving.")
            return
        if self._closing or state.slots.get(slot.index) is not slot:
            new.instance.close()
            await new.handle.stop()
            await asyncio.to_thread(self._records.drop_instance, new.handle.instance_id)
            return
        old, slot.running, slot.generation, slot.replacing = slot.running, new, node.generation, False
        new.watcher = self._spawn(self._watch(node.id, slot, new), f"watch-{new.handle.instance_id}")
        self._publish(node.id)
        await asyncio.to_thread(self._records.write_instance_status, new.handle.instance_id, "HEALTHY", new.handle.pid)
        if old is not None:
            await self._drain(node.id, old, node.timeout)
        logger.info("Node %s: slot %d now runs generation %d.", node.id, slot.index, node.generation)
        await self._update_node_status(node.id)

    async def _drain(self, node_id: str, old: _Running, timeout: float) -> None:
        """Out of the route already: wait for its requests to finish (within the node's timeout), then stop it."""
        await asyncio.to_thread(self._records.write_instance_status, old.handle.instance_id, "DELETING")
        deadline = time.monotonic() + timeout + 5
        while old.instance.outstanding and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if old.watcher is not None:
            old.watcher.cancel()
        old.instance.close()
        await old.handle.stop()
        await asyncio.to_thread(self._records.drop_instance, old.handle.instance_id)

    async def _retire(self, node_id: str, slot: _Slot, timeout: float) -> None:
        """A slot past the count: out of the route at once, then its instance finishes what it holds and stops."""
        running, slot.running = slot.running, None
        if running is None:
            return
        self._publish(node_id)
        await self._drain(node_id, running, timeout)
        await self._update_node_status(node_id)

    async def _suspend(self, node_id: str, state: _NodeState) -> None:
        """Stop every instance and keep the node; a resume starts it again from its pinned checkpoint."""
        if state.slots:
            await self._set_status(node_id, "SUSPENDING", "Stopping instances.")
            slots, state.slots = list(state.slots.values()), {}
            await asyncio.gather(*(self._stop_slot(node_id, slot) for slot in slots))
            await self._backend.release(node_id)
        # A suspend and resume is the owner's way to try again after a failure.
        state.failed, state.crashes = False, []
        await self._set_status(node_id, "SUSPENDED", "Suspended: no instances run. 'cellnode node resume' starts it.")

    async def _forget_previous(self, previous: list[tuple[str, int | None, str]]) -> None:
        """Drop a previous run's instance rows once their processes are gone (they exit when their server dies)."""
        deadline = time.monotonic() + PREVIOUS_RUN_GRACE
        for instance_id, pid, host in previous:
            while host == HOST and pid is not None and exists(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if host == HOST and pid is not None and exists(pid):
                logger.warning("Instance %s of a previous run (pid %d) did not exit; forgetting it.", instance_id, pid)
            await asyncio.to_thread(self._records.drop_instance, instance_id)

    # -- routes and statuses

    def _put_route(self, node: Node) -> None:
        current = self._table.find(node.id)
        route = NodeRoute(
            node_id=node.id,
            name=node.name,
            folder_id=node.folder_id,
            acl=frozenset(node.acl),
            inputs={v["name"]: v["type"] for v in node.inputs},
            outputs={v["name"]: v["type"] for v in node.outputs},
            timeout=node.timeout,
            max_queue=node.max_queue,
            status=current.status if current else node.status,
            status_message=current.status_message if current else node.status_message,
            instances=current.instances if current else [],
            kind=node.type,
            endpoint=(node.container or {}).get("endpoint", "") if node.type == "docker" else "",
        )
        for instance in route.instances:
            instance.timeout = node.timeout  # an update may have changed it; no new instance needed
        self._table.put(route)

    def _publish(self, node_id: str) -> None:
        """Point the route at the node's live instances."""
        state, route = self._nodes.get(node_id), self._table.find(node_id)
        if state is not None and route is not None:
            route.instances = [s.running.instance for s in state.slots.values() if s.running is not None]
            for instance in route.instances:
                instance.timeout = route.timeout  # an update may have changed it; no new instance needed

    async def _update_node_status(self, node_id: str) -> None:
        state, route = self._nodes.get(node_id), self._table.find(node_id)
        if state is None or route is None or state.failed:
            return
        healthy = sum(1 for slot in state.slots.values() if slot.running is not None and slot.running.instance.is_alive)
        wanted = len(state.slots)
        # Enough: the node's minimum (a fixed count's minimum is the count), or every slot if fewer are wanted.
        if healthy >= max(1, min(wanted, state.bounds[1])):
            await self._set_status(node_id, "HEALTHY", "")
        elif route.status not in ("CREATED", "RESUMING") or state.crashes:
            errors = [s.last_error for s in state.slots.values() if s.last_error and s.running is None]
            detail = f" Last error: {errors[-1]}" if errors else ""
            await self._set_status(node_id, "UNHEALTHY", f"{healthy} of {wanted} instances are healthy.{detail}")

    async def _set_status(self, node_id: str, status: str, message: str) -> None:
        route = self._table.find(node_id)
        if route is not None:
            if (route.status, route.status_message) == (status, message):
                return
            route.status, route.status_message = status, message

        await asyncio.to_thread(self._records.write_node_status, node_id, status, message)

    # -- instances

    async def _launch(self, node: Node, slot: _Slot) -> _Running:
        """Start one instance of the node's current generation and wait until it answers; LaunchFailed if not."""
        handle: InstanceHandle | None = None
        instance_id = new_id()
        zone = node.zones[slot.index % len(node.zones)] if node.zones else {"zone": "local", "subnet": ""}
        try:
            spec = await asyncio.to_thread(self._launch_specs.build, node, instance_id, zone)
            await asyncio.to_thread(
                self._records.create_instance,
                node,
                instance_id,
                self._specs[node.spec],
                slot=slot.index,
                zone=zone["zone"],
                restarts=slot.restarts,
                last_error=slot.last_error,
            )
            began = time.monotonic()
            handle = await self._backend_of(node).start(spec)
            await asyncio.to_thread(self._records.write_instance_status, instance_id, "STARTED")
            instance: Routable | None = None
            try:
                await handle.wait_started(self._start_timeout)
                await asyncio.to_thread(self._records.write_instance_status, instance_id, "PREPARING", handle.pid)
                await handle.wait_ready(max(0.0, self._start_timeout - (time.monotonic() - began)))
                if node.type == "docker":
                    instance = proxy_instance(node, instance_id, handle.address, handle.pid)
                else:
                    instance = Instance(handle, timeout=node.timeout)
                    await instance.connect()
            except BaseException:
                if instance is not None:
                    instance.close()
                await handle.stop()
                raise
        except (InstanceFailed, Unavailable) as exc:
            await asyncio.to_thread(self._records.write_failed, instance_id, str(exc))
            code = handle.returncode if handle is not None else None
            permanent = code in PERMANENT_EXIT_CODES or getattr(exc, "permanent", False)
            raise LaunchFailed(str(exc), permanent=permanent) from exc
        except Exception as exc:
            logger.exception("Node %s: the instance could not be started.", node.id)
            await asyncio.to_thread(
                self._records.write_failed, instance_id, f"The instance could not be started: {exc}"
            )
            raise LaunchFailed(f"The instance could not be started: {exc}", permanent=False) from exc
        if self._metrics is not None:
            self._metrics.instance_starts.labels(node.id).observe(time.monotonic() - began)
            if handle.load_seconds is not None:
                self._metrics.checkpoint_loads.labels(node.id).observe(handle.load_seconds)
        logger.info("Node %s: instance %s ready (slot %d, pid %s).", node.id, instance_id, slot.index, handle.pid)
        return _Running(handle, instance, self._specs[node.spec])

    async def _start(self, node: Node, slot: _Slot) -> None:
        try:
            running = await self._launch(node, slot)
        except LaunchFailed as exc:
            slot.starting = False
            await self._crashed(node.id, slot, exc.reason, permanent=exc.permanent)
            return
        slot.starting = False
        state = self._nodes.get(node.id)
        if self._closing or state is None or state.slots.get(slot.index) is not slot:
            running.instance.close()
            await running.handle.stop()
            await asyncio.to_thread(self._records.drop_instance, running.handle.instance_id)
            return
        running.watcher = self._spawn(self._watch(node.id, slot, running), f"watch-{running.handle.instance_id}")
        slot.running, slot.generation = running, node.generation
        self._publish(node.id)
        await asyncio.to_thread(
            self._records.write_instance_status, running.handle.instance_id, "HEALTHY", running.handle.pid
        )
        await self._update_node_status(node.id)

    def _backend_of(self, node: Node) -> Backend:
        if node.type == "cell" and node.container is not None:
            if self._kernels is None:
                raise InstanceFailed(
                    f"Node {node.id!r} runs in a kernel image, and this server runs no container backend.",
                    permanent=True,
                )
            return self._kernels
        if node.type != "docker":
            return self._backend
        if self._containers is None:
            raise InstanceFailed(
                f"Node {node.id!r} is a docker node, and this server runs no container backend.", permanent=True
            )
        return self._containers

    async def _watch(self, node_id: str, slot: _Slot, running: _Running) -> None:
        """While the instance runs: its health checks and metrics scrapes (a docker node's); then, once it has ended
        without being asked to, its replacement."""
        instance_id, handle = running.handle.instance_id, running.handle
        container = handle if isinstance(handle, ContainerHandle) else None
        if self._scraper is not None and container is not None and container.telemetry_port is not None:
            url = f"http://127.0.0.1:{container.telemetry_port}{container.telemetry_path}"
            self._scraper.add(node_id, instance_id, url)
        health = None
        if container is not None and container.health_check is not None:
            monitor = HealthMonitor(container.health_check, healthy=True)
            health = self._spawn(
                monitor.run(lambda healthy, why: self._health_changed(node_id, running, healthy, why)),
                f"health-{running.handle.instance_id}",
            )
        try:
            code = await running.handle.wait()
        finally:
            if health is not None:
                health.cancel()
            if self._scraper is not None:
                self._scraper.remove(instance_id)
        state = self._nodes.get(node_id)
        if self._closing or state is None or slot.running is not running:
            return
        slot.running = None
        # Not a cell instance's close(): a request still on it learns of the death from its broken connection, with
        # the exit code, rather than "taken out of service". A proxy's requests have failed already.
        if not isinstance(running.instance, Instance):
            running.instance.close()
        self._publish(node_id)
        await asyncio.to_thread(self._records.drop_instance, running.handle.instance_id)
        slot.restarts += 1
        if isinstance(running.instance, Instance) and running.instance.killed_by_front:
            # A cell that ignored the interrupt after a timeout: replace the instance, but it is not a crash.
            self._count_restart(node_id, "timeout")
            slot.last_error = "Killed after a request timed out and the cell ignored the interrupt."
            logger.warning(
                "Node %s: instance %s was killed after a timeout; replacing it.", node_id, running.handle.instance_id
            )
            await self._update_node_status(node_id)
            self.notify()
            return
        if running.hung:
            self._count_restart(node_id, "hang")
            reason = (
                f"Instance {running.handle.instance_id} did not answer a liveness check within "
                f"{self._liveness_timeout:g} s, so it was killed"
            )
            await self._crashed(node_id, slot, reason, permanent=False)
            return
        if running.over_memory:
            self._count_restart(node_id, "memory")
            await self._crashed(node_id, slot, running.over_memory, permanent=False)
            return
        if isinstance(running.handle, ContainerHandle) and running.handle.oom_killed:
            self._count_restart(node_id, "memory")
            reason = (
                f"Instance {running.handle.instance_id} passed its container's memory limit "
                f"({running.handle.memory_bytes} bytes), so the "
                "engine killed it. Give the node more memory (--memory, or a larger spec), or make its service use "
                "less."
            )
            await self._crashed(node_id, slot, reason, permanent=False)
            return
        self._count_restart(node_id, "crash")
        reason = f"Instance {running.handle.instance_id} exited with code {code}"
        last = running.handle.last_log_line()
        await self._crashed(node_id, slot, f"{reason}: {last}" if last else reason, permanent=False)

    async def _health_changed(self, node_id: str, running: _Running, healthy: bool, why: str) -> None:
        """A docker node's instance passed or failed its health check enough times in a row: in or out of rotation."""
        instance_id = running.handle.instance_id
        assert isinstance(running.instance, ProxiedInstance), "only docker nodes' instances have health checks"
        running.instance.is_alive = healthy
        if healthy:
            logger.info("Node %s: instance %s passes its health check again; back in rotation.", node_id, instance_id)
        else:
            logger.warning(
                "Node %s: instance %s failed its health check (%s); out of rotation.", node_id, instance_id, why
            )
        status, error = ("HEALTHY", "") if healthy else ("UNHEALTHY", f"Failed its health check: {why}")
        await asyncio.to_thread(self._records.write_instance_status, instance_id, status, None, error)
        await self._update_node_status(node_id)

    def _count_restart(self, node_id: str, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.restarts.labels(node_id, reason).inc()

    async def _crashed(self, node_id: str, slot: _Slot, reason: str, *, permanent: bool) -> None:
        state = self._nodes.get(node_id)
        if state is None or self._closing:
            return
        slot.last_error = reason
        now = time.monotonic()
        state.crashes = [t for t in state.crashes if now - t < CRASH_WINDOW] + [now]
        if permanent or len(state.crashes) >= MAX_CRASHES:
            state.failed, state.failed_at = True, state.generation
            logger.error("Node %s failed: %s", node_id, reason)
            await self._set_status(node_id, "FAILED", reason)
            return
        slot.not_before = now + 2 ** (len(state.crashes) - 1) * 0.5
        logger.warning("Node %s: %s; replacing the instance.", node_id, reason)
        await self._update_node_status(node_id)
        self.notify()

    async def _stop_slot(self, node_id: str, slot: _Slot) -> None:
        running, slot.running = slot.running, None
        if running is None:
            return
        self._publish(node_id)
        await asyncio.to_thread(self._records.write_instance_status, running.handle.instance_id, "DELETING")
        if running.watcher is not None:
            running.watcher.cancel()
        running.instance.close()
        await running.handle.stop()
        await asyncio.to_thread(self._records.drop_instance, running.handle.instance_id)

    async def _stop_node(self, node_id: str) -> None:
        state = self._nodes.pop(node_id, None)
        if state is not None:
            await asyncio.gather(*(self._stop_slot(node_id, slot) for slot in state.slots.values()))
        await self._backend.release(node_id)  # (the container backend keeps nothing per node)
        if self._kernels is not None:
            await self._kernels.release(node_id)

    async def _delete(self, node_id: str) -> None:
        self._table.remove(node_id)
        await self._stop_node(node_id)

        await asyncio.to_thread(self._records.drop_node, node_id)
        await asyncio.to_thread(shutil.rmtree, self._logs_dir / node_id, True)
        logger.info("Node %s deleted.", node_id)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
