"""Shared fixtures: environment hygiene, and one real server per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellnode.client import Client
from tests.helpers import ServerProcess

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No CELLNODE_* setting or proxy leaks into a test, and no test writes the user's profile."""
    for key in list(os.environ):
        if key.startswith("CELLNODE_") or key.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CELLNODE_PROFILE", str(tmp_path_factory.mktemp("profile") / "profile.json"))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One `cellnode serve` for the session, on a loopback port, with its own data directory."""
    home = tmp_path_factory.mktemp("server")
    process = ServerProcess(home / "data", env={"CELLNODE_PROFILE": str(home / "profile.json")}).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[Client]:
    with server.client() as api:
        yield api


@pytest.fixture(scope="session")
def randomizer(client: Client) -> dict[str, Any]:
    """The reference randomizer node, deployed once for the session."""
    client.create_checkpoint(EXAMPLES / "randomizer.ipynb", name="randomizer-checkpoint")
    return client.create_node(
        "randomizer-node",
        checkpoint="randomizer-checkpoint",
        inputs={"input_data": "dict"},
        outputs={"output_data": "dict"},
    )
