"""A real Docker engine for tests: a private dockerd, images built locally, and a local registry with basic auth.

Nothing here reaches a public registry. The Python image is a Debian bookworm rootfs made with `debootstrap`
and imported; the service image adds PyPI wheels installed from the host with `pip --target`. Images live in a
data root under `${XDG_CACHE_HOME:-~/.cache}/cellnode-tests/docker`, so a second run reuses them; the dockerd
process belongs to one test session. Containers use host networking and listen on loopback only.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import io
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors
import httpx

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

PYTHON_IMAGE = "cellnode-test/python:3.11"
SERVICE_IMAGE = "cellnode-test/services:1"
SERVICE_PACKAGES = ("fastapi", "uvicorn", "hypercorn", "grpcio", "grpcio-health-checking", "prometheus-client")
RECIPE_LABEL = "cellnode-tests.recipe"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PYTHON_PACKAGES = ("python3", "ca-certificates")
# What the rootfs tarball leaves out: package caches, docs, and /dev (the engine makes its own).
ROOTFS_EXCLUDES = (
    "./var/cache/apt/archives/*.deb",
    "./var/lib/apt/lists/*",
    "./usr/share/doc/*",
    "./usr/share/man/*",
    "./usr/share/locale/*",
    "./dev/*",
    "./proc/*",
    "./sys/*",
    "./debootstrap",
)
PYTHON_CHANGES = (
    'CMD ["python3"]',
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
)
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


def _which(program: str) -> str | None:
    return shutil.which(program, path=SYSTEM_PATH)


def ensure_packages() -> None:
    """Install Debian's docker.io, docker-registry, apache2-utils, debootstrap and curl when a program is missing."""
    missing = sorted({package for program, package in PACKAGES.items() if _which(program) is None})
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
    still_missing = [program for program in PACKAGES if _which(program) is None]
    if still_missing:
        raise RuntimeError(f"apt-get installed {missing}, yet {still_missing} are still not on {SYSTEM_PATH!r}.")


def _without_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """The machine's proxy settings left out: the engine gets its own (see `Engine._blackhole`)."""
    proxies = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    return {key: value for key, value in environ.items() if key.lower() not in proxies}


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the test process goes, so no daemon outlives its test run."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, size: int = 4000) -> str:
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
            _end(self.process, timeout)
            if self.process.returncode is not None:
                _unmount_under(self.exec_root)  # dockerd leaves netns/default (an nsfs mount) behind
                _unmount_under(self.data_root)
            return self.process.returncode
        finally:
            self.pidfile.unlink(missing_ok=True)
            self._lock.close()
            if self._blackhole is not None:
                self._blackhole.close()

    def log_tail(self, size: int = 4000) -> str:
        return _tail(self.log, size)


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
    runc = _which("runc")
    if runc is None or not state.is_dir():
        return
    listed = subprocess.run([runc, "--root", str(state), "list", "-q"], capture_output=True, text=True, check=False)
    for container_id in listed.stdout.split():
        subprocess.run([runc, "--root", str(state), "kill", container_id, "KILL"], capture_output=True, check=False)


def start_engine(root: Path, *, timeout: float = 60.0) -> Engine:
    """Start a private dockerd (log and config in `root`) and return once its API answers a ping."""
    if os.geteuid() != 0:
        raise EngineUnavailable("dockerd needs root here (no rootless setup), and this test process is not root.")
    dockerd = _which("dockerd")
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
        _unmount_under(exec_root)
        _unmount_under(data_root)
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
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not _answers(sock):
            if process.poll() is not None:
                why = f"exit {process.returncode}"
                raise EngineUnavailable(ENGINE_FAILED.format(why=why, log=log, tail=_tail(log)))
            if time.monotonic() > deadline:
                process.kill()
                process.wait(10)
                raise EngineUnavailable(ENGINE_FAILED.format(why=f"no answer in {timeout} s", log=log, tail=_tail(log)))
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


def _recipe_digest(recipe: object) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _cached_image(engine: Engine, name: str, digest: str) -> bool:
    try:
        image = engine.client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return bool(image.labels.get(RECIPE_LABEL) == digest)


def debian_mirror() -> str:
    """The machine's own Debian mirror, from apt's sources (deb822 or one-line), else deb.debian.org."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[0] not in "# ")
            suites = fields.get("Suites", "").split()
            if SUITE in suites and fields.get("Types", "deb").strip() == "deb":
                return fields["URIs"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            words = line.split()
            uris = [w for w in words[1:] if "://" in w]
            if words and words[0] == "deb" and uris and SUITE in words:
                return uris[0]
    return DEFAULT_MIRROR


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, in the order they were mounted."""
    top = str(path.resolve())
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [m for m in mounts if m == top or m.startswith(top + "/")]


def _unmount_under(path: Path) -> None:
    for mount in reversed(_mounts_under(path)):
        subprocess.run(["umount", "-l", mount], check=False, env={"PATH": SYSTEM_PATH})


def _remove_tree(path: Path) -> None:
    """rm -rf a debootstrap target, first unmounting the /proc and /sys it may have left mounted inside."""
    _unmount_under(path)
    left = _mounts_under(path)
    if left:
        raise RuntimeError(f"Cannot remove {path}: {left} are still mounted under it; unmount them by hand.")
    shutil.rmtree(path, ignore_errors=True)


def _python_recipe() -> dict[str, object]:
    return {
        "suite": SUITE,
        "variant": "minbase",
        "include": list(PYTHON_PACKAGES),
        "excludes": list(ROOTFS_EXCLUDES),
        "changes": list(PYTHON_CHANGES),
        "arch": platform.machine(),
    }


def make_rootfs_tarball(target: Path) -> Path:
    """`debootstrap --variant=minbase --include=python3,ca-certificates bookworm` into a tarball at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in target.parent.glob("debootstrap-*"):  # a crashed run's
        _remove_tree(old)
    workdir = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=target.parent))
    rootfs = workdir / "rootfs"
    log = workdir / "debootstrap.log"
    try:
        recipe = _python_recipe()
        command = [
            "debootstrap",
            f"--variant={recipe['variant']}",
            f"--include={','.join(PYTHON_PACKAGES)}",
            SUITE,
            str(rootfs),
            debian_mirror(),
        ]
        with log.open("wb") as out:
            result = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PATH": SYSTEM_PATH}
            )
        if result.returncode != 0:
            detail = _tail(rootfs / "debootstrap" / "debootstrap.log", 2000) or _tail(log, 2000)
            raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}):\n{detail}")
        partial = target.with_suffix(".partial")
        excludes = [f"--exclude={pattern}" for pattern in ROOTFS_EXCLUDES]
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), *excludes, "."], check=True)
        partial.replace(target)
        for stale in target.parent.glob(f"rootfs-{SUITE}-python-*.tar"):  # an older recipe's
            if stale != target:
                stale.unlink()
    finally:
        _remove_tree(workdir)
    return target


def _import_result_error(result: str) -> str | None:
    for line in result.splitlines():
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if isinstance(message, dict) and message.get("error"):
                return str(message["error"])
    return None


def build_python_image(engine: Engine) -> str:
    """`cellnode-test/python:3.11`: Debian bookworm's python3 and standard library, imported from a rootfs tarball.

    Both the tarball (in the cache directory) and the image (in the cached data root) are reused while the recipe
    is unchanged."""
    digest = _recipe_digest(_python_recipe())
    if _cached_image(engine, PYTHON_IMAGE, digest):
        return PYTHON_IMAGE
    tarball = cache_root() / f"rootfs-{SUITE}-python-{digest}.tar"
    if not tarball.exists():
        make_rootfs_tarball(tarball)
    repository, tag = PYTHON_IMAGE.split(":")
    result = engine.client.api.import_image_from_file(
        str(tarball), repository=repository, tag=tag, changes=[*PYTHON_CHANGES, f"LABEL {RECIPE_LABEL}={digest}"]
    )
    error = _import_result_error(str(result))
    if error:
        raise RuntimeError(f"docker import of {tarball} failed: {error}")
    return PYTHON_IMAGE


def _image_python(engine: Engine, image: str) -> dict[str, str]:
    """The Python inside `image`: version, machine and glibc, so that pip picks wheels that load there."""
    probe = (
        "import json, os, platform, sys;"
        "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], 'machine': platform.machine(),"
        " 'glibc': os.confstr('CS_GNU_LIBC_VERSION').split()[1]}))"
    )
    output = engine.client.containers.run(image, ["python3", "-c", probe], network_mode="none", remove=True)
    return dict(json.loads(output))


def pip_platforms(machine: str, glibc: str) -> list[str]:
    """Every manylinux tag a glibc of this version runs (pip does not expand `manylinux_2_36` by itself)."""
    major, minor = (int(part) for part in glibc.split(".")[:2])
    assert major == 2, f"glibc {glibc!r} is not 2.x"
    tags = [f"manylinux_2_{m}_{machine}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{machine}" for m, name in legacy.items() if m <= minor]


def _dist_packages_tar(site: Path, python: str) -> Path:
    """A tar of `site` as /usr/local/lib/pythonX.Y/dist-packages, owned by root, for put_archive at /."""
    out = site.parent / "dist-packages.tar"

    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode |= 0o444 if info.isfile() else 0o555
        return info

    with tarfile.open(out, "w") as tar:
        tar.add(site, arcname=f"usr/local/lib/python{python}/dist-packages", filter=as_root)
    return out


def build_service_image(engine: Engine) -> str:
    """`cellnode-test/services:1`: the Python image plus fastapi, uvicorn, hypercorn, grpcio,
    grpcio-health-checking and prometheus-client, installed from the host with `pip --target`."""
    base = build_python_image(engine)
    base_id = engine.client.images.get(base).id
    digest = _recipe_digest({"base": base_id, "packages": list(SERVICE_PACKAGES)})
    if _cached_image(engine, SERVICE_IMAGE, digest):
        return SERVICE_IMAGE
    target = _image_python(engine, base)
    with tempfile.TemporaryDirectory(prefix="cellnode-site-") as tmp:
        site = Path(tmp) / "site"
        abi = "cp" + target["version"].replace(".", "")
        command = [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
            "--no-warn-script-location",
            "--target", str(site), "--only-binary=:all:",
            "--implementation", "cp", "--python-version", target["version"], "--abi", abi,
            *(f"--platform={tag}" for tag in pip_platforms(target["machine"], target["glibc"])),
            *SERVICE_PACKAGES,
        ]  # fmt: skip
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip could not install {SERVICE_PACKAGES} for the image:\n{result.stdout[-3000:]}")
        # Console scripts carry the host interpreter's shebang; in the image, run `python3 -m uvicorn` instead.
        shutil.rmtree(site / "bin", ignore_errors=True)
        archive = _dist_packages_tar(site, target["version"])
        container = engine.client.containers.create(base, ["true"], network_mode="none")
        try:
            with archive.open("rb") as data:
                if not container.put_archive("/", data):
                    raise RuntimeError(f"Copying {archive} into a {base} container failed.")
            repository, tag = SERVICE_IMAGE.split(":")
            container.commit(repository, tag, changes=[f"LABEL {RECIPE_LABEL}={digest}", 'CMD ["python3"]'])
        finally:
            container.remove(force=True)
    return SERVICE_IMAGE


# The local registry


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
        _end(self.process, timeout)
        return self.process.returncode

    def log_tail(self, size: int = 4000) -> str:
        return _tail(self.root / "registry.log", size)


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


def write_app(directory: Path, name: str, source: str) -> Path:
    """A world-readable code directory for a read-only bind mount: pytest's temporary directories are 0700, and a
    container user other than root must read it."""
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    (directory / name).write_text(source)
    (directory / name).chmod(0o644)
    return directory


def _end(process: subprocess.Popen[Any], timeout: float) -> None:
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


def start_registry(root: Path, user: str, password: str, *, timeout: float = 30.0) -> Registry:
    """Start `docker-registry serve` on a free 127.0.0.1 port; return once /v2/ asks for credentials (401)."""
    registry = _which("docker-registry")
    htpasswd = _which("htpasswd")
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
                preexec_fn=_die_with_parent,
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
        if "address already in use" not in _tail(root / "registry.log"):
            break
    raise RuntimeError(f"docker-registry did not come up on {address}:\n{_tail(root / 'registry.log')}")


def push_image(engine: Engine, repository: str, tag: str, auth_config: dict[str, str] | None) -> None:
    """Push and raise `docker.errors.APIError` on failure: the engine reports push errors inside its stream."""
    for message in engine.client.api.push(repository, tag, stream=True, decode=True, auth_config=auth_config):
        if "error" in message:
            raise docker.errors.APIError(f"push of {repository}:{tag} failed: {message['error']}")


def add_file_layer(engine: Engine, image: str, path: str, content: bytes, reference: str) -> str:
    """Commit `image` plus one file as `reference` (repository:tag); returns the new image id. No build, no network."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(path.lstrip("/"))
        info.size = len(content)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(content))
    container = engine.client.containers.create(image, ["true"], network_mode="none")
    try:
        container.put_archive("/", buffer.getvalue())
        repository, tag = reference.rsplit(":", 1)
        committed = container.commit(repository, tag)
    finally:
        container.remove(force=True)
    return str(committed.id)


@contextlib.contextmanager
def running(engine: Engine, image: str, command: list[str], **kwargs: Any) -> Iterator[Any]:
    """A detached container with host networking, force-removed afterwards."""
    container = engine.client.containers.run(image, command, detach=True, network_mode="host", **kwargs)
    try:
        yield container
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
