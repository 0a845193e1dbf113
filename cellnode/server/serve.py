"""`cellnode serve`: one process with the HTTP front and the supervisor; a clean stop on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys

import uvicorn
from fastapi import FastAPI

from cellnode._version import __version__
from cellnode.config import Settings
from cellnode.exceptions import ConfigError
from cellnode.server.app import SHUTDOWN_GRACE, build_app, write_profile


def _announce(message: str) -> None:
    print(message, flush=True)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self.grpc_stop: asyncio.Future[None] | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """One drain for both fronts: the gRPC port refuses new calls from the moment HTTP's listener closes, and
        the calls under way on either have the same grace."""
        front = getattr(self.app.state, "grpc_front", None)
        if front is not None:
            self.grpc_stop = asyncio.ensure_future(front.stop(SHUTDOWN_GRACE))  # the lifespan's end waits for it
        await super().shutdown(sockets)


def bind(host: str, port: int, flag: str = "--port") -> socket.socket:
    """Bind the listening socket first, so that the URL (and a port picked with 0) is known before start-up.
    ConfigError, naming the flag, when the address is taken or not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"Cannot listen on {host}:{port} ({flag}): {exc.strerror}. Another process may hold the port; give "
            f"another with {flag}, or 0 to pick a free one."
        ) from None
    return sock


def serve(settings: Settings) -> None:
    """Run the server until SIGTERM or SIGINT; stop every instance on the way out."""
    # grpcio's fork handlers are for processes that fork while gRPC calls run; ours fork only to exec an instance
    # (or its zygote), and grpcio would log a warning about skipping them at each start. Before grpc is imported.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    sock = bind(settings.host, settings.port)
    if settings.grpc_port:
        # Only a probe: grpc binds its own socket at start-up, but a taken port is better told now, in one line.
        bind(settings.host, settings.grpc_port, "--grpc-port").close()
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"{'https' if settings.tls_cert else 'http'}://{host}:{port}"
    app = build_app(settings, announce=_announce)
    write_profile(settings, url)
    print(f"cellnode {__version__} serving {url} (data in {settings.data_dir})", flush=True)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
        timeout_keep_alive=settings.idle_timeout,
        h11_max_incomplete_event_size=None,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
    )
    server = _Server(config, app.app)
    try:
        # After a clean shutdown uvicorn raises the signal it caught again, so that the exit status tells it.
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        sys.exit(130)
    if not server.started:
        sys.exit(3)
