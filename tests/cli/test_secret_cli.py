"""`cellnode secret ...` and `node create/update --secret` as a user runs them: subprocesses against a real server.
Values go in through a file or standard input only, and never come back out."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from cellnode.client import Client
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow


def cli(server: ServerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CELLNODE_")}
    return subprocess.run(
        [sys.executable, "-m", "cellnode", *args],
        env={**base, "CELLNODE_URL": server.url, "CELLNODE_TOKEN": server.key, "COLUMNS": "200"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def digest_of(server: ServerProcess, node: str, variable: str) -> dict[str, object]:
    result = cli(server, "node", "execute", node, "--input", json.dumps({"name": variable}))
    assert result.returncode == 0, result.stderr
    output: dict[str, object] = json.loads(result.stdout)["output"]
    return output


def test_secrets_through_the_cli(server: ServerProcess, client: Client, tmp_path: Path) -> None:
    value, new = "cli-" + secrets.token_urlsafe(20), "cli-" + secrets.token_urlsafe(20)
    (tmp_path / "value.txt").write_text(value + "\n")
    path = notebook(
        tmp_path,
        "import hashlib, os\nname = 'PATH'",
        "found = os.environ[name]\ndigest = hashlib.sha256(found.encode()).hexdigest()\nlength = len(found)",
    )
    client.create_checkpoint(path, name="cli-env-reader")
    runs = []

    def run(*args: str, stdin: str | None = None, code: int = 0) -> subprocess.CompletedProcess[str]:
        result = cli(server, *args, stdin=stdin)
        runs.append(result)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        return result

    created = run("secret", "create", "CLI_TOKEN", "--value-file", str(tmp_path / "value.txt"), "--description", "x")
    assert "CLI_TOKEN" in created.stdout and "***" in created.stdout
    missing = run("secret", "create", "CLI_OTHER", code=2)
    assert "never from the command line" in missing.stderr
    both = run("secret", "create", "CLI_OTHER", "--value-file", str(tmp_path / "value.txt"), "--value-stdin", code=2)
    assert "not both" in both.stderr
    run("secret", "create", "CLI_STDIN", "--value-stdin", stdin=new + "\n")
    listed = json.loads(run("secret", "list", "--json").stdout)
    assert {"CLI_TOKEN", "CLI_STDIN"} <= {s["name"] for s in listed} and {s["value"] for s in listed} == {"***"}
    assert "CLI_TOKEN" in run("secret", "list").stdout
    assert json.loads(run("secret", "get", "CLI_TOKEN", "--json").stdout)["version"] == 1

    node = run(
        "node", "create", "--name", "cli-secret-node", "--checkpoint", "cli-env-reader", "--input", "name:str",
        "--output", "digest:str", "--output", "length:int", "--secret", "CLI_TOKEN", "--json",
    )  # fmt: skip
    assert json.loads(node.stdout)["secrets"] == ["CLI_TOKEN"]
    assert "CLI_TOKEN" in run("node", "get", "cli-secret-node").stdout
    # The file's trailing newline is not part of the value.
    assert digest_of(server, "cli-secret-node", "CLI_TOKEN") == {
        "digest": hashlib.sha256(value.encode()).hexdigest(),
        "length": len(value),
    }

    updated = run("secret", "update", "CLI_TOKEN", "--value-stdin", "--json", stdin=new)
    assert json.loads(updated.stdout)["version"] == 2
    run("node", "update", "cli-secret-node", "--roll")
    assert digest_of(server, "cli-secret-node", "CLI_TOKEN")["digest"] == hashlib.sha256(new.encode()).hexdigest()

    in_use = run("secret", "delete", "CLI_TOKEN", code=1)
    assert in_use.stderr.startswith("FailedPrecondition:") and "'cli-secret-node'" in in_use.stderr
    run("node", "update", "cli-secret-node", "--secret", "CLI_TOKEN", "--no-secrets", code=2)
    run("node", "update", "cli-secret-node", "--no-secrets")
    assert json.loads(run("node", "get", "cli-secret-node", "--json").stdout)["secrets"] == []
    assert "Deleted secret CLI_TOKEN" in run("secret", "delete", "CLI_TOKEN").stdout
    run("secret", "delete", "CLI_STDIN")
    run("node", "delete", "cli-secret-node")
    for result in runs:
        assert value not in result.stdout + result.stderr and new not in result.stdout + result.stderr
    assert value not in server.log() and new not in server.log()
