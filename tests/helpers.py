"""A real `cellnode serve` process on a loopback port, for integration tests."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

import httpx
import uvicorn
from starlette.types import ASGIApp

from cellnode.client import Client

URL_LINE = re.compile(r"serving (https?://\S+)")
GRPC_LINE = re.compile(r"^gRPC on (\S+)$", re.MULTILINE)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the test process goes, so no server outlives its test run."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ServerProcess:
    """`cellnode serve --port 0` in a subprocess; `start()` returns once /health answers."""

    def __init__(
        self,
        data_dir: Path,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.data_dir = data_dir
        self.args = args
        self.verify = verify  # for /health, when the server speaks TLS
        self.grpc_address = ""  # host:port, with --grpc-port
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CELLNODE_")}
        self.env = {**clean, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.output: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.output = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cellnode", "serve", "--port", "0", "--data-dir", str(self.data_dir), *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            preexec_fn=_die_with_parent,
        )
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("cellnode serve exited:\n" + "".join(self.output))
            match = next((URL_LINE.search(line) for line in self.output if URL_LINE.search(line)), None)
            if match:
                self.url = match.group(1)
                try:
                    if httpx.get(self.url + "/health", timeout=1, verify=self.verify).status_code == 200:
                        grpc_line = GRPC_LINE.search("".join(self.output))
                        self.grpc_address = grpc_line.group(1) if grpc_line else ""
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("cellnode serve did not come up:\n" + "".join(self.output))

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.output.append(line)

    @property
    def key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()

    def client(self) -> Client:
        return Client(self.url, self.key)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def log(self) -> str:
        return "".join(self.output)


@contextmanager
def serve_asgi(app: ASGIApp, lifespan: Literal["on", "off"] = "off") -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free loopback port; yields its `127.0.0.1:PORT`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan=lifespan, ws="none", log_level="critical", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def notebook(tmp: Path, *cells: str, name: str = "nb.ipynb") -> Path:
    """Write a notebook with these code cells."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    path = tmp / name
    nbformat.write(nb, path)
    return path
