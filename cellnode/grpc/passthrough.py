"""The gRPC pass-through to container instances with a gRPC endpoint: a `GrpcProxyInstance` per instance, with one
channel to it.

`GrpcProxyInstance.forward` passes one call of any method of the user's service through to the instance, and its
answer back, as it flows. On the wire the four kinds of call are one: a stream of messages each way, so every call
goes upstream as a stream-stream call of raw bytes (no (de)serializers), whatever the caller's stub is:

- the method as the caller named it, and the caller's metadata minus `authorization` (the caller's credential for
  cellnode, not for the node), the transport's own keys (`:`-pseudo-headers, `grpc-*`, `te`, `content-type`,
  `user-agent`, which the channel sets itself) and the caller's `x-request-id`, replaced by cellnode's. `x-folder-id`,
  `x-node-id` and `x-node-alias` go on, so that the service may know how it was called; `-bin` keys keep their bytes;
- the request messages one by one as the caller sends them, each at most `max_message` (16 MB);
- back: the instance's initial metadata, its messages one by one (each at most 16 MB), its status code and details
  and its trailing metadata (with `grpc-status-details-bin`, the service's rich error details), plus cellnode's
  `x-request-id`. A slow caller slows the reading from the instance: we hold one message at a time, and HTTP/2 flow
  control holds back the rest.

Time. `deadline` (a `loop.time()` value: the node's timeout or the caller's deadline, whichever comes first) bounds
the whole call and goes upstream as the call's gRPC deadline, so the service sees it too.

Errors. The instance's own statuses go back as they are. cellnode's errors are raised as APIErrors, for the front to
end the call with (`cellnode.grpc.rpc.abort`), even after messages went back, which gRPC allows: NotStarted (the
instance accepts no connection, or was taken out of service: nothing was sent and no request message read, so another
instance may take the call), Unavailable (the connection broke during the call), DeadlineExceeded (naming the node's
timeout), PayloadTooLarge (a message over 16 MB either way). A caller that cancels cancels the upstream call.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from cellnode.config import MAX_MESSAGE_BYTES
from cellnode.exceptions import APIError, DeadlineExceeded, PayloadTooLarge, Unavailable
from cellnode.router.instance import TIMED_OUT, NotStarted
from cellnode.router.proxied import ProxiedInstance

Metadata = Sequence[tuple[str, str | bytes]]

# Keys the transport sets itself or that describe the caller's hop, never the call; with any ":" or "grpc-" key.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "content-length",
        "content-type",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
    }
)
REQUEST_DROPPED = HOP_BY_HOP | {"authorization", "x-request-id"}
RESPONSE_DROPPED = HOP_BY_HOP | {"date", "server", "x-request-id", "x-cellnode-error"}
STATUS_DETAILS = "grpc-status-details-bin"  # the one reserved key the service sets, for its rich error details
DEFAULT_IDLE_TIMEOUT = 300.0
# A status of DEADLINE_EXCEEDED this close to the deadline is the deadline's (gRPC's timer may fire a little early).
DEADLINE_SLACK = 0.05
# How long past the deadline our own timer waits for gRPC's, which ends the upstream call with DEADLINE_EXCEEDED
# for the service to see; ours only ends a call stuck on a caller that does not read.
DEADLINE_GRACE = 0.1
# The client transport's wording for a message over the channel's receive limit, and for a connection that broke
# under a call. A service's own status that reads alike is taken for the transport's: it keeps its code.
TRANSPORT_TOO_LARGE = "Received message larger than max"
TRANSPORT_BROKE = re.compile(
    "^Stream removed|Socket closed|Connection reset|Broken pipe|GOAWAY received|failed to connect to all addresses"
)

REQUEST_TOO_LARGE = "The request message is {size} bytes, over the {mb:g} MB limit ({limit} bytes); send less data."
ANSWER_TOO_LARGE = (
    "Instance {instance!r} of node {node!r} sent a message of {size} bytes, over the {mb:g} MB limit of a message "
    "({limit} bytes); make the service send smaller messages (stream them)."
)


class GrpcProxyInstance(ProxiedInstance):
    """One container instance with a gRPC endpoint, as the front routes to it.

    It has the surface `NodeRoute.choose()` reads (`instance_id`, `node_id`, `timeout`, `is_alive`, `outstanding`)
    and one `grpc.aio` channel (one HTTP/2 connection), opened by the first call and kept for its lifetime;
    `close()` ends both. Build and use it in the event loop that serves the calls: a channel belongs to its loop.

    Parameters:
        instance_id, node_id: the instance and its node, named in error messages.
        address: the endpoint's `127.0.0.1:PORT` (the container handle's `address`); only loopback is accepted.
        timeout: the node's endpoint timeout in seconds, named in DeadlineExceeded messages.
        idle_timeout: seconds without a call after which the channel closes its connection (the next call opens
            a new one).
        max_message: the largest message passed on, either way, in bytes.

    Example:
        instance = GrpcProxyInstance("i1", "n1", handle.address, timeout=15.0)
        code = await instance.forward(method, requests, context, deadline=loop.time() + 15.0, request_id=rid)
    """

    def __init__(
        self,
        instance_id: str,
        node_id: str,
        address: str,
        timeout: float,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_message: int = MAX_MESSAGE_BYTES,
    ) -> None:
        assert 0 < max_message < 2**30, f"max_message {max_message!r} must be between 1 byte and 1 GiB"
        super().__init__(instance_id, node_id, address, timeout)
        self.max_message = max_message
        # Up to twice the limit the transport takes a message, so that ours (which names the limit) refuses it.
        transport_limit = 2 * max_message
        self._options: list[tuple[str, Any]] = [
            ("grpc.enable_http_proxy", 0),
            # A channel of its own, not one shared with any other channel to the same address: close() ends it.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.client_idle_timeout_ms", max(1, round(idle_timeout * 1000))),
            ("grpc.max_receive_message_length", transport_limit),
            ("grpc.max_send_message_length", transport_limit),
            # Loopback reconnects cost little; the default backoff (1 s, up to 120 s) would refuse calls for long.
            # Not grpc.min_reconnect_backoff_ms: Core takes it for the connect timeout too (20 s by default).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._channel: grpc.aio.Channel | None = None

    async def _shut(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def forward(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        deadline: float,
        request_id: str,
        trailing_metadata: Metadata = (),
    ) -> grpc.StatusCode:
        """Pass the call of `method` (`/pkg.Service/Method`) to the instance, and its answer back through `context`;
        the status code the call ended with, for the metrics.

        `requests` are the caller's raw request messages (the stream-stream handler's request iterator); `deadline`
        is the `loop.time()` by which the whole call must end; `request_id` goes to the instance as `x-request-id`
        and back to the caller in the trailing metadata, with `trailing_metadata` (the alias front's `x-node-id`,
        say). Raises NotStarted, Unavailable, DeadlineExceeded or PayloadTooLarge (see the module docstring); after
        NotStarted no request message was read, so another instance may be given the same `requests`.
        """
        if self._closing is not None:
            raise NotStarted(f"Instance {self.instance_id!r} of node {self.node_id!r} was taken out of service.")
        self._outstanding += 1
        try:
            return await self._forward(method, requests, context, deadline, request_id, trailing_metadata)
        finally:
            self._outstanding -= 1

    async def _forward(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
        deadline: float,
        request_id: str,
        extra: Metadata,
    ) -> grpc.StatusCode:
        loop = asyncio.get_running_loop()
        channel = self._open()
        try:
            async with asyncio.timeout_at(deadline):
                await self._connect(channel)
        except TimeoutError:
            raise DeadlineExceeded(self._timed_out("the call was still waiting for a connection")) from None
        metadata = _metadata(context.invocation_metadata() or (), REQUEST_DROPPED, request_id)
        call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(method)(
            metadata=metadata, timeout=max(deadline - loop.time(), 0.001)
        )
        sender = _Sender(call, self.max_message)
        pump = loop.create_task(sender.send(requests))
        # A write that fails because the service has just ended the call sets the call's status to INTERNAL "Internal
        # error from Core" (grpc/grpc#36066), over the service's if that came first. Once the call has ended, no
        # write is needed: the sender is stopped at once, in the callback that sets the status, so that grpc never
        # sees its failed write. If the failed write comes first, the service's status replaces its INTERNAL once
        # the answer has been read to its end.
        call.add_done_callback(lambda _: _stop(pump))
        try:
            async with asyncio.timeout_at(deadline + DEADLINE_GRACE):
                # The headers go on as they come, before any message: a client may wait for them.
                await context.send_initial_metadata(_metadata(await call.initial_metadata(), RESPONSE_DROPPED))
                # Not `call.read()`: once the call has a status (that INTERNAL) it stops reading, and the messages
                # still to be read, and the service's status behind them, would be lost.
                async for message in call:
                    if len(message) > self.max_message:
                        raise PayloadTooLarge(self._answer_too_large(str(len(message))))
                    await context.write(message)
                code, details = grpc.StatusCode.OK, ""
                trailing: Metadata = tuple(await call.trailing_metadata())
        except grpc.aio.AioRpcError as exc:
            code, details, trailing = exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ())
            error = self._error_of(code, details, deadline - loop.time())
            if error is not None:
                raise error from exc
        except TimeoutError:
            raise self._deadline_passed() from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # the caller cancelled, or its deadline passed: gRPC has ended the call already
            # Nobody cancelled us: the upstream call was cancelled under us, by the sender or by close().
            if sender.failure is not None:
                raise sender.failure from None
            reason = "it was taken out of service" if self._closing is not None else "its call was cancelled"
            raise Unavailable(self._broke(reason)) from None
        finally:
            pump.cancel()
            call.cancel()  # a no-op once the call has ended
        context.set_trailing_metadata((*_metadata(trailing, RESPONSE_DROPPED, request_id), *extra))
        if code is not grpc.StatusCode.OK:
            context.set_code(code)
            context.set_details(details)
        return code

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
        return self._channel

    async def _connect(self, channel: grpc.aio.Channel) -> None:
        """Wait until the channel is connected; NotStarted if it cannot connect.

        We connect before the call starts, and before any request message is read, so that a refused connection
        leaves the caller's messages for another instance.
        """
        state = channel.get_state(try_to_connect=True)
        while state is not grpc.ChannelConnectivity.READY:
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                raise NotStarted(
                    f"Instance {self.instance_id!r} of node {self.node_id!r} accepts no connection at {self.address} "
                    "(it refused it or did not speak HTTP/2); nothing ran, so another instance may take the call."
                )
            if state is grpc.ChannelConnectivity.SHUTDOWN:
                raise NotStarted(f"Instance {self.instance_id!r} of node {self.node_id!r} was taken out of service.")
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)

    def _error_of(self, code: grpc.StatusCode, details: str, remaining: float) -> APIError | None:
        """Our error for an upstream status that the transport made rather than the service; None for one that the
        service sent, which goes back as it is."""
        if code is grpc.StatusCode.DEADLINE_EXCEEDED and remaining <= DEADLINE_SLACK:
            return self._deadline_passed()
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and TRANSPORT_TOO_LARGE in details:
            return PayloadTooLarge(self._answer_too_large(f"over {2 * self.max_message}"))
        if code is grpc.StatusCode.UNAVAILABLE and (TRANSPORT_BROKE.search(details) or not self._is_connected()):
            return Unavailable(self._broke(f"its connection broke ({details})"))
        return None

    def _is_connected(self) -> bool:
        # The channel learns of a broken connection a little after the calls on it have failed: not enough alone.
        return self._channel is not None and self._channel.get_state() is grpc.ChannelConnectivity.READY

    def _broke(self, reason: str) -> str:
        return f"Instance {self.instance_id!r} of node {self.node_id!r} did not finish the call: {reason}."

    def _answer_too_large(self, size: str) -> str:
        mb = self.max_message / 2**20
        return ANSWER_TOO_LARGE.format(
            instance=self.instance_id, node=self.node_id, size=size, mb=mb, limit=self.max_message
        )

    def _deadline_passed(self) -> DeadlineExceeded:
        return DeadlineExceeded(self._timed_out(f"the call to instance {self.instance_id!r} was cancelled"))

    def _timed_out(self, what: str) -> str:
        return TIMED_OUT.format(node=self.node_id, timeout=self.timeout, what=what)

    def __repr__(self) -> str:
        return f"GrpcProxyInstance({self.instance_id!r}, node={self.node_id!r}, grpc at {self.address})"


class _Sender:
    """Copies the caller's request messages to the upstream call as they come; on a message over the limit it
    cancels the call and keeps the error in `failure`, for the forward to raise."""

    __slots__ = ("call", "failure", "limit")

    def __init__(self, call: grpc.aio.StreamStreamCall[bytes, bytes], limit: int) -> None:
        self.call = call
        self.limit = limit
        self.failure: Exception | None = None

    async def send(self, requests: AsyncIterator[bytes]) -> None:
        try:
            async for message in requests:
                if len(message) > self.limit:
                    mb = self.limit / 2**20
                    self.failure = PayloadTooLarge(REQUEST_TOO_LARGE.format(size=len(message), mb=mb, limit=self.limit))
                    self.call.cancel()
                    return
                await self.call.write(message)
            await self.call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call has ended (the service answered before the last request): the forward has its status
        except Exception as exc:  # the caller's request stream failed: end the call, and the forward raises it
            self.failure = exc
            self.call.cancel()


def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()


def _metadata(pairs: Iterable[tuple[str, str | bytes]], dropped: frozenset[str], request_id: str = "") -> Metadata:
    """`pairs` without the `dropped` keys and the transport's own (but for the service's `grpc-status-details-bin`
    in an answer), and with `x-request-id` if one is given."""
    reserved = (":", "grpc-")
    kept_reserved = STATUS_DETAILS if dropped is RESPONSE_DROPPED else ""
    kept = [
        (key, value)
        for key, value in pairs
        if key not in dropped and (key == kept_reserved or not key.startswith(reserved))
    ]
    if request_id:
        kept.append(("x-request-id", request_id))
    return kept
