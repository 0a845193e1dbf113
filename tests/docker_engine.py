"""A real Docker engine for tests: a private dockerd on a socket of its own, with no bridge and no iptables rules.

Images (`tests/docker_images.py`) live in a data root under `${XDG_CACHE_HOME:-~/.cache}/cellnode-tests/docker`, so a
second run reuses them; the dockerd process belongs to one test session. Containers use host networking and listen
on loopback only; the engine pulls through a proxy that refuses everything, so nothing reaches a public registry.
The local registry with basic auth is `tests/docker_registry.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors

# Debian package that provides each program we run.
PACKAGES = {
    "dockerd": "docker.io",
    "docker-registry": "docker-registry",
    "htpasswd": "apache2-utils",
    "debootstrap": "debootstrap",
    "curl": "curl",  # an h2c (HTTP/2 prior knowledge) client; httpx needs h2, which the host may lack
}
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")

PR_SET_PDEATHSIG = 1
LOCK_WAIT = 120.0

APT_FAILED = "apt-get could not install {packages}; the Docker tests need them.\n{output}"
ENGINE_FAILED = "dockerd did not start ({why}); log {log}:\n{tail}"


class EngineUnavailable(RuntimeError):
    """This machine cannot run a Docker engine; the tests that need one are skipped with this message."""


def cache_root() -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/cellnode-tests`, where images and rootfs tarballs outlive a test session."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cellnode-tests"


def which(program: str) -> str | None:
    return shutil.which(program, path=SYSTEM_PATH)


def ensure_packages() -> None:
    """Install Debian's docker.io, docker-registry, apache2-utils, debootstrap and curl when a program is missing."""
    missing = sorted({package for program, package in PACKAGES.items() if which(program) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise EngineUnavailable(f"{', '.join(missing)} not installed, and installing them needs root (uid is not 0).")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": SYSTEM_PATH}
    # docker.io's postinst starts the system dockerd, with a bridge and iptables rules; policy-rc.d stops that.
    added_policy = not POLICY_RC_D.exists()
    if added_policy:
        POLICY_RC_D.write_text("#!/bin/sh\n# cellnode tests: no service starts while we install.\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        output = ""
        for command in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        ):
            result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output += result.stdout
            if result.returncode != 0:
                raise RuntimeError(APT_FAILED.format(packages=" ".join(missing), output=output[-3000:]))
    finally:
        if added_policy:
            POLICY_RC_D.unlink(missing_ok=True)
    still_missing = [program for program in PACKAGES if which(program) is None]
    if still_missing:
        raise RuntimeError(f"apt-get installed {missing}, yet {still_missing} are still not on {SYSTEM_PATH!r}.")


def _without_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """The machine's proxy settings left out: the engine gets its own (see `Engine._blackhole`)."""
    proxies = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    return {key: value for key, value in environ.items() if key.lower() not in proxies}


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the test process goes, so no daemon outlives its test run."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL a process that is not our child."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return
            time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _answers(sock: Path) -> bool:
    """Whether the engine's API socket answers GET /_ping with OK."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(2)
            conn.connect(str(sock))
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b"\r\n\r\nOK" in conn.recv(4096)
    except OSError:
        return False


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, in the order they were mounted."""
    top = str(path.resolve())
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [m for m in mounts if m == top or m.startswith(top + "/")]


def unmount_under(path: Path) -> None:
    for mount in reversed(mounts_under(path)):
        subprocess.run(["umount", "-l", mount], check=False, env={"PATH": SYSTEM_PATH})


@dataclass
class Engine:
    """A dockerd of our own, on a unix socket; `stop()` removes every container it runs and ends it."""

    data_root: Path
    exec_root: Path
    socket: Path
    pidfile: Path
    log: Path
    process: subprocess.Popen[bytes]
    client: docker.DockerClient
    _lock: IO[str] = field(repr=False)
    # A loopback port bound and never listening, the engine's HTTP(S) proxy: a pull from any registry but a loopback
    # one is refused there, before any DNS lookup or packet leaves the machine.
    _blackhole: socket.socket | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        """The `unix://...` URL for `DOCKER_HOST`."""
        return f"unix://{self.socket}"

    @property
    def proxy(self) -> str:
        """`127.0.0.1:PORT`, where the engine sends every pull from a registry that is not on loopback."""
        assert self._blackhole is not None
        host, port = self._blackhole.getsockname()
        return f"{host}:{port}"

    def remove_containers(self) -> None:
        for container in self.client.containers.list(all=True):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Remove our containers, then SIGTERM dockerd, wait, and SIGKILL it if it lingers. Returns its exit code."""
        try:
            if self.process.poll() is None:
                with contextlib.suppress(docker.errors.DockerException, OSError):
                    self.remove_containers()
            self.client.close()
            end_process(self.process, timeout)
            if self.process.returncode is not None:
                unmount_under(self.exec_root)  # dockerd leaves netns/default (an nsfs mount) behind
                unmount_under(self.data_root)
            return self.process.returncode
        finally:
            self.pidfile.unlink(missing_ok=True)
            self._lock.close()
            if self._blackhole is not None:
                self._blackhole.close()

    def log_tail(self, size: int = 4000) -> str:
        return tail(self.log, size)


def _exec_root(data_root: Path) -> Path:
    """Short, and fixed per data root: unix socket paths are limited to 107 bytes, and the next run finds what a
    crashed one left here (runc's state of running containers, a pidfile, mounts) and cleans it up."""
    return Path(f"/tmp/cellnode-dockerd-{hashlib.sha256(str(data_root).encode()).hexdigest()[:10]}")


def _lock_cache(path: Path) -> IO[str]:
    lock = path.open("a+")
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise RuntimeError(
                    f"Another test session holds {path} (its dockerd uses the same data root) for over {LOCK_WAIT:.0f}"
                    " s; wait for it, or point XDG_CACHE_HOME elsewhere for this run."
                ) from None
            time.sleep(0.5)


def _stop_stale_daemon(pidfile: Path, data_root: Path) -> None:
    """A dockerd left on our data root by a crashed run (we hold the lock, so its session is gone)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    argv = _cmdline(pid)
    if argv and Path(argv[0]).name == "dockerd" and str(data_root) in argv:
        _terminate(pid, timeout=30.0)
    pidfile.unlink(missing_ok=True)


def _kill_stale_containers(exec_root: Path) -> None:
    """SIGKILL the containers a crashed run left running: their runc state outlives dockerd and containerd, and
    dockerd's own restore would give each 10 s to stop (python3 as PID 1 ignores its SIGTERM)."""
    state = exec_root / "runtime-runc" / "moby"
    runc = which("runc")
    if runc is None or not state.is_dir():
        return
    listed = subprocess.run([runc, "--root", str(state), "list", "-q"], capture_output=True, text=True, check=False)
    for container_id in listed.stdout.split():
        subprocess.run([runc, "--root", str(state), "kill", container_id, "KILL"], capture_output=True, check=False)


def start_engine(root: Path, *, timeout: float = 60.0) -> Engine:
    """Start a private dockerd (log and config in `root`) and return once its API answers a ping."""
    if os.geteuid() != 0:
        raise EngineUnavailable("dockerd needs root here (no rootless setup), and this test process is not root.")
    dockerd = which("dockerd")
    if dockerd is None:
        raise EngineUnavailable(f"dockerd is not installed (not on {SYSTEM_PATH!r}); run ensure_packages() first.")
    cache = cache_root()
    data_root = cache / "docker"
    data_root.mkdir(parents=True, exist_ok=True)
    lock = _lock_cache(cache / "docker.lock")
    try:
        exec_root = _exec_root(data_root)
        exec_root.mkdir(mode=0o700, exist_ok=True)
        sock = exec_root / "docker.sock"
        pidfile = exec_root / "dockerd.pid"
        _stop_stale_daemon(pidfile, data_root)
        _kill_stale_containers(exec_root)
        # A crashed dockerd leaves its data root bind-mounted on itself (and a new one would then never unmount it),
        # its netns, and the overlay mounts of containers it ran.
        unmount_under(exec_root)
        unmount_under(data_root)
        root.mkdir(parents=True, exist_ok=True)
        config = root / "daemon.json"
        # Never the machine's /etc/docker/daemon.json; and the engine's identity key, /etc/docker/key.json by default,
        # kept beside the data root.
        config.write_text(json.dumps({"deprecated-key-path": str(cache / "dockerd-key.json")}) + "\n")
        log = root / "dockerd.log"
        blackhole = socket.socket()
        blackhole.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        proxies = {"HTTP_PROXY": nowhere, "HTTPS_PROXY": nowhere, "NO_PROXY": "127.0.0.1,localhost,::1"}
        argv = [
            dockerd,
            "--config-file", str(config),
            "--data-root", str(data_root),
            "--exec-root", str(exec_root),
            "--pidfile", str(pidfile),
            "-H", f"unix://{sock}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--userland-proxy=false",
            "--storage-driver=overlay2",
            "--log-driver=json-file",
        ]  # fmt: skip
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**_without_proxies(os.environ), "PATH": SYSTEM_PATH, **proxies},
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not _answers(sock):
            if process.poll() is not None:
                why = f"exit {process.returncode}"
                raise EngineUnavailable(ENGINE_FAILED.format(why=why, log=log, tail=tail(log)))
            if time.monotonic() > deadline:
                process.kill()
                process.wait(10)
                raise EngineUnavailable(ENGINE_FAILED.format(why=f"no answer in {timeout} s", log=log, tail=tail(log)))
            time.sleep(0.1)
        client = docker.DockerClient(base_url=f"unix://{sock}", version="auto", timeout=600)
        engine = Engine(data_root, exec_root, sock, pidfile, log, process, client, lock, blackhole)
    except BaseException:
        if "process" in locals() and process.poll() is None:
            process.kill()
            process.wait(10)
        lock.close()
        raise
    try:
        engine.client.ping()
        engine.remove_containers()  # a crashed run's
        remove_registry_tags(engine)
    except BaseException:
        engine.stop()
        raise
    return engine


def remove_registry_tags(engine: Engine) -> None:
    """Tags a crashed run pushed to, or pulled from, a loopback registry that no longer exists; and the untagged
    images that an older recipe of ours left behind."""
    for image in engine.client.images.list():
        for tag in image.tags:
            if tag.startswith("127.0.0.1:"):
                with contextlib.suppress(docker.errors.APIError):
                    engine.client.images.remove(tag, noprune=False)
    with contextlib.suppress(docker.errors.APIError):
        engine.client.images.prune(filters={"dangling": True})


def end_process(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it has not ended within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(engine: Engine, image: str, command: list[str], **kwargs: Any) -> Iterator[Any]:
    """A detached container with host networking, force-removed afterwards."""
    container = engine.client.containers.run(image, command, detach=True, network_mode="host", **kwargs)
    try:
        yield container
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
