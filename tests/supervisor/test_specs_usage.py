"""Specs and usage against a real server: limits inside the instance, refusals at create, units that accrue."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cellnode.client import Client
from cellnode.exceptions import ConfigError, FailedPrecondition, InvalidArgument
from cellnode.supervisor.specs import REFERENCE_SPECS, load_specs
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow


def test_the_reference_table_is_served(client: Client) -> None:
    found = client.list_specs()
    assert [s["name"] for s in found["specs"]] == list(REFERENCE_SPECS)
    assert next(s for s in found["specs"] if s["name"] == "g1.1") == {
        "name": "g1.1",
        "vcpu": 8,
        "ram_gb": 48,
        "gpus": 1,
        "units_per_second": 72,
    }
    assert found["gpus"] == 0 and "overcommitted" in found["policy"]


def test_specs_are_checked_at_create(client: Client, randomizer: dict[str, object]) -> None:
    kwargs = {
        "checkpoint": "randomizer-checkpoint",
        "inputs": {"input_data": "dict"},
        "outputs": {"output_data": "dict"},
    }
    with pytest.raises(FailedPrecondition, match=r"Spec 'g1.1' needs 1 GPU\(s\) and this machine has 0"):
        client.create_node("gpu-node", spec="g1.1", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="Unknown spec 'x9.9'; choose one of c1.4"):
        client.create_node("odd-node", spec="x9.9", **kwargs)  # type: ignore[arg-type]


def test_limits_inside_the_instance_and_usage(server: ServerProcess, client: Client, tmp_path: Path) -> None:
    path = notebook(
        tmp_path,
        "import os\nkey = 'OMP_NUM_THREADS'",
        "threads = os.environ.get(key, '')\ngpus = os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')",
    )
    client.create_checkpoint(path, name="limits-checkpoint")
    started = datetime.now(UTC) - timedelta(seconds=1)
    node = client.create_node(
        "limits-node", checkpoint="limits-checkpoint", inputs={}, outputs={"threads": "str", "gpus": "str"}, spec="c1.8"
    )
    import os

    expected = str(min(8, len(os.sched_getaffinity(0))))
    assert client.execute("limits-node", {}) == {"threads": expected, "gpus": ""}
    time.sleep(1.5)
    client.suspend_node("limits-node")
    first = client.usage(node_id=node["id"], since=started)
    assert len(first) == 1 and first[0]["spec"] == "c1.8" and first[0]["instances"] == 1
    assert first[0]["seconds"] >= 2 and first[0]["units"] == first[0]["seconds"] * 8
    time.sleep(1.2)
    assert client.usage(node_id=node["id"], since=started) == first, "a suspended node accrues nothing"
    client.delete_node(node["id"])
    client.delete_checkpoint("limits-checkpoint")


def test_a_site_spec_table(tmp_path: Path) -> None:
    table = tmp_path / "specs.json"
    table.write_text(json.dumps({"tiny": {"vcpu": 1, "ram_gb": 2, "units_per_second": 0.5}}))
    specs = load_specs(table)
    assert specs["tiny"].gpus == 0 and specs["tiny"].environment(4)["OMP_NUM_THREADS"] == "1"
    table.write_text('{"tiny": {}}')
    with pytest.raises(ConfigError, match="CELLNODE_SPECS_FILE"):
        load_specs(table)
