"""The HTTP proxy to container instances: a `ProxyInstance` per instance, with a pool of kept-alive connections to it.

`ProxyInstance.forward` passes one ASGI request through to the instance and streams the answer back:

- the method, the path and query as the client sent them (`raw_path`, `query_string`), and the headers minus the
  hop-by-hop ones (Connection and the headers it names, Keep-Alive, Proxy-Authenticate, Proxy-Authorization, TE,
  Trailer, Transfer-Encoding, Upgrade) and minus `authorization` (the caller's credential for cellnode, not for the
  node), `host` (set to the instance's address), `expect` (the front has answered it) and the caller's
  `x-request-id`, replaced by cellnode's;
- the request body as `receive` gives it: a body that came in one message (most do) goes with its length, a longer
  one is streamed as it arrives; past `max_body` (16 MB) it is refused with PayloadTooLarge, before any byte is read
  when its Content-Length says so;
- the answer's status and headers (minus the hop-by-hop ones, Date and Server, which the front's server sets, as
  nginx does, and `x-cellnode-error`, which only cellnode's own errors carry; with cellnode's `x-request-id`), then
  its body, chunk by chunk as the instance sends it.
  Nothing is buffered whole; a slow client slows the reading from the instance (the front's `send` waits).

Time. `deadline` (a `loop.time()` value, the node's timeout from the request's arrival) bounds everything up to the
response's head: reading the request, waiting for a connection, the instance's work. After that the body flows as
long as the instance keeps sending: it may pause at most `timeout` seconds between two chunks.

Errors. Before the response has started, a failure raises an APIError for the front to render: NotStarted (the
connection was refused: nothing ran, another instance may take the request), Unavailable (the connection broke
after the request was sent), DeadlineExceeded, PayloadTooLarge, InvalidArgument (the client left before it sent
its whole body). Once `http.response.start` has been sent no error answer can follow, so a failure raises
`ResponseAborted`: the front must let it end the ASGI call, and the server then drops the client's connection,
the only way left to tell the client that the body is incomplete. A client that disconnects while the body streams,
or while the answer is more than `WATCH_AFTER` late, ends the forward quietly (499 for the metrics), and the
instance's connection is closed.

Only "http" and "http2" endpoints come through here. "http" goes through `cellnode.router.http1`'s pool (written
for this hot path: httpx's took most of the front's CPU, see bench/README.md); "http2" speaks h2c with prior
knowledge through httpx's transport (the `h2` package).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from urllib.parse import quote

import httpx
from starlette.types import Receive, Scope, Send

from cellnode.config import MAX_MESSAGE_BYTES
from cellnode.exceptions import (
    DeadlineExceeded,
    InvalidArgument,
    PayloadTooLarge,
    ResponseAborted,
    Unavailable,
)
from cellnode.router.http1 import Answer, Broken, ConnectFailed, Pool
from cellnode.router.instance import TIMED_OUT, NotStarted
from cellnode.router.proxied import ProxiedInstance

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
REQUEST_DROPPED = HOP_BY_HOP | {b"authorization", b"host", b"expect", b"x-request-id"}
# `x-cellnode-error` marks cellnode's own errors (`cellnode.api.errors.error_response`): a service cannot claim it.
RESPONSE_DROPPED = HOP_BY_HOP | {b"date", b"server", b"x-request-id", b"x-cellnode-error"}
# Per instance. The node's queue (`NodeRoute.max_queue`) bounds the requests under way; past max_connections a
# request waits for a free connection, within its deadline. A node's instances keep an idle connection for its
# `idle_timeout` (`supervisor.launch.proxy_instance`); 4 s, below uvicorn's 5 s, where nothing says otherwise.
DEFAULT_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=4.0)
URL_CACHE_SIZE = 256
UNSAFE = re.compile(rb"[^\x21-\x7e]")  # a request target is visible ASCII

TOO_LARGE = "The request body is {size} bytes, over the {mb:g} MB limit ({limit} bytes); send less data."
CLIENT_LEFT = "The client closed the connection before it sent the whole request body."
WATCH_AFTER = 0.05  # seconds without the answer's head before the client's connection is watched
CLIENT_CLOSED = 499  # the status the metrics count for a client that left before its answer (nginx's)


class ProxyInstance(ProxiedInstance):
    """One container instance with an HTTP or HTTP/2 endpoint, as the front routes to it.

    It has the surface `NodeRoute.choose()` reads (`instance_id`, `node_id`, `timeout`, `is_alive`, `outstanding`)
    and one connection pool, kept for its lifetime; `close()` ends both.

    Parameters:
        instance_id, node_id: the instance and its node, named in error messages.
        address: the endpoint's `127.0.0.1:PORT` (the container handle's `address`).
        endpoint: "http" (HTTP/1.1) or "http2" (h2c with prior knowledge).
        timeout: the node's endpoint timeout in seconds; named in DeadlineExceeded messages, and the longest pause
            allowed between two chunks of a response body.
        max_body: the largest request body passed on, in bytes.
        limits: the connection pool's limits.

    Example:
        instance = ProxyInstance("i1", "n1", handle.address, "http", timeout=15.0)
        await instance.forward(scope, receive, send, deadline=loop.time() + 15.0, request_id=request_id)
    """

    def __init__(
        self,
        instance_id: str,
        node_id: str,
        address: str,
        endpoint: str,
        timeout: float,
        *,
        max_body: int = MAX_MESSAGE_BYTES,
        limits: httpx.Limits = DEFAULT_LIMITS,
    ) -> None:
        if endpoint not in ("http", "http2"):
            raise ValueError(f"Endpoint {endpoint!r} cannot be proxied over HTTP; it must be 'http' or 'http2'.")
        super().__init__(instance_id, node_id, address, timeout)
        self.endpoint = endpoint
        self.max_body = max_body
        self._base = httpx.URL(f"http://{address}/")
        self._host = address.encode()
        self._urls: dict[bytes, httpx.URL] = {}
        self._pool: Pool | None = None
        self._transport: httpx.AsyncHTTPTransport | None = None
        if endpoint == "http":
            host, _, port = address.rpartition(":")
            unbounded = 2**31  # httpx's None: no limit
            self._pool = Pool(
                host.strip("[]"),
                int(port),
                max_connections=unbounded if limits.max_connections is None else limits.max_connections,
                max_idle=unbounded if limits.max_keepalive_connections is None else limits.max_keepalive_connections,
                keepalive_expiry=float("inf") if limits.keepalive_expiry is None else limits.keepalive_expiry,
            )
        else:
            # Not an httpx.AsyncClient: its `send` logs every request at INFO and keeps the instance's cookies in a
            # jar. Its transport is the same connection pool without either. Plain HTTP to loopback: no TLS context.
            self._transport = httpx.AsyncHTTPTransport(
                verify=False, trust_env=False, http1=False, http2=True, limits=limits
            )

    async def _shut(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
        if self._transport is not None:
            await self._transport.aclose()

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        deadline: float,
        request_id: str,
        response_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> int:
        """Pass the HTTP request of `scope`/`receive` to the instance and its answer to `send`; the answer's status.

        `deadline` is the `loop.time()` by which the response must have started; `request_id` goes to the instance
        and back to the client as `x-request-id`; `response_headers` are added to the answer's (the alias front's
        `x-node-id`, say). Raises NotStarted, Unavailable, DeadlineExceeded, PayloadTooLarge or InvalidArgument
        before the response has started, ResponseAborted after (see the module docstring).
        """
        if self._closing is not None:
            raise NotStarted(f"Instance {self.instance_id!r} of node {self.node_id!r} was taken out of service.")
        self._outstanding += 1
        exchange = _Exchange(self)
        try:
            return await self._forward(scope, receive, send, deadline, request_id, response_headers, exchange)
        finally:
            exchange.uncount()

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        deadline: float,
        request_id: str,
        extra: Sequence[tuple[bytes, bytes]],
        exchange: _Exchange,
    ) -> int:
        loop = asyncio.get_running_loop()
        rid = request_id.encode()
        target = self._target(scope)
        headers, declared = self._request_headers(scope["headers"], rid)
        answer: Answer | None = None
        response: httpx.Response | None = None
        status = 0  # the status sent to the client, once the response has started
        watching: asyncio.TimerHandle | None = None
        try:
            async with asyncio.timeout_at(deadline) as timer:
                body, chunked = await self._request_body(receive, headers, declared)
                if isinstance(body, bytes):
                    # The body is in: from now on the client can only leave, and then the instance's work for it
                    # stops (its connection is closed), as nginx does, rather than fill the node's queue. Watched
                    # only once the answer is slow to come: a task per request cost 45 us of the loop's 230.
                    watching = loop.call_later(WATCH_AFTER, exchange.watch, receive)
                if self._pool is not None:
                    head = b"%s %s HTTP/1.1\r\n%s\r\n" % (
                        scope["method"].encode(),
                        target,
                        b"".join(b"%s: %s\r\n" % header for header in headers),
                    )
                    answer = await self._pool.request(head, body, chunked=chunked, head_only=scope["method"] == "HEAD")
                    status, raw, chunks = answer.status, answer.headers, answer.chunks()
                else:
                    assert self._transport is not None
                    stream = httpx.ByteStream(body) if isinstance(body, bytes) else body
                    request = httpx.Request(scope["method"], self._url(target), headers=headers, stream=stream)
                    response = await self._transport.handle_async_request(request)
                    status, raw, chunks = response.status_code, response.headers.raw, response.aiter_raw()
                if watching is not None:
                    watching.cancel()
                headers, remaining = _response_headers(raw)
                headers += ((b"x-request-id", rid), *extra)
                # From here on, the client may have the head.
                await send({"type": "http.response.start", "status": status, "headers": headers})
                timer.reschedule(loop.time() + self.timeout)
                async for chunk in chunks:
                    timer.reschedule(None)  # a slow client is not the instance's pause
                    remaining -= len(chunk)
                    if remaining == 0:  # complete by its Content-Length: the client need not wait for more
                        exchange.is_final = True
                        exchange.uncount()
                        await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    else:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        if exchange.watcher is None:
                            # Without it, a client gone from a long (or endless) body would leave us reading on.
                            exchange.watch(receive)
                    timer.reschedule(loop.time() + self.timeout)
                timer.reschedule(None)
                if not exchange.is_final:
                    exchange.is_final = True
                    exchange.uncount()
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            if not timer.expired():
                raise
            if status:
                raise self._aborted(status, f"it sent nothing for {self.timeout:g} s") from None
            what = f"the request to instance {self.instance_id!r} was cancelled"
            raise DeadlineExceeded(TIMED_OUT.format(node=self.node_id, timeout=self.timeout, what=what)) from None
        except (ConnectFailed, httpx.ConnectError) as exc:
            raise NotStarted(
                f"Instance {self.instance_id!r} of node {self.node_id!r} refused the connection ({_reason(exc)}); "
                "nothing ran, so another instance may take the request."
            ) from exc
        except (Broken, httpx.TransportError) as exc:
            if status:
                raise self._aborted(status, f"its connection broke ({_reason(exc)})") from exc
            raise Unavailable(
                f"Instance {self.instance_id!r} of node {self.node_id!r} broke the connection before it answered "
                f"({_reason(exc)}){self._closed_note()}."
            ) from exc
        except asyncio.CancelledError:
            if exchange.has_client_left and exchange.task.uncancel() == 0:
                return status or CLIENT_CLOSED  # the client left: nobody to tell
            raise
        finally:
            if watching is not None:
                watching.cancel()
            if exchange.watcher is not None:
                exchange.watcher.cancel()
            if answer is not None:
                answer.release()
            if response is not None:
                await response.aclose()
        return status

    def _target(self, scope: Scope) -> bytes:
        """The request target as the client sent it (uvicorn's parser has checked it)."""
        path: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
        query: bytes = scope.get("query_string", b"")
        target = path + b"?" + query if query else path
        if UNSAFE.search(target) is not None:
            raise InvalidArgument(
                f"The request's path {target!r} is not a valid URL path: it holds a space, a control character or a "
                "byte past ASCII; percent-encode them."
            )
        return target

    def _url(self, target: bytes) -> httpx.URL:
        url = self._urls.get(target)
        if url is None:
            try:
                url = self._base.copy_with(raw_path=target)
            except (UnicodeDecodeError, httpx.InvalidURL) as exc:
                raise InvalidArgument(f"The request's path {target!r} is not a valid URL path: {exc}.") from None
            # Parsing costs about 15 us; most nodes are called on a few paths (the header form's "/").
            if len(self._urls) >= URL_CACHE_SIZE:
                self._urls.clear()
            self._urls[target] = url
        return url

    def _request_headers(
        self, raw: Iterable[tuple[bytes, bytes]], request_id: bytes
    ) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """The headers to send, without the body's framing; and the Content-Length the client declared."""
        headers = [(b"host", self._host)]
        named: list[bytes] = []
        declared: bytes | None = None
        for name, value in raw:
            if name in REQUEST_DROPPED:
                if name == b"connection":
                    named += (token.strip().lower() for token in value.split(b","))
            elif name == b"content-length":
                if value.isdigit() and int(value) > self.max_body:
                    raise PayloadTooLarge(_too_large(str(int(value)), self.max_body))
                declared = value
            else:
                headers.append((name, value))
        if named:
            headers = [(name, value) for name, value in headers if name not in named]
        headers.append((b"x-request-id", request_id))
        return headers, declared

    async def _request_body(
        self, receive: Receive, headers: list[tuple[bytes, bytes]], declared: bytes | None
    ) -> tuple[bytes | _RequestBody, bool]:
        """The body to send, from its first message, and whether it goes chunked; adds its framing to `headers`."""
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidArgument(CLIENT_LEFT)
        body: bytes = message.get("body", b"")
        if len(body) > self.max_body:
            raise PayloadTooLarge(_too_large(f"at least {len(body)}", self.max_body))
        if not message.get("more_body", False):
            if body or declared is not None:
                headers.append((b"content-length", str(len(body)).encode()))
            return body, False
        # The instance's HTTP/2 connection drops Transfer-Encoding; HTTP/1.1 needs it without a length.
        if declared is not None:
            headers.append((b"content-length", declared))
        else:
            headers.append((b"transfer-encoding", b"chunked"))
        return _RequestBody(receive, body, self.max_body), declared is None

    def _aborted(self, status: int, reason: str) -> ResponseAborted:
        return ResponseAborted(
            f"Instance {self.instance_id!r} of node {self.node_id!r} failed after its response (HTTP {status}) had "
            f"started: {reason}{self._closed_note()}. The client's connection is dropped.",
            status_code=status,
        )

    def _closed_note(self) -> str:
        return "; it was taken out of service" if self._closing is not None else ""

    def __repr__(self) -> str:
        return f"ProxyInstance({self.instance_id!r}, node={self.node_id!r}, {self.endpoint} at {self.address})"


class _Exchange:
    """One forward's state that its disconnect watcher shares: the watcher cancels `task` if the client leaves."""

    __slots__ = ("has_client_left", "instance", "is_final", "task", "watcher")

    def __init__(self, instance: ProxyInstance) -> None:
        task = asyncio.current_task()
        assert task is not None, "forward() runs in a task"
        self.task = task
        self.instance: ProxyInstance | None = instance  # until the request no longer counts as outstanding
        self.watcher: asyncio.Task[None] | None = None
        self.is_final = False  # the last body message is under way: a disconnect now is the normal end
        self.has_client_left = False

    def uncount(self) -> None:
        """The instance has answered whole: the request leaves its outstanding count before the answer's last
        bytes go to the client, whose next request on the same connection may arrive before this one's `send`
        returns (the node's queue would count both)."""
        if self.instance is not None:
            self.instance._outstanding -= 1
            self.instance = None

    def watch(self, receive: Receive) -> None:
        self.watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        # The body has been read, so `receive` has nothing left to give but the disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.is_final:
            self.has_client_left = True
            self.task.cancel()


class _RequestBody(httpx.AsyncByteStream):
    """The rest of a request body, read from `receive` as the instance's connection takes it."""

    def __init__(self, receive: Receive, first: bytes, limit: int) -> None:
        self._receive = receive
        self._first = first
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = len(self._first)
        if self._first:
            yield self._first
        more = True
        while more:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise InvalidArgument(CLIENT_LEFT)
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:
                raise PayloadTooLarge(_too_large(f"at least {size}", self._limit))
            more = message.get("more_body", False)
            if chunk:
                yield chunk


def _response_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], int]:
    """The answer's headers to pass on; and its body's declared length, or -1 (which no count of received bytes
    reaches) without one."""
    headers = []
    named: list[bytes] = []
    length = -1
    for name, value in raw:
        name = name.lower()  # HTTP/1.1 keeps the instance's case; ASGI wants lower case
        if name not in RESPONSE_DROPPED:
            headers.append((name, value))
            if name == b"content-length" and value.isdigit():
                length = int(value)
        elif name == b"connection":
            named += (token.strip().lower() for token in value.split(b","))
    if named:
        headers = [(name, value) for name, value in headers if name not in named]
    return headers, length


def _too_large(size: str, limit: int) -> str:
    return TOO_LARGE.format(size=size, mb=limit / 2**20, limit=limit)


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
