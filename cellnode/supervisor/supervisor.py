"""The supervisor: reconciles the nodes in the store with running instances, and is the only writer of statuses.

A node wants `instance_count` instances, in slots 0..N-1. An empty slot gets an instance (after a backoff if the
slot's last one crashed); a slot past the count is drained and removed. Each instance's observed state is a row of
the `instances` table; each node's status follows from how many of its instances are healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update

from cellnode.backends.base import Backend, InstanceFailed, InstanceHandle, InstanceSpec
from cellnode.checkpoint.blobs import BlobStore
from cellnode.exceptions import Unavailable
from cellnode.router.instance import Instance
from cellnode.router.table import NodeRoute, RoutingTable
from cellnode.store.db import Database
from cellnode.store.models import Checkpoint, Instance as InstanceRow, Node, Usage, new_id, utcnow
from cellnode.supervisor.specs import REFERENCE_SPECS, Spec, count_cpus

logger = logging.getLogger("cellnode.supervisor")

RECONCILE_INTERVAL = 2.0
# Exit codes of `python -m cellnode.runtime` that no restart can fix (a corrupt or unloadable checkpoint).
PERMANENT_EXIT_CODES = {2, 3, 4}
CRASH_WINDOW = 60.0
MAX_CRASHES = 3
HOST = socket.gethostname()


class LaunchFailed(Exception):
    """An instance could not be started; `permanent` when no retry can help (a corrupt checkpoint, say)."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


@dataclass
class _Running:
    handle: InstanceHandle
    instance: Instance
    watcher: asyncio.Task[None] | None = None
    hung: bool = False  # killed because it did not answer a liveness check


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
    failed_generation: int = 0  # a rollout to this generation could not start an instance; wait for the next
    crashes: list[float] = field(default_factory=list)


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
    ) -> None:
        self._liveness_interval, self._liveness_timeout = liveness
        self._specs = specs if specs is not None else dict(REFERENCE_SPECS)
        self._cpus = count_cpus()
        self._db = db
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
        await asyncio.to_thread(self._mark_restarting)
        await self.reconcile()
        self._task = asyncio.create_task(self._run(), name="cellnode-supervisor")
        self._spawn(self._check_liveness(), "cellnode-liveness")

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
        """Every interval, ask each idle instance for a PONG; one that does not answer in time is killed (and so
        replaced), with the reason recorded."""
        while True:
            await asyncio.sleep(self._liveness_interval)
            checks = [
                (node_id, slot.running)
                for node_id, state in self._nodes.items()
                for slot in state.slots.values()
                if slot.running is not None
            ]
            answers = await asyncio.gather(*(running.instance.ping(self._liveness_timeout) for _, running in checks))
            for (node_id, running), is_alive in zip(checks, answers, strict=True):
                if not is_alive and running.instance.is_alive and not running.hung:
                    running.hung = True
                    logger.error(
                        "Node %s: instance %s did not answer a liveness check within %g s; replacing it.",
                        node_id,
                        running.handle.instance_id,
                        self._liveness_timeout,
                    )
                    running.handle.kill()

    async def reconcile(self) -> None:
        """One pass: bring routes and instances in line with the store."""
        nodes = await asyncio.to_thread(self._load_nodes)
        await asyncio.to_thread(self._touch_usage)
        wanted = {node.id for node in nodes if node.status != "DELETING"}
        for node in nodes:
            if node.status == "DELETING":
                await self._delete(node.id)
                continue
            self._put_route(node)
            state = self._nodes.setdefault(node.id, _NodeState())
            if node.suspended:
                await self._suspend(node.id, state)
                continue
            route = self._table.find(node.id)
            if route is not None and route.status in ("SUSPENDING", "SUSPENDED"):
                await self._set_status(node.id, "RESUMING", "Starting instances from the pinned checkpoint.")
            for index in [i for i in state.slots if i >= node.instance_count]:
                await self._stop_slot(node.id, state.slots.pop(index))
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
            await asyncio.to_thread(self._write_rollout_error, node.id, slot.last_error)
            await self._set_status(node.id, "UNHEALTHY", slot.last_error + " The previous version keeps serving.")
            return
        if self._closing or state.slots.get(slot.index) is not slot:
            new.instance.close()
            await new.handle.stop()
            await asyncio.to_thread(self._drop_instance, new.handle.instance_id)
            return
        old, slot.running, slot.generation, slot.replacing = slot.running, new, node.generation, False
        new.watcher = self._spawn(self._watch(node.id, slot, new), f"watch-{new.handle.instance_id}")
        self._publish(node.id)
        await asyncio.to_thread(self._write_instance, node.id, new.handle.instance_id, slot, "HEALTHY", new.handle.pid)
        if old is not None:
            await self._drain(node.id, old, node.timeout)
        logger.info("Node %s: slot %d now runs generation %d.", node.id, slot.index, node.generation)
        await self._update_node_status(node.id)

    async def _drain(self, node_id: str, old: _Running, timeout: float) -> None:
        """Out of the route already: wait for its requests to finish (within the node's timeout), then stop it."""
        await asyncio.to_thread(self._write_instance_status, old.handle.instance_id, "DELETING")
        deadline = time.monotonic() + timeout + 5
        while old.instance.outstanding and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if old.watcher is not None:
            old.watcher.cancel()
        old.instance.close()
        await old.handle.stop()
        await asyncio.to_thread(self._drop_instance, old.handle.instance_id)

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

    # -- store access (in worker threads)

    def _mark_restarting(self) -> None:
        """Statuses left by a previous server say nothing of instances that no longer exist."""
        with self._db.session() as session:
            session.execute(delete(InstanceRow))
            # Its instances' uptime ended, at the latest, when that server was last seen alive.
            session.execute(update(Usage).where(Usage.ended_at.is_(None)).values(ended_at=Usage.last_seen_at))
            session.execute(
                update(Node)
                .where(Node.status.in_(("HEALTHY", "UNHEALTHY")))
                .values(status="UNHEALTHY", status_message="The server started again; starting instances.")
            )

    def _load_nodes(self) -> list[Node]:
        with self._db.session() as session:
            return list(session.scalars(select(Node)))

    def _touch_usage(self) -> None:
        with self._db.session() as session:
            session.execute(update(Usage).where(Usage.ended_at.is_(None)).values(last_seen_at=utcnow()))

    def _open_usage(self, node: Node, instance_id: str) -> None:
        spec = self._specs[node.spec]
        with self._db.session() as session:
            session.add(
                Usage(
                    instance_id=instance_id,
                    node_id=node.id,
                    folder_id=node.folder_id,
                    spec=spec.name,
                    units_per_second=spec.units_per_second,
                )
            )

    def _write_instance(self, node_id: str, instance_id: str, slot: _Slot, status: str, pid: int | None) -> None:
        with self._db.session() as session:
            row = session.get(InstanceRow, instance_id)
            if row is None:
                if session.get(Node, node_id) is None:
                    return
                row = InstanceRow(id=instance_id, node_id=node_id, slot=slot.index, host=HOST)
                session.add(row)
            row.status, row.status_since, row.pid = status, utcnow(), pid
            row.restarts, row.last_error, row.generation = slot.restarts, slot.last_error, slot.generation

    def _write_rollout_error(self, node_id: str, error: str) -> None:
        with self._db.session() as session:
            session.execute(update(Node).where(Node.id == node_id).values(rollout_error=error))

    def _write_instance_status(self, instance_id: str, status: str) -> None:
        with self._db.session() as session:
            session.execute(
                update(InstanceRow).where(InstanceRow.id == instance_id).values(status=status, status_since=utcnow())
            )

    def _drop_instance(self, instance_id: str) -> None:
        """The instance is gone: forget its row and end its uptime."""
        with self._db.session() as session:
            session.execute(delete(InstanceRow).where(InstanceRow.id == instance_id))
            session.execute(
                update(Usage)
                .where(Usage.instance_id == instance_id, Usage.ended_at.is_(None))
                .values(ended_at=utcnow())
            )

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
        )
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
        healthy = sum(1 for slot in state.slots.values() if slot.running is not None)
        wanted = len(state.slots)
        if healthy >= wanted:
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

        def write() -> None:
            # One conditional UPDATE: a delete that lands meanwhile is never overwritten.
            with self._db.session() as session:
                session.execute(
                    update(Node)
                    .where(Node.id == node_id, Node.status != "DELETING")
                    .values(status=status, status_message=message, updated_at=utcnow())
                )

        await asyncio.to_thread(write)

    # -- instances

    async def _launch(self, node: Node, slot: _Slot) -> _Running:
        """Start one instance of the node's current generation and wait until it answers; LaunchFailed if not."""
        handle: InstanceHandle | None = None
        instance_id = new_id()
        try:
            spec = await asyncio.to_thread(self._instance_spec, node, instance_id)
            await asyncio.to_thread(self._write_instance, node.id, instance_id, slot, "PREPARING", None)
            await asyncio.to_thread(self._open_usage, node, instance_id)
            handle = await self._backend.start(spec)
            instance = Instance(handle, timeout=node.timeout)
            try:
                await handle.wait_ready(self._start_timeout)
                await instance.connect()
            except BaseException:
                instance.close()
                await handle.stop()
                raise
        except (InstanceFailed, Unavailable) as exc:
            await asyncio.to_thread(self._drop_instance, instance_id)
            code = handle.returncode if handle is not None else None
            raise LaunchFailed(str(exc), permanent=code in PERMANENT_EXIT_CODES) from exc
        except Exception as exc:
            logger.exception("Node %s: the instance could not be started.", node.id)
            await asyncio.to_thread(self._drop_instance, instance_id)
            raise LaunchFailed(f"The instance could not be started: {exc}", permanent=False) from exc
        logger.info("Node %s: instance %s ready (slot %d, pid %s).", node.id, instance_id, slot.index, handle.pid)
        return _Running(handle, instance)

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
            await asyncio.to_thread(self._drop_instance, running.handle.instance_id)
            return
        running.watcher = self._spawn(self._watch(node.id, slot, running), f"watch-{running.handle.instance_id}")
        slot.running, slot.generation = running, node.generation
        self._publish(node.id)
        await asyncio.to_thread(
            self._write_instance, node.id, running.handle.instance_id, slot, "HEALTHY", running.handle.pid
        )
        await self._update_node_status(node.id)

    def _instance_spec(self, node: Node, instance_id: str) -> InstanceSpec:
        spec = self._specs.get(node.spec)
        if spec is None:
            raise InstanceFailed(
                f"Spec {node.spec!r} of the node is not in this server's spec table; add it back to the table, "
                "or update the node to another spec."
            )
        with self._db.session() as session:
            checkpoint = session.get(Checkpoint, node.checkpoint_id)
            if checkpoint is None:
                raise InstanceFailed(f"Checkpoint {node.checkpoint_id!r} of the node no longer exists.")
            variables = [
                {"name": v["name"], "path": str(self._blobs.path(v["sha256"])), "sha256": v["sha256"]}
                for v in checkpoint.variables
            ]
            imports = dict(checkpoint.imports)
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
        return InstanceSpec(
            node_id=node.id,
            instance_id=instance_id,
            launch=launch,
            log_path=self._logs_dir / node.id,
            env=spec.environment(self._cpus),
        )

    async def _watch(self, node_id: str, slot: _Slot, running: _Running) -> None:
        code = await running.handle.wait()
        state = self._nodes.get(node_id)
        if self._closing or state is None or slot.running is not running:
            return
        slot.running = None
        # Not instance.close(): a request still on it learns of the death from its broken connection, with the
        # exit code, rather than "taken out of service".
        self._publish(node_id)
        await asyncio.to_thread(self._drop_instance, running.handle.instance_id)
        slot.restarts += 1
        if running.instance.killed_by_front:
            # A cell that ignored the interrupt after a timeout: replace the instance, but it is not a crash.
            slot.last_error = "Killed after a request timed out and the cell ignored the interrupt."
            logger.warning("Node %s: instance %s was killed after a timeout; replacing it.", node_id, code)
            await self._update_node_status(node_id)
            self.notify()
            return
        if running.hung:
            reason = (
                f"Instance {running.handle.instance_id} did not answer a liveness check within "
                f"{self._liveness_timeout:g} s, so it was killed"
            )
            await self._crashed(node_id, slot, reason, permanent=False)
            return
        reason = f"Instance {running.handle.instance_id} exited with code {code}"
        last = running.handle.last_log_line()
        await self._crashed(node_id, slot, f"{reason}: {last}" if last else reason, permanent=False)

    async def _crashed(self, node_id: str, slot: _Slot, reason: str, *, permanent: bool) -> None:
        state = self._nodes.get(node_id)
        if state is None or self._closing:
            return
        slot.last_error = reason
        now = time.monotonic()
        state.crashes = [t for t in state.crashes if now - t < CRASH_WINDOW] + [now]
        if permanent or len(state.crashes) >= MAX_CRASHES:
            state.failed = True
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
        if running.watcher is not None:
            running.watcher.cancel()
        running.instance.close()
        await running.handle.stop()
        await asyncio.to_thread(self._drop_instance, running.handle.instance_id)

    async def _stop_node(self, node_id: str) -> None:
        state = self._nodes.pop(node_id, None)
        if state is not None:
            await asyncio.gather(*(self._stop_slot(node_id, slot) for slot in state.slots.values()))
        await self._backend.release(node_id)

    async def _delete(self, node_id: str) -> None:
        self._table.remove(node_id)
        await self._stop_node(node_id)

        def drop() -> None:
            with self._db.session() as session:
                session.execute(delete(InstanceRow).where(InstanceRow.node_id == node_id))
                node = session.get(Node, node_id)
                if node is not None:
                    session.delete(node)

        await asyncio.to_thread(drop)
        await asyncio.to_thread(shutil.rmtree, self._logs_dir / node_id, True)
        logger.info("Node %s deleted.", node_id)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
