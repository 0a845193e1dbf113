"""Session fixtures for tests that need a real Docker engine: a private dockerd, locally built images, a registry.

The engine is ours (`tests/docker_engine.py`): Debian's docker.io, installed when missing, started on a socket of
its own with no bridge and no iptables rules; images come from `tests/docker_images.py` and the registry from
`tests/docker_registry.py`. If the engine truly cannot start here, every test that needs it is skipped with the
reason, and the reason is repeated in a red section at the end of the run, so CI output shows it.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator

import pytest

from tests.docker_engine import Engine, EngineUnavailable, ensure_packages, remove_registry_tags, start_engine
from tests.docker_images import build_python_image, build_service_image
from tests.docker_registry import Registry, start_registry

UNAVAILABLE: list[str] = []
TIMINGS: dict[str, float] = {}
REGISTRY_USER = "cellnode"


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A dockerd of our own for the session; `.client` is a `docker.DockerClient`, `.host` goes in DOCKER_HOST."""
    started = time.monotonic()
    try:
        ensure_packages()
        engine = start_engine(tmp_path_factory.mktemp("dockerd"))
    except EngineUnavailable as exc:
        UNAVAILABLE.append(str(exc))
        pytest.skip(f"DOCKER ENGINE UNAVAILABLE, so this test did not run: {exc}")
    TIMINGS["packages and dockerd"] = time.monotonic() - started
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def python_image(docker_engine: Engine) -> str:
    """`cellnode-test/python:3.11`: Debian bookworm's python3 with the standard library only."""
    started = time.monotonic()
    image = build_python_image(docker_engine)
    TIMINGS["python image"] = time.monotonic() - started
    return image


@pytest.fixture(scope="session")
def service_image(docker_engine: Engine, python_image: str) -> str:
    """`cellnode-test/services:1`: the Python image with fastapi, uvicorn, hypercorn, grpcio(-health-checking)
    and prometheus-client."""
    started = time.monotonic()
    image = build_service_image(docker_engine)
    TIMINGS["service image"] = time.monotonic() - started
    return image


@pytest.fixture(scope="session")
def registry(docker_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry on 127.0.0.1 with basic auth; `.address`, `.auth_config`, `.user`, `.password`."""
    server = start_registry(tmp_path_factory.mktemp("registry"), REGISTRY_USER, secrets.token_urlsafe(16))
    yield server
    server.stop()
    shutil.rmtree(server.root / "storage", ignore_errors=True)  # pytest keeps the last three runs' temp dirs
    remove_registry_tags(docker_engine)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if UNAVAILABLE:
        terminalreporter.section("Docker engine unavailable: its tests were SKIPPED", sep="!", red=True, bold=True)
        for reason in UNAVAILABLE:
            terminalreporter.line(reason, red=True)
    if TIMINGS:
        spent = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in TIMINGS.items())
        terminalreporter.line(f"docker test setup: {spent}")
