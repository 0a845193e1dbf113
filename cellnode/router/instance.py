"""What the front routes a request to: one running instance of a cell node, behind a persistent channel.

`Instance.execute` turns the instance's answer frames into the API's errors, enforces the node's timeout (interrupting
the cell, then killing an instance that ignores the interrupt), and marks the instance dead when its connection
breaks, so that the router stops choosing it and the supervisor replaces it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import orjson

from cellnode.backends.base import InstanceHandle
from cellnode.exceptions import CellExecutionError, DeadlineExceeded, InternalError, OutputError, Unavailable
from cellnode.router.channel import Answer, InstanceChannel
from cellnode.runtime.protocol import CELL_ERROR, EXECUTE, EXECUTE_ID, FAILURE, OK, OUTPUT_ERROR, PING, PONG, REQUEST_ID

DEFAULT_INTERRUPT_GRACE = 5.0
TIMED_OUT = "Node {node!r} did not answer within its timeout of {timeout:g} s; {what}."


class NotStarted(Unavailable):
    """The instance died or went out of service before this request reached it: another instance may take it."""


class Instance:
    """One instance, as the front sees it.

    Build it once `handle.wait_ready()` has returned: an instance that refuses the connection is taken for dead.

    Parameters:
        handle: the backend's handle of the running instance (its socket address, its process).
        timeout: the node's timeout in seconds, named in DeadlineExceeded messages.
        interrupt_grace: how long a cell may take to stop after SIGINT before its instance is killed.
    """

    def __init__(
        self, handle: InstanceHandle, *, timeout: float, interrupt_grace: float = DEFAULT_INTERRUPT_GRACE
    ) -> None:
        self.handle = handle
        self.timeout = timeout
        self.interrupt_grace = interrupt_grace
        self._channel = InstanceChannel(handle.address)
        self._outstanding = 0
        # True once the front killed the process itself (a cell that ignored the interrupt): not a crash.
        self.killed_by_front = False
        self._is_alive = True
        self._death = ""
        self._kill_reason = ""  # why the supervisor killed it (a memory cap), for the request it was running
        self._died = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def instance_id(self) -> str:
        return self.handle.instance_id

    @property
    def node_id(self) -> str:
        return self.handle.node_id

    @property
    def pid(self) -> int | None:
        return self.handle.pid

    @property
    def is_alive(self) -> bool:
        """False once the instance died or its connection broke; a dead Instance never becomes alive again."""
        return self._is_alive

    @property
    def outstanding(self) -> int:
        """Requests queued on or running in this instance."""
        return self._outstanding

    async def connect(self) -> None:
        """Open the persistent connection; Unavailable if the instance does not accept it."""
        if not self._channel.is_connected:
            try:
                await self._channel.connect()
            except ConnectionError as exc:
                raise await self._die("it refused the connection") from exc

    async def execute(self, input_json: bytes, *, deadline: float, request_id: str | None = None) -> bytes:
        """Run the cell on `input_json` (a checked JSON object); the OK payload, the JSON object of the outputs.

        `deadline` is the `loop.time()` value by which the answer is due, counting the wait for the instance.
        `request_id` (1 to 32 of `[A-Za-z0-9_-]`) goes to the instance, which puts it on the log lines of the request.
        Raises CellExecutionError, OutputError, DeadlineExceeded, Unavailable or InternalError.
        """
        if request_id is None:
            kind, prefix = EXECUTE, b""
        else:
            prefix = request_id.encode() + b"\n"
            assert REQUEST_ID.fullmatch(prefix, 0, len(prefix) - 1), f"request_id {request_id!r} is not valid"
            kind = EXECUTE_ID
        self._outstanding += 1
        try:
            if not self._is_alive:
                raise NotStarted(await self._describe_death())
            if not self._channel.is_connected:
                try:
                    await self.connect()
                except Unavailable as exc:
                    raise NotStarted(exc.message) from exc
            try:
                answer = await self._channel.submit(kind, input_json, deadline=deadline, prefix=prefix)
            except TimeoutError:
                raise DeadlineExceeded(self._timed_out("the request was still waiting for the instance")) from None
            except ConnectionError as exc:
                raise NotStarted((await self._die("its connection broke")).message) from exc
            if not answer.done():
                try:
                    await asyncio.wait((answer,), timeout=deadline - asyncio.get_running_loop().time())
                except asyncio.CancelledError:
                    # The caller left (a gRPC cancel), so no one will read the answer: the cell is interrupted now,
                    # and the instance counts as busy until it has stopped.
                    self._outstanding += 1
                    self._spawn(self._abandon(answer))
                    raise
                if not answer.done():
                    raise await self._interrupt(answer)
            try:
                kind, payload = answer.result()
            except ConnectionError as exc:
                raise await self._die("its connection broke while the cell ran") from exc
            return self._result(kind, payload)
        finally:
            self._outstanding -= 1

    async def ping(self, timeout: float) -> bool:
        """Liveness: whether an idle instance answers PING within `timeout`. A busy one is not asked (the request's
        own deadline watches it), and counts as alive."""
        if not self._is_alive or self._outstanding or not self._channel.is_connected:
            return self._is_alive
        self._outstanding += 1  # while it is asked, requests prefer the other instances
        try:
            kind, _ = await asyncio.wait_for(self._channel.request(PING), timeout)
        except (TimeoutError, ConnectionError):
            return False
        finally:
            self._outstanding -= 1
        return kind == PONG

    def close(self) -> None:
        """Close the connection and take this Instance out of service; the process is the supervisor's to stop."""
        if self._is_alive:
            self._is_alive = False
            self._death = f"Instance {self.instance_id!r} of node {self.node_id!r} was taken out of service."
            self._died.set()
        self._channel.close()

    def _result(self, kind: int, payload: bytes) -> bytes:
        if kind == OK:
            return payload
        if kind == CELL_ERROR:
            try:
                error = orjson.loads(payload)
                name, message, traceback = error["error_name"], error["error_message"], error["traceback"]
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise InternalError(f"Instance {self.instance_id!r} sent a malformed CELL_ERROR frame: {exc}.") from exc
            raise CellExecutionError.from_cell(name, message, traceback)
        message = _message(payload)
        if kind == OUTPUT_ERROR:
            raise OutputError(message)
        if kind == FAILURE:
            raise InternalError(f"Instance {self.instance_id!r} of node {self.node_id!r} failed: {message}")
        raise InternalError(
            f"Instance {self.instance_id!r} of node {self.node_id!r} answered with frame kind {kind!r} "
            f"({message}); only the front interrupts cells, on a timeout."
        )

    async def _interrupt(self, answer: asyncio.Future[Answer]) -> DeadlineExceeded:
        # We wait for the interrupted answer, whatever it is, so that the connection stays in step.
        self.handle.interrupt()
        await asyncio.wait((answer,), timeout=self.interrupt_grace)
        if answer.done() and not answer.exception():
            return DeadlineExceeded(self._timed_out("the cell was interrupted"))
        reason = f"the cell ignored the interrupt for {self.interrupt_grace:g} s, so its instance was killed"
        self.killed_by_front = True
        if answer.done():
            reason = "the cell was interrupted and its instance died"
        await self._die(reason)
        return DeadlineExceeded(self._timed_out(reason))

    async def _abandon(self, answer: asyncio.Future[Answer]) -> None:
        try:
            if not answer.done():
                await self._interrupt(answer)
        finally:
            self._outstanding -= 1

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def kill(self, reason: str) -> None:
        """End the instance at once for `reason`, which the request it was running is told."""
        self._kill_reason = reason
        self.handle.kill()

    async def _die(self, reason: str) -> Unavailable:
        """Mark the instance dead, make sure its process ends, and describe it."""
        if self._is_alive:
            self._is_alive = False
            self._channel.close()
            self.handle.kill()
            try:
                code: int | None = await asyncio.wait_for(self.handle.wait(), 5.0)
            except TimeoutError:
                code = self.handle.returncode
            ended = self._kill_reason or f"it exited with code {code}. The node's log has its output."
            self._death = f"Instance {self.instance_id!r} of node {self.node_id!r} is unavailable: {reason}; {ended}"
            self._died.set()
        return Unavailable(await self._describe_death())

    async def _describe_death(self) -> str:
        await self._died.wait()
        return self._death

    def _timed_out(self, what: str) -> str:
        return TIMED_OUT.format(node=self.node_id, timeout=self.timeout, what=what)


def _message(payload: bytes) -> str:
    try:
        message = orjson.loads(payload)["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return payload.decode("utf-8", "replace")
    return str(message)
