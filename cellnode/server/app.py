"""The ASGI application of `cellnode serve`: management API, execute API, health, and the services behind them."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse

from cellnode._version import __version__
from cellnode.api import (
    aliases,
    audit,
    checkpoints,
    errors,
    execute,
    folders,
    iam,
    nodes,
    principals,
    secrets,
    telemetry,
    usage,
)
from cellnode.api.deps import Services
from cellnode.backends.base import Backend
from cellnode.backends.container import ContainerBackend
from cellnode.backends.kernel_image import KernelImageBackend
from cellnode.checkpoint.blobs import BlobStore
from cellnode.config import BACKENDS, Settings
from cellnode.iam.access import Access
from cellnode.iam.audit import AuditLog
from cellnode.iam.bootstrap import bootstrap, write_private
from cellnode.iam.credentials import Authenticator
from cellnode.iam.secrets import SecretBox
from cellnode.router.table import RoutingTable
from cellnode.store.db import Database
from cellnode.supervisor.autoscale import AutoscalePolicy
from cellnode.supervisor.specs import count_gpus, load_specs
from cellnode.supervisor.supervisor import Supervisor
from cellnode.telemetry.metrics import Metrics
from cellnode.telemetry.scrape import Scraper

if TYPE_CHECKING:
    from cellnode.grpc.front import GrpcFront

logger = logging.getLogger("cellnode.server")
# Seconds the RPCs under way get to finish when the server stops.
SHUTDOWN_GRACE = 10  # seconds the calls under way at shutdown may take, on either front


def build_app(settings: Settings, *, announce: Callable[[str], None] | None = None) -> execute.ExecuteFront:
    """The application; the lifespan opens the store, runs migrations, bootstraps, and starts the supervisor."""
    secret_box = SecretBox.load(settings)  # now, so that a bad master key stops `serve` with a one-line error

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = Database(settings.db_url)
        db.migrate()
        first = bootstrap(db, settings.admin_key_path)
        secret_box.check(db)
        if first.new_key is not None and announce is not None:
            announce(
                f"Created the default folder {first.folder_id} and an admin service account.\n"
                f"Admin API key (shown once; also in {settings.admin_key_path}, mode 0600):\n  {first.new_key}"
            )
        blobs = BlobStore(settings.data_dir / "blobs")
        table = RoutingTable(settings.prefixes[0])
        specs = load_specs(settings.specs_file)
        backend = load_backend(settings.backend)
        metrics = Metrics(table)
        containers = ContainerBackend(owner=container_owner(settings))
        scraper = Scraper(metrics.registry, interval=settings.telemetry_interval)
        supervisor = Supervisor(
            db,
            backend,
            blobs,
            table,
            logs_dir=settings.data_dir / "logs",
            start_timeout=settings.instance_start_timeout,
            specs=specs,
            liveness=(settings.liveness_interval, settings.liveness_timeout),
            autoscale=AutoscalePolicy(
                settings.autoscale_target, settings.scale_up_cooldown, settings.scale_down_cooldown
            ),
            metrics=metrics,
            log_limits=(settings.log_retention_hours * 3600, settings.log_max_mb * 2**20),
            secret_box=secret_box,
            containers=containers,
            kernels=KernelImageBackend(containers, blob_dir=settings.data_dir / "kernel-blobs"),
            scraper=scraper,
        )
        app.state.services = Services(
            settings=settings,
            db=db,
            auth=Authenticator(db, failure_limit=settings.auth_failure_limit),
            access=Access(db),
            blobs=blobs,
            table=table,
            supervisor=supervisor,
            default_folder_id=first.folder_id,
            captures=ThreadPoolExecutor(settings.max_captures, thread_name_prefix="cellnode-capture"),
            blob_lock=threading.Lock(),
            metrics=metrics,
            specs=specs,
            gpus=await asyncio.to_thread(count_gpus),
            zones=backend.zones,
            audit=AuditLog(db),
            secret_box=secret_box,
        )
        await scraper.start()
        await supervisor.start()
        grpc_front = None
        try:
            if settings.grpc_port is not None:
                grpc_front = app.state.grpc_front = await start_grpc(app.state.services)
                if announce is not None:
                    host = f"[{settings.host}]" if ":" in settings.host else settings.host
                    announce(f"gRPC on {host}:{grpc_front.port}")
            yield
        finally:
            if grpc_front is not None:
                await grpc_front.stop(SHUTDOWN_GRACE)
            logger.info("Stopping all instances.")
            # After the last request, and first: the audit rows still queued are written whatever fails next.
            await asyncio.to_thread(app.state.services.audit.close)
            await supervisor.close()
            await scraper.aclose()
            app.state.services.captures.shutdown(wait=False, cancel_futures=True)
            db.close()

    app = FastAPI(
        redoc_url=None,
        title="cellnode",
        version=__version__,
        description="Management and execute API of a cellnode server.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(audit.AuditMiddleware)
    app.add_route("/health", health, methods=["GET"], include_in_schema=False)
    app.add_route("/datasphere/v1/nodes/{node_id}:execute", execute.execute_node, methods=["POST"])
    app.add_route("/datasphere/v1/aliases/{alias_name}:execute", execute.execute_alias, methods=["POST"])
    app.add_route("/", execute.execute_by_header, methods=["POST"])
    for module in (folders, iam, principals, checkpoints, nodes, aliases, secrets, telemetry, usage):
        app.include_router(module.router)
    app.include_router(audit.router)
    return execute.ExecuteFront(app)


async def health(request: Request) -> JSONResponse:
    """Liveness of the server itself; needs no credential."""
    return JSONResponse({"status": "ok", "version": __version__})


async def start_grpc(svc: Services) -> GrpcFront:
    """The gRPC front on the settings' host and gRPC port, with the HTTP front's certificate if it has one."""
    from cellnode.grpc.front import GrpcFront

    settings = svc.settings
    tls = None
    if settings.tls_cert and settings.tls_key:
        tls = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    front = GrpcFront(svc)
    assert settings.grpc_port is not None
    await front.start(settings.host, settings.grpc_port, tls)
    return front


def container_owner(settings: Settings) -> str:
    """The `cellnode.owner` label of this server's containers: one per data directory, so that servers sharing an
    engine never remove each other's containers as leftovers."""
    digest = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:16]
    return f"cellnode-{digest}"


def load_backend(name: str) -> Backend:
    """The backend named in the settings, imported from `BACKENDS`."""
    module_name, _, attribute = BACKENDS[name].partition(":")
    backend_class: Any = getattr(importlib.import_module(module_name), attribute)
    backend: Backend = backend_class()
    return backend


def write_profile(settings: Settings, url: str) -> None:
    """Leave the URL and key file for the CLI on this machine, so that it needs no flags."""
    from cellnode.config import default_profile_path

    path = settings.profile or default_profile_path()
    if str(path).lower() == "none":
        return
    write_private(path, json.dumps({"url": url, "key_file": str(settings.admin_key_path)}, indent=2) + "\n")
