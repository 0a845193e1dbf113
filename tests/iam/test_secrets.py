"""Secrets: the box (AES-GCM under the master key) on its own, then against real servers and real instances: a cell
node reads its secret as an environment variable, the value shows nowhere else (responses, errors, the server's
output, log files, the data and runtime directories, /metrics), a secret in use cannot be deleted, a new value reaches
a node at its next roll, a moved ciphertext or a wrong master key fails with a clear message, and only a folder's
admins manage its secrets."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from cellnode.config import load_settings
from cellnode.exceptions import (
    AlreadyExists,
    CellExecutionError,
    ConfigError,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from cellnode.iam.credentials import digest, new_api_key
from cellnode.iam.secrets import SecretBox
from cellnode.store.models import Secret, new_id
from tests.helpers import ServerProcess, notebook

# The deployed cell reads the variable a request names; the capture runs it with a variable every process has.
CELLS = (
    "import hashlib, os\nname = 'PATH'",
    "found = os.environ[name]\ndigest = hashlib.sha256(found.encode()).hexdigest()\nlength = len(found)",
)
OUTPUTS = {"digest": "str", "length": "int"}


def new_value() -> str:
    return "pw-" + secrets.token_urlsafe(24)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- the box


def box(key: bytes | None = None) -> SecretBox:
    return SecretBox(key or os.urandom(32), source="a test")


def row(box_: SecretBox, value: str, *, secret_id: str = "a" * 20, folder_id: str = "f" * 20) -> Secret:
    nonce, ciphertext = box_.encrypt(secret_id, folder_id, value)
    return Secret(id=secret_id, folder_id=folder_id, name="DB_PASSWORD", nonce=nonce, ciphertext=ciphertext)


def test_values_round_trip_with_a_fresh_nonce_each_time() -> None:
    vault, value = box(), new_value()
    first, second = row(vault, value), row(vault, value)
    assert vault.decrypt(first) == vault.decrypt(second) == value
    assert len(first.nonce) == 12 and first.nonce != second.nonce and first.ciphertext != second.ciphertext
    assert value.encode() not in first.ciphertext
    assert vault.decrypt(row(vault, "")) == "" and vault.decrypt(row(vault, "пароль ✓")) == "пароль ✓"


def test_a_ciphertext_moved_to_another_row_does_not_decrypt() -> None:
    vault, value = box(), new_value()
    original = row(vault, value)
    for secret_id, folder_id in (("b" * 20, original.folder_id), (original.id, "g" * 20)):
        moved = Secret(
            id=secret_id, folder_id=folder_id, name="OTHER", nonce=original.nonce, ciphertext=original.ciphertext
        )
        with pytest.raises(ConfigError, match="Secret 'OTHER'") as info:
            vault.decrypt(moved)
        assert value not in str(info.value) and "cellnode secret update OTHER" in str(info.value)
    tampered = row(vault, value)
    tampered.ciphertext = bytes([tampered.ciphertext[0] ^ 1]) + tampered.ciphertext[1:]
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        vault.decrypt(tampered)


def test_a_wrong_master_key_names_the_secret_and_the_fix() -> None:
    value = new_value()
    stored = row(box(), value)
    with pytest.raises(ConfigError) as info:
        box().decrypt(stored)
    message = str(info.value)
    assert "Secret 'DB_PASSWORD' (aaaaaaaaaaaaaaaaaaaa)" in message and "another master key" in message
    assert "CELLNODE_MASTER_KEY" in message and value not in message


def test_the_master_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = os.urandom(32)
    monkeypatch.setenv("CELLNODE_MASTER_KEY", base64.b64encode(key).decode())
    settings = load_settings(data_dir=tmp_path)
    assert base64.b64encode(key).decode() not in repr(settings) + str(settings.model_dump())
    from_env = SecretBox.load(settings)
    assert box(key).decrypt(row(from_env, "x")) == "x" and not (tmp_path / "master.key").exists()
    assert "CELLNODE_MASTER_KEY" in repr(from_env) and base64.b64encode(key).decode() not in repr(from_env)
    urlsafe = base64.urlsafe_b64encode(b"\xfb" * 32).decode()
    assert "-" in urlsafe or "_" in urlsafe
    monkeypatch.setenv("CELLNODE_MASTER_KEY", urlsafe)
    SecretBox.load(load_settings(data_dir=tmp_path))
    for bad, problem in (("hunter2-not-a-key!", "not valid base64"), (base64.b64encode(b"k" * 16).decode(), "16")):
        monkeypatch.setenv("CELLNODE_MASTER_KEY", bad)
        with pytest.raises(ConfigError, match="CELLNODE_MASTER_KEY") as info:
            SecretBox.load(load_settings(data_dir=tmp_path))
        assert problem in str(info.value) and bad not in str(info.value) and "os.urandom(32)" in str(info.value)


def test_the_master_key_file_is_made_once_and_private(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    first = SecretBox.load(settings)
    path = tmp_path / "data" / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(base64.b64decode(path.read_text())) == 32
    assert SecretBox.load(settings).decrypt(row(first, "kept")) == "kept"
    assert [p.name for p in path.parent.iterdir()] == ["master.key"], "no staging file left behind"
    path.write_text("garbage\n")
    with pytest.raises(ConfigError, match="master key file .*master.key.* is not valid base64") as info:
        SecretBox.load(settings)
    assert "Restore it from a backup" in str(info.value) and "garbage" not in str(info.value)


# -- against a real server


@dataclass
class Vault:
    server: ServerProcess
    admin: Client
    folder_id: str
    keys: dict[str, str]  # role -> API key of a user holding it on the default folder

    def client(self, role: str) -> Client:
        return Client(self.server.url, self.keys[role])

    def deploy(self, name: str, secret_names: list[str], client: Client | None = None) -> dict[str, Any]:
        return (client or self.admin).create_node(
            name, checkpoint="env-reader", inputs={"name": "str"}, outputs=OUTPUTS, secrets=secret_names
        )


def add_user(db_path: Path, folder_id: str, role: str) -> str:
    """A user holding `role` on the folder, and its API key, written as the server would store them."""
    key, principal, now = new_api_key(), new_id(), "2026-11-24 00:00:00"
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        db.execute(
            "INSERT INTO principals (id, kind, name, folder_id, description, server_admin, created_at) "
            "VALUES (?, 'user', ?, NULL, '', 0, ?)",
            (principal, f"{role}-user", now),
        )
        db.execute(
            "INSERT INTO access_bindings (folder_id, role, principal_id, created_at) VALUES (?, ?, ?, ?)",
            (folder_id, role, principal, now),
        )
        db.execute(
            "INSERT INTO api_keys (id, principal_id, secret_hash, description, created_at, revoked_at) "
            "VALUES (?, ?, ?, '', ?, NULL)",
            (new_id(), principal, digest(key), now),
        )
    return key


def default_folder(db_path: Path) -> str:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        found: str = db.execute("SELECT id FROM folders WHERE name = 'default'").fetchone()[0]
    return found


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    home = tmp_path_factory.mktemp("secrets")
    server = ServerProcess(home / "data", env={"CELLNODE_PROFILE": str(home / "profile.json")}).start()
    db_path = server.data_dir / "cellnode.db"
    folder_id = default_folder(db_path)
    # Before the first authenticated request, so that the server's first read of the bindings sees them.
    keys = {role: add_user(db_path, folder_id, role) for role in ("viewer", "developer")}
    admin = server.client()
    admin.create_checkpoint(notebook(home, *CELLS), name="env-reader")
    yield Vault(server, admin, folder_id, keys)
    admin.close()
    server.stop()


def call(vault: Vault, node: str, variable: str) -> dict[str, Any]:
    return vault.admin.execute(node, {"name": variable})


def runtime_processes(server: ServerProcess) -> list[tuple[int, list[str]]]:
    """The server's zygotes and standalone instances, and their forked instances: (pid, command line)."""
    assert server.proc is not None
    found, parents = [], {server.proc.pid}
    for _ in range(2):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes().decode().rstrip("\0").split("\0")
            except (OSError, ValueError, IndexError):
                continue
            if ppid in parents and "cellnode.runtime" in command and int(entry.name) not in dict(found):
                found.append((int(entry.name), command))
        parents |= {pid for pid, _ in found}
    return found


def files_holding(needle: str, *roots: Path) -> list[Path]:
    holding = []
    for root in roots:
        for path in root.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink() and needle.encode() in path.read_bytes():
                    holding.append(path)
    return holding


@pytest.mark.slow
def test_a_cell_node_reads_its_secret_and_the_value_shows_nowhere_else(vault: Vault) -> None:
    value = new_value()
    created = vault.admin.create_secret("DB_PASSWORD", value, description="the database's")
    assert created["value"] == "***" and created["version"] == 1 and created["name"] == "DB_PASSWORD"
    node = vault.deploy("reader", ["DB_PASSWORD"])
    assert node["secrets"] == ["DB_PASSWORD"]
    assert call(vault, "reader", "DB_PASSWORD") == {"digest": sha(value), "length": len(value)}

    processes = runtime_processes(vault.server)
    # The value is where it belongs, the instances' environment: so the searches below would find it elsewhere.
    environments = [Path(f"/proc/{pid}/environ").read_bytes() for pid, _ in processes]
    assert any(f"DB_PASSWORD={value}".encode() in environ for environ in environments)
    runtime_dirs = {Path(command[-1]).parent for _, command in processes}
    assert runtime_dirs and all(d.name.startswith("cn-") for d in runtime_dirs), processes
    assert not files_holding(value, vault.server.data_dir, *runtime_dirs)
    assert not any(value in str(command) for _, command in processes)

    headers = {"Authorization": f"Api-Key {vault.server.key}"}
    shown = [
        created,
        vault.admin.list_secrets(),
        vault.admin.get_secret("DB_PASSWORD"),
        vault.admin.get_secret(created["id"]),
        vault.admin.get_node("reader"),
        vault.admin.list_nodes(),
        vault.admin.node_logs("reader", tail=1000),
        httpx.get(f"{vault.server.url}/metrics", headers=headers).text,
        httpx.get(f"{vault.server.url}/openapi.json").text,
    ]
    assert value not in json.dumps(shown)
    assert value not in vault.server.log()


@pytest.mark.slow
def test_errors_never_quote_the_value(vault: Vault) -> None:
    value = new_value()
    vault.admin.create_secret("ERRORS_KEPT", new_value())
    number = 314159265358979
    url = f"{vault.server.url}/cellnode/v1/secrets"
    headers = {"Authorization": f"Api-Key {vault.server.key}"}
    requests: list[tuple[str, str, Any]] = [
        ("POST", url, {"name": "db password", "value": value}),
        ("POST", url, {"name": "db_password", "value": value}),
        ("POST", url, {"name": "PATH", "value": value}),
        ("POST", url, {"name": "LD_PRELOAD", "value": value}),
        ("POST", url, {"name": "ERRORS_KEPT", "value": value}),
        ("POST", url, {"name": "TOO_LONG", "value": value + "x" * 65536}),
        ("POST", url, {"name": "WITH_NUL", "value": value + "\x00"}),
        ("POST", url, {"name": "NOT_TEXT", "value": [value]}),
        ("POST", url, {"name": "NOT_TEXT", "value": number}),
        ("POST", url, {"value": value}),
        ("POST", url, {"name": "NO_FOLDER", "value": value, "folder_id": "nowhere"}),
        ("POST", url, [value]),
        ("POST", url, value),
        ("PATCH", f"{url}/ERRORS_KEPT", {"value": value + "\x00"}),
        ("PATCH", f"{url}/ERRORS_KEPT", {"value": value + "x" * 65536, "description": 5}),
        ("PATCH", f"{url}/NOT_THERE", {"value": value}),
    ]
    answers = [httpx.request(method, where, json=body, headers=headers) for method, where, body in requests]
    answers.append(httpx.post(url, content=f'{{"name": "CUT", "value": "{value}'.encode(), headers=headers))
    with vault.client("developer") as developer:
        with pytest.raises(PermissionDenied) as denied:
            developer.create_secret("DEVELOPERS", value)
    for request, answer in zip([*requests, "cut JSON"], answers, strict=True):
        assert 400 <= answer.status_code < 500, (request, answer.text)
        assert value not in answer.text and str(number) not in answer.text, (request, answer.text)
    assert [a.status_code for a in answers[:5]] == [400, 400, 400, 400, 409]
    assert "did you mean 'DB_PASSWORD'?" in answers[1].json()["message"]
    assert "65536" in answers[5].json()["message"] and "NUL" in answers[6].json()["message"]
    assert answers[-2].status_code == 404 and answers[-1].status_code == 400
    assert value not in str(denied.value) and value not in vault.server.log()
    assert not files_holding(value, vault.server.data_dir)


@pytest.mark.slow
def test_a_secret_in_use_cannot_be_deleted(vault: Vault) -> None:
    value = new_value()
    vault.admin.create_secret("IN_USE", value)
    node = vault.deploy("user-node", ["IN_USE"])
    with pytest.raises(FailedPrecondition, match="Secret 'IN_USE'") as info:
        vault.admin.delete_secret("IN_USE")
    assert "'user-node'" in str(info.value) and node["id"] in str(info.value) and value not in str(info.value)
    assert vault.admin.get_secret("IN_USE")["name"] == "IN_USE"
    taken = vault.admin.update_node("user-node", secrets=[])
    assert taken["secrets"] == [] and taken["generation"] == node["generation"] + 1
    with pytest.raises(CellExecutionError, match="KeyError"):
        call(vault, "user-node", "IN_USE")
    deleted = vault.admin.delete_secret("IN_USE")
    assert deleted["value"] == "***"
    with pytest.raises(NotFound, match="Secret 'IN_USE' not found"):
        vault.admin.get_secret("IN_USE")
    with pytest.raises(NotFound, match="Secret 'IN_USE' not found by ID or name in folder"):
        vault.admin.update_node("user-node", secrets=["IN_USE"])
    vault.admin.delete_node("user-node")


@pytest.mark.slow
def test_a_new_value_reaches_the_node_at_its_next_roll(vault: Vault) -> None:
    old, new = new_value(), new_value()
    secret = vault.admin.create_secret("API_TOKEN", old)
    node = vault.deploy("roller", [secret["id"]])
    assert node["secrets"] == ["API_TOKEN"], "given by ID, shown by name"
    assert call(vault, "roller", "API_TOKEN")["digest"] == sha(old)
    updated = vault.admin.update_secret("API_TOKEN", value=new, description="rotated")
    assert updated["version"] == 2 and updated["value"] == "***" and updated["description"] == "rotated"
    assert vault.admin.update_secret("API_TOKEN", description="again")["version"] == 2, "a description is no value"
    assert call(vault, "roller", "API_TOKEN")["digest"] == sha(old), "a running instance keeps its value"
    same = vault.admin.update_node("roller", secrets=["API_TOKEN"])
    assert same["generation"] == node["generation"], "the same secrets: nothing to roll"
    rolled = vault.admin.update_node("roller", roll=True)
    assert rolled["generation"] == node["generation"] + 1
    assert call(vault, "roller", "API_TOKEN") == {"digest": sha(new), "length": len(new)}
    assert not files_holding(new, vault.server.data_dir) and new not in vault.server.log()
    vault.admin.delete_node("roller")


@pytest.mark.slow
def test_a_ciphertext_copied_into_another_row_fails_the_roll(vault: Vault) -> None:
    donor, own = new_value(), new_value()
    vault.admin.create_secret("DONOR", donor)
    target = vault.admin.create_secret("TARGET", own)
    vault.deploy("copied", ["TARGET"])
    with contextlib.closing(sqlite3.connect(vault.server.data_dir / "cellnode.db")) as db, db:
        db.execute(
            "UPDATE secrets SET (nonce, ciphertext) = (SELECT nonce, ciphertext FROM secrets WHERE name = 'DONOR') "
            "WHERE id = ?",
            (target["id"],),
        )
    with pytest.raises(InternalError, match="Secret 'TARGET'.* cannot be decrypted") as info:
        vault.admin.update_node("copied", roll=True, wait_timeout=60)
    assert donor not in str(info.value) and own not in str(info.value)
    assert "cellnode secret update TARGET" in str(info.value)
    assert call(vault, "copied", "TARGET")["digest"] == sha(own), "the previous version keeps serving"
    vault.admin.update_secret("TARGET", value=own)
    vault.admin.update_node("copied", roll=True)
    assert call(vault, "copied", "TARGET")["digest"] == sha(own)
    assert donor not in vault.server.log() and own not in vault.server.log()
    vault.admin.delete_node("copied")


@pytest.mark.slow
def test_developers_use_secrets_and_admins_manage_them(vault: Vault) -> None:
    vault.admin.create_secret("SHARED", "shared-value", description="for the team")
    with vault.client("developer") as developer:
        assert "SHARED" in [s["name"] for s in developer.list_secrets()]
        assert developer.get_secret("SHARED")["value"] == "***"
        for action in (
            lambda: developer.create_secret("MINE", "x"),
            lambda: developer.update_secret("SHARED", value="changed"),
            lambda: developer.delete_secret("SHARED"),
        ):
            with pytest.raises(PermissionDenied, match="needs the role 'admin'"):
                action()
        node = vault.deploy("developers-node", ["SHARED"], client=developer)
        assert developer.execute("developers-node", {"name": "SHARED"})["length"] == len("shared-value")
        developer.delete_node(node["id"])
    with vault.client("viewer") as viewer:
        with pytest.raises(PermissionDenied, match="needs the role 'developer'"):
            viewer.list_secrets()
        with pytest.raises(PermissionDenied, match="needs the role 'developer'"):
            viewer.get_secret("SHARED")
    with pytest.raises(AlreadyExists, match="already has a secret named 'SHARED'"):
        vault.admin.create_secret("SHARED", "other")
    with pytest.raises(InvalidArgument, match="changes nothing"):
        vault.admin.update_secret("SHARED")


@pytest.mark.slow
def test_the_master_key_file_of_a_server(vault: Vault) -> None:
    path = vault.server.data_dir / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(base64.b64decode(path.read_text())) == 32
    assert "Made the master key" in vault.server.log()


@pytest.mark.slow
def test_a_bad_master_key_stops_serve_with_one_line(tmp_path: Path) -> None:
    bad = "hunter2-is-no-key"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLNODE_")}
    result = subprocess.run(
        [sys.executable, "-m", "cellnode", "serve", "--port", "0", "--data-dir", str(tmp_path / "data")],
        env={**env, "CELLNODE_MASTER_KEY": bad, "CELLNODE_PROFILE": "none"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("ConfigError: CELLNODE_MASTER_KEY is not valid base64")
    assert "Traceback" not in result.stderr and bad not in result.stdout + result.stderr


@pytest.mark.slow
def test_a_wrong_master_key_fails_the_node_with_a_clear_reason(tmp_path: Path) -> None:
    right, wrong = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    env = {"CELLNODE_PROFILE": str(tmp_path / "profile.json")}
    server = ServerProcess(tmp_path / "data", env={**env, "CELLNODE_MASTER_KEY": right}).start()
    value = new_value()
    try:
        with server.client() as admin:
            admin.create_checkpoint(notebook(tmp_path, *CELLS), name="env-reader")
            admin.create_secret("DB_PASSWORD", value)
            admin.create_node(
                "keyed", checkpoint="env-reader", inputs={"name": "str"}, outputs=OUTPUTS, secrets=["DB_PASSWORD"]
            )
    finally:
        server.stop()
    assert not (tmp_path / "data" / "master.key").exists(), "the key from the environment is not written down"

    server.env["CELLNODE_MASTER_KEY"] = wrong
    server.start()
    try:
        with server.client() as admin, pytest.raises(InternalError, match="failed to start") as info:
            admin.wait_node("keyed", timeout=60)
    finally:
        server.stop()
    reason = str(info.value)
    assert "Secret 'DB_PASSWORD'" in reason and "cannot be decrypted with the master key in force" in reason
    assert "CELLNODE_MASTER_KEY" in reason and value not in reason
    log = server.log()
    assert "1 secret(s) cannot be decrypted" in log and "'DB_PASSWORD'" in log
    assert "Traceback" not in log and value not in log and wrong not in log and right not in log

    server.env["CELLNODE_MASTER_KEY"] = right
    server.start()
    try:
        with server.client() as admin:
            admin.suspend_node("keyed")
            admin.resume_node("keyed")
            assert admin.execute("keyed", {"name": "DB_PASSWORD"})["digest"] == sha(value)
    finally:
        server.stop()
