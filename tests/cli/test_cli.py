"""The CLI as a user runs it: a subprocess talking to a real server through the SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from cellnode.cli import app
from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow


def cli(
    server: ServerProcess | None, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CELLNODE_")}
    if server is not None:
        base |= {"CELLNODE_URL": server.url, "CELLNODE_TOKEN": server.key}
    return subprocess.run(
        [sys.executable, "-m", "cellnode", *args],
        env={**base, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_execute_through_the_cli(server: ServerProcess, randomizer: dict[str, Any]) -> None:
    result = cli(
        server, "node", "execute", "randomizer-node", "--input", '{"input_data": {"left_bound": 3, "right_bound": 3}}'
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"output": {"output_data": {"generated_value": 3}}}


def test_tables_and_json(server: ServerProcess, randomizer: dict[str, Any]) -> None:
    table = cli(server, "node", "list")
    assert table.returncode == 0, table.stderr
    assert "randomizer-node" in table.stdout and "HEALTHY" in table.stdout and "input_data:dict" in table.stdout
    listed = json.loads(cli(server, "node", "list", "--json").stdout)
    assert randomizer["id"] in [node["id"] for node in listed]
    folders = json.loads(cli(server, "folder", "list", "--json").stdout)
    assert randomizer["folder_id"] in [folder["id"] for folder in folders]
    shown = cli(server, "checkpoint", "get", "randomizer-checkpoint")
    assert "generate_value" in shown.stdout and "function" in shown.stdout


def test_create_token_prints_a_bearer_token(server: ServerProcess) -> None:
    result = cli(server, "iam", "create-token")
    assert result.returncode == 0 and result.stdout.startswith("t1.")


def test_flags_override_the_environment(server: ServerProcess, randomizer: dict[str, Any]) -> None:
    result = cli(None, "--url", server.url, "--token", server.key, "node", "get", "randomizer-node", "--json")
    assert json.loads(result.stdout)["id"] == randomizer["id"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("node", "get", "no-such-node"), "NotFound: Node 'no-such-node' not found"),
        (("node", "execute", "randomizer-node", "--input", '{"input_data": 1}'), "InvalidArgument: Input variable"),
        (("checkpoint", "create", "/nonexistent.ipynb"), "ConfigError: Cannot read the notebook"),
    ],
)
def test_errors_are_one_line_and_exit_non_zero(
    server: ServerProcess, randomizer: dict[str, Any], args: tuple[str, ...], fragment: str
) -> None:
    result = cli(server, *args)
    assert result.returncode == 1
    assert result.stderr.startswith(fragment), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_usage_errors_name_the_option(server: ServerProcess) -> None:
    result = cli(server, "node", "create", "--name", "x", "--checkpoint", "c", "--output", "y")
    assert result.returncode == 2
    assert "--output" in result.stderr and "NAME:TYPE" in result.stderr


def test_bad_credential_and_unreachable_server(server: ServerProcess) -> None:
    result = cli(None, "--url", server.url, "--token", "cnk_wrong", "node", "list")
    assert result.returncode == 1 and result.stderr.startswith("Unauthenticated: The API key is not valid")
    result = cli(None, "--url", "http://127.0.0.1:9", "--token", "t", "node", "list")
    assert result.returncode == 1 and result.stderr.startswith("TransportError: Cannot reach")


def test_checkpoint_create_reports_unserializable(server: ServerProcess, tmp_path: Any) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import threading\nlock = threading.Lock()\nvalue = 3")]
    path = tmp_path / "locks.ipynb"
    nbformat.write(nb, path)
    result = cli(server, "checkpoint", "create", str(path))
    assert result.returncode == 0, result.stderr
    assert "The following variables cannot be serialized:" in result.stdout
    assert "lock (_thread.lock)" in result.stdout
    created = json.loads(cli(server, "checkpoint", "list", "--json").stdout)[0]
    cli(server, "checkpoint", "delete", created["id"])


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import typer.main

    command = typer.main.get_command(group)
    found = [prefix]
    for name, sub in getattr(command, "commands", {}).items():
        found.append((*prefix, name))
        for inner in getattr(sub, "commands", {}):
            found.append((*prefix, name, inner))
    return found


@pytest.mark.parametrize("command", _commands(app))
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    result = cli(None, *command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    if len(command) == 2 and command[0] != "serve" or command == ("serve",):
        assert "Example:" in result.stdout, f"{command} needs an example in its help"
