"""`cellnode alias ...` and the SDK's alias methods, against a real server: subprocesses as a user runs them.

The session server is shared, so every node and alias made here carries this module's own suffix.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from cellnode.client import Client
from cellnode.exceptions import CellExecutionError
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow

SUFFIX = secrets.token_hex(3)
CELL = "if x < 0 and who == 'b':\n    raise ValueError('b refuses a negative x')\nanswer = who * abs(x)"


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CELLNODE_")}
    return subprocess.run(
        [sys.executable, "-m", "cellnode", *args],
        # Wide enough that no message or table row is wrapped.
        env={**base, "CELLNODE_URL": server.url, "CELLNODE_TOKEN": server.key, "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def run(server: ServerProcess, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    result = cli(server, *args)
    assert result.returncode == code, (args, result.stdout, result.stderr)
    if code:
        assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def pair(client: Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Two nodes with the same variables that answer which one they are: `answer` is 'a' or 'b'. Given a negative
    `x`, 'b' fails (500) and 'a' does not."""
    tmp = tmp_path_factory.mktemp("alias-nodes")
    names = (f"alias-a-{SUFFIX}", f"alias-b-{SUFFIX}")
    for who, name in zip("ab", names, strict=True):
        client.create_checkpoint(notebook(tmp, f"who = {who!r}\nx = 1", CELL, name=f"{who}.ipynb"), name=name)
        client.create_node(name, checkpoint=name, inputs={"x": "int"}, outputs={"answer": "str"})
    yield names
    # An alias that names a node keeps it from being deleted: aliases go first.
    for alias in client.list_aliases():
        if alias["name"].endswith(SUFFIX):
            client.delete_alias(alias["id"])
    for name in names:
        client.delete_node(name)
        client.delete_checkpoint(name)


def test_create_get_update_list_delete(server: ServerProcess, client: Client, pair: tuple[str, str]) -> None:
    a, b = pair
    name = f"flow-{SUFFIX}"
    routing = f"datasphere.user.{name}"
    created = run(server, "alias", "create", name, "--node", f"{a}=90", "--node", f"{b}=10", "--metadata", "team=x")
    assert routing in created.stdout

    shown = run(server, "alias", "get", name).stdout
    lines = {line.split()[1]: line for line in shown.splitlines() if line.split()[1:2] in ([a], [b])}
    assert "90%" in lines[a] and "10%" in lines[b]
    assert all("HEALTHY" in line and "yes" in line for line in lines.values())
    assert "team=x" in shown and "off" in shown
    assert f"'{server.url}/datasphere/v1/aliases/{routing}:execute'" in shown
    assert f"x-node-alias: {routing}" in shown
    found = json.loads(run(server, "alias", "get", routing, "--json").stdout)
    assert [(s["node_name"], s["percent"], s["effective_percent"]) for s in found["nodes"]] == [
        (a, 90, 90),
        (b, 10, 10),
    ]

    updated = json.loads(
        run(server, "alias", "update", name, "--node", f"{a}=0", "--node", f"{b}=100", "--json").stdout
    )
    assert [(s["percent"], s["effective_percent"]) for s in updated["nodes"]] == [(0, 0), (100, 100)]
    assert updated["version"] == found["version"] + 1
    # In force as soon as the update returns.
    assert {client.execute_alias(routing, {"x": 1})["answer"] for _ in range(10)} == {"b"}

    listed = run(server, "alias", "list").stdout
    row = next(line for line in listed.splitlines() if routing in line)
    assert f"{a}=0, {b}=100" in row and found["id"] in row
    assert found["id"] in [alias["id"] for alias in json.loads(run(server, "alias", "list", "--json").stdout)]

    assert f"Deleted alias {routing} ({found['id']})." in run(server, "alias", "delete", name).stdout
    gone = run(server, "alias", "get", name, code=1)
    assert gone.stderr.startswith(f"NotFound: Alias {name!r} not found")


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--node", "churn-v1", "'churn-v1' is not NODE=PERCENT"),
        ("--node", "=90", "'=90' is not NODE=PERCENT"),
        ("--node", "churn-v1=ninety", "'churn-v1=ninety': the percent 'ninety' is not a whole number"),
        ("--node", "churn-v1=9.5", "'churn-v1=9.5': the percent '9.5' is not a whole number"),
        ("--node", "churn-v1=-5", "'churn-v1=-5': the percent -5 is negative"),
        ("--node", "churn-v1=101", "'churn-v1=101': the percent 101 is over 100"),
        ("--mirror", "churn-v3", "'churn-v3' is not NODE=PERCENT"),
    ],
)
def test_bad_share_syntax_names_the_option_value_and_fix(
    server: ServerProcess, option: str, value: str, fragment: str
) -> None:
    args = ["alias", "create", f"syntax-{SUFFIX}", "--node", "churn-v1=100", option, value]
    if option == "--node":
        args[3:5] = []
    result = run(server, *args, code=2)
    assert f"Invalid value for {option}: {fragment}" in result.stderr
    assert f"(for example {option} churn-v" in result.stderr


def test_bad_metadata_and_conflicting_flags(server: ServerProcess) -> None:
    result = run(server, "alias", "create", f"meta-{SUFFIX}", "--node", "n=100", "--metadata", "team", code=2)
    assert "Invalid value for --metadata: 'team' is not KEY=VALUE" in result.stderr
    result = run(server, "alias", "update", f"meta-{SUFFIX}", "--mirror", "n=5", "--no-mirror", code=2)
    assert "give --mirror or --no-mirror, not both" in result.stderr
    result = run(server, "alias", "update", f"meta-{SUFFIX}", "--no-rollback", "--rollback-window", "60", code=2)
    assert "give one or the other" in result.stderr


def test_percentages_must_sum_to_100(server: ServerProcess, pair: tuple[str, str]) -> None:
    a, b = pair
    result = run(server, "alias", "create", f"sum-{SUFFIX}", "--node", f"{a}=60", "--node", f"{b}=30", code=1)
    assert result.stderr.startswith("InvalidArgument:") and result.stderr.count("\n") == 1
    assert f"the node percentages sum to 90, not 100 ({a}=60, {b}=30); make them sum to 100" in result.stderr


def test_public_alias_takes_no_acl(server: ServerProcess, client: Client, pair: tuple[str, str]) -> None:
    a, _b = pair
    folder = client.get_node(a)["folder_id"]
    args = ("alias", "create", f"public-{SUFFIX}", "--node", f"{a}=100", "--public", "--acl", folder)
    result = run(server, *args, code=1)
    assert result.stderr.startswith("InvalidArgument:")
    assert "a public alias may be called by any authenticated principal, so it takes no ACL" in result.stderr
    assert f"public-{SUFFIX}" not in [alias["name"] for alias in client.list_aliases()]


def test_mirrors_and_rollback(server: ServerProcess, client: Client, pair: tuple[str, str]) -> None:
    a, b = pair
    name = f"mirror-{SUFFIX}"
    args = ("--mirror", f"{b}=100", "--rollback-on-error-rate", "0.5", "--rollback-window", "60")
    created = json.loads(run(server, "alias", "create", name, "--node", f"{a}=100", *args, "--public", "--json").stdout)
    assert [(s["node_name"], s["percent"]) for s in created["mirrors"]] == [(b, 100)]
    assert (created["rollback_error_rate"], created["rollback_window"], created["public"]) == (0.5, 60, True)
    for _ in range(3):
        assert client.execute_alias(created["routing_name"], {"x": 1})["answer"] == "a"
    deadline = time.monotonic() + 10
    while not (stats := client.get_alias(name)["mirror_stats"]) or stats[0]["requests"] < 3:
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    assert (stats[0]["requests"], stats[0]["differ"]) == (3, 3)  # 'b' from the mirror, never returned
    shown = run(server, "alias", "get", name).stdout
    assert "Mirrors" in shown and "100% copied" in shown and "Mirror comparisons" in shown
    assert "when its error rate passes 50% over 60 s, once it has 10 answers there" in shown and "public" in shown

    changed = json.loads(run(server, "alias", "update", name, "--no-mirror", "--no-rollback", "--json").stdout)
    assert (changed["mirrors"], changed["rollback_error_rate"], changed["rollback_window"]) == ([], None, None)
    run(server, "alias", "delete", name)


def test_sdk_execute_alias_and_route_key(client: Client, pair: tuple[str, str]) -> None:
    a, b = pair
    alias = client.create_alias(f"sticky-{SUFFIX}", nodes={a: 50, b: 50}, description="route keys")
    routing = alias["routing_name"]
    # A bare name is looked up first; a routing name with a folder goes out as it is.
    assert client.execute_alias(alias["name"], {"x": 1})["answer"] in ("a", "b")
    for key in ("user-1", "user-2", "user-3"):
        answers = {client.execute_alias(routing, {"x": 1}, route_key=key)["answer"] for _ in range(15)}
        assert len(answers) == 1, (key, answers)
    by_key = {
        client.execute_alias(routing, {"x": 1}, folder_id=alias["folder_id"], route_key=f"k{i}")["answer"]
        for i in range(40)
    }
    assert by_key == {"a", "b"}
    assert {client.execute_alias(routing, {"x": 1})["answer"] for _ in range(40)} == {"a", "b"}
    assert client.delete_alias(routing)["id"] == alias["id"]


def test_rollback_shows_in_get(server: ServerProcess, client: Client, pair: tuple[str, str]) -> None:
    a, b = pair
    name = f"rollback-{SUFFIX}"
    args = ("--rollback-on-error-rate", "0.2", "--rollback-window", "60", "--rollback-min-requests", "3")
    alias = json.loads(
        run(server, "alias", "create", name, "--node", f"{a}=50", "--node", f"{b}=50", *args, "--json").stdout
    )
    deadline = time.monotonic() + 30
    while client.get_alias(name)["nodes"][1]["percent"]:
        assert time.monotonic() < deadline, client.get_alias(name)
        try:
            assert client.execute_alias(alias["routing_name"], {"x": -1})["answer"] == "a"
        except CellExecutionError as exc:
            assert "b refuses a negative x" in str(exc)
    found = client.get_alias(name)
    assert [(s["percent"], s["effective_percent"]) for s in found["nodes"]] == [(100, 100), (0, 0)]
    (event,) = found["rollbacks"]
    assert event["node_id"] == found["nodes"][1]["node_id"] and event["error_rate"] == 1
    shown = run(server, "alias", "get", name).stdout
    row = next(line for line in shown.splitlines() if f"{a}=50, {b}=50" in line)
    assert f" {b} " in row and "100%" in row and f"{a}=100, {b}=0" in row
    run(server, "alias", "delete", name)
