"""Debian's docker-registry on 127.0.0.1 with htpasswd basic auth: proves authenticated pulls with no public
registry."""

from __future__ import annotations

import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import docker.errors
import httpx

from tests.docker_engine import Engine, die_with_parent, end_process, free_port, tail, which


@dataclass
class Registry:
    """Debian's docker-registry on 127.0.0.1, with htpasswd basic auth and storage in a temporary directory."""

    address: str  # 127.0.0.1:PORT
    user: str
    password: str
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def auth_config(self) -> dict[str, str]:
        """Credentials for `images.push(..., auth_config=)` and `images.pull(..., auth_config=)`."""
        return {"username": self.user, "password": self.password}

    def stop(self, timeout: float = 10.0) -> int | None:
        end_process(self.process, timeout)
        return self.process.returncode

    def log_tail(self, size: int = 4000) -> str:
        return tail(self.root / "registry.log", size)


REGISTRY_CONFIG = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {address}
  secret: {secret}
auth:
  htpasswd:
    realm: cellnode-tests
    path: {htpasswd}
"""


def start_registry(root: Path, user: str, password: str, *, timeout: float = 30.0) -> Registry:
    """Start `docker-registry serve` on a free 127.0.0.1 port; return once /v2/ asks for credentials (401)."""
    registry = which("docker-registry")
    htpasswd = which("htpasswd")
    if registry is None or htpasswd is None:
        raise RuntimeError("docker-registry and htpasswd are not installed; run ensure_packages() first.")
    root.mkdir(parents=True, exist_ok=True)
    # -i: the password on stdin, not in argv. -B: bcrypt, the only hash docker-registry accepts.
    entry = subprocess.run([htpasswd, "-Bin", user], input=password, capture_output=True, text=True)
    if entry.returncode != 0:
        raise RuntimeError(f"htpasswd -Bin {user!r} failed: {entry.stderr.strip()}")
    (root / "htpasswd").write_text(entry.stdout)
    (root / "storage").mkdir(exist_ok=True)
    for _ in range(5):  # another process may take the free port before the registry binds it
        address = f"127.0.0.1:{free_port()}"
        config = root / "config.yml"
        config.write_text(
            REGISTRY_CONFIG.format(
                storage=root / "storage", address=address, secret=secrets.token_hex(16), htpasswd=root / "htpasswd"
            )
        )
        with (root / "registry.log").open("ab") as out:
            process = subprocess.Popen(
                [registry, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{address}/v2/", timeout=1, trust_env=False).status_code == 401:
                    return Registry(address, user, password, root, process)
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
        process.wait(10)
        if "address already in use" not in tail(root / "registry.log"):
            break
    raise RuntimeError(f"docker-registry did not come up on {address}:\n{tail(root / 'registry.log')}")


def push_image(engine: Engine, repository: str, tag: str, auth_config: dict[str, str] | None) -> None:
    """Push and raise `docker.errors.APIError` on failure: the engine reports push errors inside its stream."""
    for message in engine.client.api.push(repository, tag, stream=True, decode=True, auth_config=auth_config):
        if "error" in message:
            raise docker.errors.APIError(f"push of {repository}:{tag} failed: {message['error']}")
