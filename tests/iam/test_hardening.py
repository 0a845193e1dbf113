"""Names and IDs from requests never become paths: traversal attempts find nothing and write nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from cellnode.exceptions import CellnodeError, NotFound
from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow
TRAVERSALS = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "/etc/passwd", "a/../../b", "\\..\\..\\x", "%00", ".."]


def files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


@pytest.mark.parametrize("ref", TRAVERSALS)
def test_traversal_refs_are_not_found(client: Client, randomizer: dict[str, Any], ref: str) -> None:
    for lookup in (client.get_node, client.get_checkpoint, client.get_folder):
        with pytest.raises((NotFound, CellnodeError)) as caught:
            lookup(ref)
        assert "root:" not in str(caught.value)
    assert client.node_logs(randomizer["id"], instance=ref) == []


def test_a_notebook_name_is_only_a_name(server: ServerProcess, client: Client) -> None:
    before = files(server.data_dir.parent)
    headers = {"Authorization": f"Api-Key {server.key}"}
    for name in ("../../escape.py", "/tmp/escape.py", "..\\escape.py"):
        answer = httpx.post(
            f"{server.url}/cellnode/v1/checkpoints",
            headers=headers,
            json={"notebook": "# %%\nx = 1\n", "notebook_name": name},
            timeout=120,
        )
        assert answer.status_code in (200, 400), answer.text
        if answer.status_code == 200:
            client.delete_checkpoint(answer.json()["id"])
    written = {p for p in files(server.data_dir.parent) - before if "escape" in p.name}
    assert not written
    assert not Path("/tmp/escape.py").exists()
