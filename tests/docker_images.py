"""Images for the Docker tests, built locally with no registry and no network besides the Debian mirror.

The Python image is a Debian bookworm rootfs made with `debootstrap` and imported; the service image adds PyPI
wheels installed from the host with `pip --target`. Each carries a label with its recipe's digest, so an image in
the cached data root is reused while its recipe is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import docker.errors

from tests.docker_engine import SYSTEM_PATH, Engine, cache_root, mounts_under, tail, unmount_under

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


def _remove_tree(path: Path) -> None:
    """rm -rf a debootstrap target, first unmounting the /proc and /sys it may have left mounted inside."""
    unmount_under(path)
    left = mounts_under(path)
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
            detail = tail(rootfs / "debootstrap" / "debootstrap.log", 2000) or tail(log, 2000)
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


def write_app(directory: Path, name: str, source: str) -> Path:
    """A world-readable code directory for a read-only bind mount: pytest's temporary directories are 0700, and a
    container user other than root must read it."""
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    (directory / name).write_text(source)
    (directory / name).chmod(0o644)
    return directory


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
