"""What the HTTP proxy (`cellnode.router.proxy.ProxyInstance`) and the gRPC one
(`cellnode.grpc.passthrough.GrpcProxyInstance`) share: a docker node's instance, on loopback, as the router sees it.
"""

from __future__ import annotations

import asyncio

from cellnode.config import is_loopback


class ProxiedInstance:
    """One instance of a docker node: the surface `NodeRoute.choose()` reads (`instance_id`, `node_id`, `timeout`,
    `is_alive`, `outstanding`, `pid`), and a close that ends its connections in the background.

    A subclass counts its calls in `_outstanding` and ends its connections in `_shut()`.
    """

    def __init__(self, instance_id: str, node_id: str, address: str, timeout: float) -> None:
        if not is_loopback(address.rpartition(":")[0].strip("[]")):
            raise ValueError(f"Instance address {address!r} is not on loopback (127.0.0.0/8 or ::1); give one that is.")
        self.instance_id = instance_id
        self.node_id = node_id
        self.address = address
        self.timeout = timeout
        self.pid: int | None = None  # the container's main process, set by whoever started it
        self._is_alive = True
        self._closing: asyncio.Task[None] | None = None
        self._outstanding = 0

    @property
    def is_alive(self) -> bool:
        """Whether the router may choose this instance: the health check sets it; False for good after `close()`."""
        return self._is_alive and self._closing is None

    @is_alive.setter
    def is_alive(self, value: bool) -> None:
        self._is_alive = value

    @property
    def outstanding(self) -> int:
        """Calls under way on this instance, from the call of `forward` to the end of the answer."""
        return self._outstanding

    def close(self) -> None:
        """Take the instance out of service and close its connections, in the background (`aclose()` waits).

        Calls still under way on it fail: drain it first (wait for `outstanding` to fall to 0).
        """
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._shut())

    async def aclose(self) -> None:
        """`close()`, and wait until the connections are closed."""
        self.close()
        assert self._closing is not None
        await self._closing

    async def _shut(self) -> None:
        raise NotImplementedError("The '_shut' method must be implemented.")
