"""Load-balancer health checks of container instances: HTTP GET or `grpc.health.v1`, pure asyncio.

A `HealthCheck` is the node's healthcheck form (kind, port, path, timeout, interval, thresholds). A `Prober` runs one
check at a time against one instance over a connection it keeps (an httpx client, a gRPC channel). A `HealthMonitor`
holds the state with load-balancer semantics: an instance starts unknown and out of rotation, becomes healthy after
`passes_threshold` consecutive successes, and unhealthy (out of rotation) after `fails_threshold` consecutive
failures; its `run()` probes every `interval` and reports each flip.

    monitor = HealthMonitor(HealthCheck("http", 8080, "/health-check"), healthy=True)
    task = asyncio.create_task(monitor.run(on_change=lambda healthy, why: print(healthy, why)))
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import httpx
from grpc_health.v1 import health_pb2

KINDS = ("http", "grpc")
MAX_TIMEOUT = 60.0
MAX_INTERVAL = 3600.0
MAX_THRESHOLD = 100
READY_PROBE_INTERVAL = 1.0  # seconds between readiness probes at most; in rotation, checks run every interval
# A gRPC channel backs off between failed connects (up to 120 s by default); an instance that is still starting
# must be seen as soon as it listens.
GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_http_proxy", 0),
]

HEALTH_CHECK = "/grpc.health.v1.Health/Check"

OnChange = Callable[[bool, str], object]


@dataclass(frozen=True)
class HealthCheck:
    """A load-balancer health check of one instance port.

    Parameters:
        kind: "http" (GET, healthy on 2xx) or "grpc" (`grpc.health.v1.Health/Check`, healthy on SERVING).
        port: the port checked.
        path: the HTTP path ("/health-check"), or for gRPC the service name checked ("" is the whole server).
        timeout: seconds one check may take.
        interval: seconds between the starts of two checks.
        fails_threshold: consecutive failures that take a healthy instance out of rotation.
        passes_threshold: consecutive successes that put an instance into rotation.
    """

    kind: str
    port: int
    path: str = ""
    timeout: float = 1.0
    interval: float = 15.0
    fails_threshold: int = 3
    passes_threshold: int = 3

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Health check kind {self.kind!r} is not supported; it must be 'http' or 'grpc'.")
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            raise ValueError(f"Health check port {self.port!r} is out of range; it must be an integer in 1..65535.")
        if not isinstance(self.path, str) or (self.kind == "http" and not self.path.startswith("/")):
            raise ValueError(
                f"Health check path {self.path!r} is not valid; an HTTP check needs a path starting with '/' "
                "(such as '/health-check'), a gRPC check a service name ('' checks the whole server)."
            )
        for name, value, most in (("timeout", self.timeout, MAX_TIMEOUT), ("interval", self.interval, MAX_INTERVAL)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= most:
                raise ValueError(f"Health check {name} {value!r} is out of range; it must be > 0 and <= {most:g} s.")
        for name, count in (("fails_threshold", self.fails_threshold), ("passes_threshold", self.passes_threshold)):
            if type(count) is not int or not 1 <= count <= MAX_THRESHOLD:
                raise ValueError(
                    f"Health check {name} {count!r} is out of range; it must be an integer in 1..{MAX_THRESHOLD}."
                )


class Prober:
    """Runs `check` against `host`, one check at a time, over one connection pool or channel it keeps."""

    def __init__(self, check: HealthCheck, host: str = "127.0.0.1") -> None:
        self.check = check
        self.host = host
        self._http: httpx.AsyncClient | None = None
        self._channel: grpc.aio.Channel | None = None
        self._check: grpc.aio.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]

    async def probe(self) -> tuple[bool, str]:
        """One check, bounded by the check's timeout: whether it passed, and what it saw (why it failed)."""
        timeout = self.check.timeout
        try:
            async with asyncio.timeout(timeout):
                if self.check.kind == "http":
                    return await self._probe_http()
                return await self._probe_grpc()
        except (TimeoutError, httpx.TimeoutException):
            return False, f"timed out after {timeout:g} s"

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _probe_http(self) -> tuple[bool, str]:
        if self._http is None:
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            self._http = httpx.AsyncClient(timeout=self.check.timeout, limits=limits, trust_env=False)
        path = self.check.path
        try:
            response = await self._http.get(f"http://{self.host}:{self.check.port}{path}")
        except httpx.ConnectError as exc:
            return False, _connect_failure(exc)
        except httpx.TimeoutException:
            raise
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return 200 <= response.status_code < 300, f"HTTP {response.status_code} from {path}"

    async def _probe_grpc(self) -> tuple[bool, str]:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"{self.host}:{self.check.port}", options=GRPC_OPTIONS)
            self._check = self._channel.unary_unary(
                HEALTH_CHECK,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
        request = health_pb2.HealthCheckRequest(service=self.check.path)
        try:
            reply = await self._check(request, timeout=self.check.timeout)
        except grpc.aio.AioRpcError as exc:
            return False, _rpc_failure(exc, self.check)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def _connect_failure(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:  # httpx says "All connection attempts failed"; what failed is further down
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    return f"cannot connect: {exc}"


def _rpc_failure(exc: grpc.aio.AioRpcError, check: HealthCheck) -> str:
    code, details = exc.code(), exc.details() or ""
    # The connect can time out first: "connection attempt timed out before receiving SETTINGS frame".
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or (code == grpc.StatusCode.UNAVAILABLE and "timed out" in details):
        return f"timed out after {check.timeout:g} s"
    if code == grpc.StatusCode.UNAVAILABLE and "refused" in details.lower():
        return "connection refused"
    if code == grpc.StatusCode.NOT_FOUND:
        return f"the health server does not know service {check.path!r} (NOT_FOUND)"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "the server does not implement grpc.health.v1.Health (UNIMPLEMENTED)"
    return f"{code.name}: {details}"


async def probe(check: HealthCheck, host: str = "127.0.0.1") -> tuple[bool, str]:
    """One check on a connection of its own; a monitor keeps a `Prober` instead, so its connection is reused."""
    prober = Prober(check, host)
    try:
        return await prober.probe()
    finally:
        await prober.aclose()


async def port_open(host: str, port: int, timeout: float) -> bool:
    """Whether `host:port` accepts a TCP connection within `timeout` seconds (readiness without a health check)."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class HealthMonitor:
    """The health of one instance with load-balancer semantics (see the module docstring).

    `healthy` is None while unknown (never yet in rotation), then True or False. `record()` is the pure state
    machine; `run()` probes every `check.interval` and feeds it.

    Parameters:
        check: what to probe.
        host: the address the instance listens on.
        healthy: the state to start in; True for an instance that has just passed its readiness checks.
    """

    def __init__(self, check: HealthCheck, host: str = "127.0.0.1", *, healthy: bool | None = None) -> None:
        self.check = check
        self.host = host
        self.healthy = healthy
        self.passes = 0
        self.fails = 0
        self.last_error = ""

    @property
    def in_rotation(self) -> bool:
        return self.healthy is True

    def record(self, ok: bool, why: str = "") -> bool | None:
        """Count one check's result; the new state if it flips the instance into or out of rotation, else None."""
        if ok:
            self.passes, self.fails = self.passes + 1, 0
            if self.healthy is not True and self.passes >= self.check.passes_threshold:
                self.healthy = True
                return True
        else:
            self.passes, self.fails = 0, self.fails + 1
            self.last_error = why
            if self.healthy is not False and self.fails >= self.check.fails_threshold:
                self.healthy = False
                return False
        return None

    async def run(self, on_change: OnChange | None = None) -> None:
        """Probe every interval until cancelled; call `on_change(healthy, why)` (sync or async) on each flip."""
        prober = Prober(self.check, self.host)
        loop = asyncio.get_running_loop()
        try:
            while True:
                began = loop.time()
                ok, why = await prober.probe()
                changed = self.record(ok, why)
                if changed is not None and on_change is not None:
                    result = on_change(changed, why)
                    if inspect.isawaitable(result):
                        await result
                await asyncio.sleep(max(0.0, self.check.interval - (loop.time() - began)))
        finally:
            await prober.aclose()


async def wait_until_ready(
    check: HealthCheck | None, host: str, port: int, timeout: float, *, ended: asyncio.Future[Any] | None = None
) -> str | None:
    """Wait for a new instance to be ready: None once it is, else why not (the last check's error) when `timeout`
    passes or `ended` (the instance's exit) resolves first.

    With a check, ready is `passes_threshold` passes in a row, probed every `interval` but at most every second, so
    that a new instance joins the rotation in seconds; without one, ready is `port` accepting a connection.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    prober = Prober(check, host) if check is not None else None
    monitor = HealthMonitor(check, host) if check is not None else None
    delay, why = 0.05, f"port {port} accepted no connection"
    try:
        while ended is None or not ended.done():
            if prober is not None and monitor is not None:
                ok, why = await prober.probe()
                if monitor.record(ok, why):
                    return None
                step = min(monitor.check.interval, READY_PROBE_INTERVAL)
            else:
                ok = await port_open(host, port, min(1.0, max(0.05, deadline - loop.time())))
                if ok:
                    return None
                step = READY_PROBE_INTERVAL
            if loop.time() >= deadline:
                break
            if not ok:
                step, delay = min(delay, step), delay * 2  # not up yet: look again soon
            pause = min(step, max(0.0, deadline - loop.time()))
            if ended is not None:
                await asyncio.wait([ended], timeout=pause)
            else:
                await asyncio.sleep(pause)
        return why
    finally:
        if prober is not None:
            await prober.aclose()
