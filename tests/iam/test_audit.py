"""The audit log: naming actions (pure), the writer (a real database), and recording against real servers."""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from cellnode.exceptions import InvalidArgument, PermissionDenied
from cellnode.iam.audit import AuditLog, Target, describe, result_of
from cellnode.iam.credentials import Caller, digest, new_api_key
from cellnode.store.db import Database
from cellnode.store.models import new_id
from tests.cli.test_cli import cli
from tests.helpers import ServerProcess, notebook


@pytest.mark.parametrize(
    ("method", "template", "params", "action", "resource"),
    [
        ("POST", "/cellnode/v1/nodes", {}, "nodes.create", ""),
        ("PATCH", "/cellnode/v1/nodes/{ref}", {"ref": "churn"}, "nodes.update", "node/churn"),
        ("DELETE", "/cellnode/v1/nodes/{ref}", {"ref": "churn"}, "nodes.delete", "node/churn"),
        ("POST", "/cellnode/v1/nodes/{ref}:suspend", {"ref": "churn"}, "nodes.suspend", "node/churn"),
        ("POST", "/cellnode/v1/checkpoints/{ref}:pin", {"ref": "c1"}, "checkpoints.pin", "checkpoint/c1"),
        ("POST", "/cellnode/v1/folders", {}, "folders.create", ""),
        ("POST", "/cellnode/v1/iam/tokens", {}, "iam.tokens.create", ""),
        ("GET", "/cellnode/v1/nodes", {}, "nodes.list", ""),
        ("GET", "/cellnode/v1/nodes/{ref}/logs", {"ref": "n"}, "nodes.logs.get", "node/n"),
        ("POST", "/datasphere/v1/nodes/{node_id}:execute", {"node_id": "n"}, "nodes.execute", "node/n"),
        (
            "DELETE",
            "/cellnode/v1/folders/{folder_id}/access-bindings/{binding}",
            {"folder_id": "f", "binding": "b"},
            "folders.access_bindings.delete",
            "folder/f/access-binding/b",
        ),
    ],
)
def test_actions_and_resources_come_from_the_route(
    method: str, template: str, params: dict[str, str], action: str, resource: str
) -> None:
    target = describe(method, template, params)
    assert (target.action, target.resource) == (action, resource)


def test_targets_name_creates_and_folders() -> None:
    assert describe("POST", "/cellnode/v1/nodes", {}) == Target("nodes.create", "", "node", None, True)
    assert describe("POST", "/cellnode/v1/folders/{id}/access-bindings", {"id": "f"}).folder == "f"
    assert not describe("POST", "/cellnode/v1/nodes/{ref}:resume", {"ref": "n"}).is_create
    assert [result_of(code) for code in (200, 204, 401, 403, 404, 409, 500)] == [
        "ok",
        "ok",
        "denied",
        "denied",
        "failed",
        "failed",
        "failed",
    ]


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'cellnode.db'}")
    database.migrate()
    return database


def rows(db: Database) -> list[tuple[Any, ...]]:
    with db.engine.connect() as connection:
        return list(connection.exec_driver_sql("SELECT * FROM audit_events ORDER BY id"))


def test_close_writes_every_queued_row_in_batches(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(db)
    batches: list[int] = []
    write = log._write
    monkeypatch.setattr(log, "_write", lambda batch: (batches.append(len(batch)), write(batch)))
    caller = Caller("p" * 20, "user", None, None)
    for index in range(2500):
        log.record(action="nodes.create", code=200, resource=f"node/{index}", caller=caller, client="127.0.0.1")
    log.close()
    written = rows(db)
    assert len(written) == 2500 == log.written == sum(batches)
    assert max(batches) <= 1000 and len(batches) < 2500, "rows are written in batches"
    assert [row[5] for row in written] == [f"node/{index}" for index in range(2500)], "in the order recorded"
    assert written[0][3] == "user:" + "p" * 20


def test_a_full_queue_drops_counts_and_says_so(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog(db, max_queued=10)
    gate = threading.Event()
    write = log._write
    log._write = lambda batch: (gate.wait(10), write(batch))  # type: ignore[method-assign]
    log.record(action="first", code=200)
    deadline = time.monotonic() + 5
    while not log._queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer has taken the first row, and waits at the gate
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="cellnode.audit"):
        for index in range(15):
            log.record(action=f"row-{index}", code=403)
    assert time.monotonic() - started < 1, "record() never waits"
    assert log.dropped == 5
    # The first drop is logged at once; the next ones are counted, not logged one line each.
    assert "dropped 1 row(s) (1 in all)" in caplog.text and "audit log is incomplete" in caplog.text
    assert caplog.text.count("Audit log: dropped") == 1
    gate.set()
    with caplog.at_level(logging.ERROR, logger="cellnode.audit"):
        log.close()
    assert "5 row(s) were dropped while the server ran" in caplog.text
    assert len(rows(db)) == 11 == log.written


def test_folder_names_become_ids(db: Database) -> None:
    with db.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO folders (id, name, description, created_at) VALUES ('f0000000000000000001', 'team-a', '', "
            "'2026-11-24 00:00:00')"
        )
    log = AuditLog(db)
    for folder in ("team-a", "f0000000000000000001", "gone0000000000000000", "a-name-that-is-not-any-folder", None):
        log.record(action="nodes.delete", code=404, folder=folder)
    log.close()
    assert [row[6] for row in rows(db)] == [
        "f0000000000000000001",
        "f0000000000000000001",
        "gone0000000000000000",
        None,
        None,
    ]


# -- against the session's real server


def events(api: Client, **kwargs: Any) -> list[dict[str, Any]]:
    return api.audit(limit=kwargs.pop("limit", 1000), **kwargs)


def admin_id(server: ServerProcess) -> str:
    with sqlite3.connect(server.data_dir / "cellnode.db") as db:
        (principal_id,) = db.execute("SELECT id FROM principals WHERE name = 'admin'").fetchone()
    return str(principal_id)


@pytest.mark.slow
def test_a_create_and_a_delete_are_recorded(server: ServerProcess, client: Client, tmp_path: Path) -> None:
    checkpoint = client.create_checkpoint(notebook(tmp_path, "audited = 1"))
    client.delete_checkpoint(checkpoint["id"])
    found = {e["action"]: e for e in events(client) if e["resource"] == f"checkpoint/{checkpoint['id']}"}
    principal = admin_id(server)
    for action in ("checkpoints.create", "checkpoints.delete"):
        event = found[action]
        assert event["principal_id"] == principal and event["subject"] == f"serviceAccount:{principal}"
        assert (event["result"], event["code"], event["client"]) == ("ok", 200, "127.0.0.1")
        assert event["folder_id"] == checkpoint["folder_id"]
    assert found["checkpoints.create"]["at"] <= found["checkpoints.delete"]["at"]


@pytest.mark.slow
def test_a_bad_key_is_denied_with_no_principal(server: ServerProcess, client: Client) -> None:
    probe = f"probe-{secrets.token_hex(4)}"
    bogus = {"Authorization": f"Api-Key cnk_{secrets.token_urlsafe(30)}"}
    with httpx.Client(base_url=server.url) as http:
        answers = [
            http.get(f"/cellnode/v1/nodes/{probe}", headers=bogus),
            http.post(f"/cellnode/v1/nodes/{probe}:suspend"),
            http.delete(f"/cellnode/v1/nodes/{probe}", headers={"Authorization": "nonsense"}),
        ]
    # 429: the session's other tests may have used up this address's failed authentications for the minute.
    codes = [answer.status_code for answer in answers]
    assert set(codes) <= {401, 429}, codes
    found = [e for e in reversed(events(client)) if e["resource"] == f"node/{probe}"]
    assert [(e["action"], e["code"]) for e in found] == list(
        zip(("nodes.get", "nodes.suspend", "nodes.delete"), codes, strict=True)
    )
    for event in found:
        assert (event["principal_id"], event["subject"], event["result"]) == (None, "", "denied")
        assert event["client"] == "127.0.0.1"


@pytest.mark.slow
def test_denied_execute_calls_are_recorded_and_successful_ones_are_not(
    server: ServerProcess, client: Client, randomizer: dict[str, Any]
) -> None:
    url = f"{server.url}/datasphere/v1/nodes/{randomizer['id']}:execute"
    call = {"input": {"input_data": {"left_bound": 1, "right_bound": 2}}}
    outsider = new_id()
    key = {"Authorization": f"Api-Key {server.key}"}
    unknown = httpx.post(
        url, json={"folder_id": randomizer["folder_id"], **call}, headers={"Authorization": "Bearer x"}
    )
    refused = httpx.post(url, json={"folder_id": outsider, **call}, headers=key)
    by_header = httpx.post(
        server.url + "/", json=call["input"], headers={**key, "x-node-id": randomizer["id"], "x-folder-id": outsider}
    )
    served = httpx.post(url, json={"folder_id": randomizer["folder_id"], **call}, headers=key)
    assert unknown.status_code in (401, 429)  # 429: this address's failed authentications are used up
    assert [r.status_code for r in (refused, by_header, served)] == [403, 403, 200]
    found = {e["request_id"]: e for e in events(client) if e["action"] == "nodes.execute"}
    assert served.headers["x-request-id"] not in found
    principal = admin_id(server)
    expected = {
        unknown: (None, None, unknown.status_code),  # refused before its body is read: no folder
        refused: (principal, outsider, 403),
        by_header: (principal, outsider, 403),
    }
    for response, (who, folder, code) in expected.items():
        event = found[response.headers["x-request-id"]]
        assert (event["principal_id"], event["folder_id"], event["code"]) == (who, folder, code)
        assert (event["resource"], event["result"], event["client"]) == (
            f"node/{randomizer['id']}",
            "denied",
            "127.0.0.1",
        )


@pytest.mark.slow
def test_the_cli(server: ServerProcess, client: Client) -> None:
    client.create_token()
    listed = cli(server, "audit", "--json", "--limit", "3", "--since", "1h")
    assert listed.returncode == 0, listed.stderr
    found = json.loads(listed.stdout)
    assert 1 <= len(found) <= 3 and {"at", "subject", "action", "resource", "result", "client"} <= set(found[0])
    assert [e["at"] for e in found] == sorted((e["at"] for e in found), reverse=True), "newest first"
    shown = cli(server, "audit", "--limit", "20")
    assert shown.returncode == 0, shown.stderr
    assert "ACTION" in shown.stdout and "iam.tokens.create" in shown.stdout and "serviceAccount:" in shown.stdout
    refused = cli(server, "audit", "--limit", "0")
    assert refused.returncode == 1 and refused.stderr.startswith("InvalidArgument: 'limit' must be from 1 to 10000")
    wrong = cli(server, "audit", "--since", "yesterday")
    assert wrong.returncode != 0 and "is not a duration" in wrong.stderr
    with pytest.raises(InvalidArgument, match="got 10001"):
        client.audit(limit=10001)


@pytest.mark.slow
def test_no_secret_is_ever_stored(server: ServerProcess, client: Client) -> None:
    token = client.create_token()["iam_token"]
    bogus = f"cnk_{secrets.token_urlsafe(30)}"
    with httpx.Client(base_url=server.url) as http:
        http.get("/cellnode/v1/nodes?folder_id=nowhere&secret=hunter2", headers={"Authorization": f"Api-Key {bogus}"})
        http.post("/cellnode/v1/iam/tokens", headers={"Authorization": f"Bearer {token}"})
        http.delete(
            "/cellnode/v1/checkpoints/none?password=hunter2", headers={"Authorization": f"Api-Key {server.key}"}
        )
    client.audit(limit=1)  # waits until the rows so far are written
    with sqlite3.connect(server.data_dir / "cellnode.db") as db:
        dump = "\n".join(repr(row) for row in db.execute("SELECT * FROM audit_events"))
    for secret in (server.key, bogus, token, token.removeprefix("t1."), "hunter2", "Api-Key", "Bearer"):
        assert secret not in dump


# -- rows outlive the server; who may read them


def add_user(data_dir: Path, folder_name: str) -> tuple[str, str, str]:
    """A user who is admin of a new folder, made as the server would store them: (folder ID, user ID, API key)."""
    folder_id, user_id, key = new_id(), new_id(), new_api_key()
    now = "2026-11-24 00:00:00"
    with sqlite3.connect(data_dir / "cellnode.db") as db:
        db.execute(
            "INSERT INTO folders (id, name, description, created_at) VALUES (?, ?, '', ?)",
            (folder_id, folder_name, now),
        )
        db.execute(
            "INSERT INTO principals (id, kind, name, folder_id, description, server_admin, created_at) "
            "VALUES (?, 'user', 'auditor', NULL, '', 0, ?)",
            (user_id, now),
        )
        db.execute(
            "INSERT INTO access_bindings (folder_id, role, principal_id, created_at) VALUES (?, 'admin', ?, ?)",
            (folder_id, user_id, now),
        )
        db.execute(
            "INSERT INTO api_keys (id, principal_id, secret_hash, description, created_at) VALUES (?, ?, ?, '', ?)",
            (new_id(), user_id, digest(key), now),
        )
    return folder_id, user_id, key


@pytest.mark.slow
def test_rows_survive_sigterm_and_a_restart_and_only_admins_read_them(tmp_path: Path) -> None:
    process = ServerProcess(tmp_path / "data", env={"CELLNODE_PROFILE": str(tmp_path / "profile.json")}).start()
    try:
        with httpx.Client(base_url=process.url, headers={"Authorization": f"Api-Key {process.key}"}) as http:
            for index in range(300):
                assert http.delete(f"/cellnode/v1/checkpoints/burst-{index}").status_code == 404
        with process.client() as admin:
            default = admin.list_folders()[0]["id"]
            admin.create_token()
    finally:
        process.stop()  # SIGTERM, at once: the rows still queued are written on the way out
    with sqlite3.connect(tmp_path / "data" / "cellnode.db") as db:
        (burst,) = db.execute(
            "SELECT count(*) FROM audit_events WHERE resource LIKE 'checkpoint/burst-%' AND result = 'failed'"
        ).fetchone()
        (tokens,) = db.execute("SELECT count(*) FROM audit_events WHERE action = 'iam.tokens.create'").fetchone()
    assert (burst, tokens) == (300, 1)

    team, user, key = add_user(tmp_path / "data", "team-b")
    process.start()
    try:
        # A denied request naming team-b by name: the row gets the folder's ID.
        bogus = {"Authorization": f"Api-Key cnk_{secrets.token_urlsafe(30)}"}
        httpx.get(f"{process.url}/cellnode/v1/nodes", params={"folder_id": "team-b"}, headers=bogus)
        with process.client() as admin, Client(process.url, key) as auditor:
            everything = events(admin, limit=10000)
            assert len([e for e in everything if e["resource"].startswith("checkpoint/burst-")]) == 300
            with pytest.raises(PermissionDenied, match=f"may not read the audit log in folder '{default}'"):
                auditor.audit(folder_id=default)
            with pytest.raises(PermissionDenied, match="that needs the role 'admin' there"):
                auditor.audit(folder_id="default")
            own = auditor.audit(folder_id="team-b")
            assert [(e["action"], e["folder_id"], e["code"]) for e in own] == [("nodes.list", team, 401)]
            assert auditor.audit() == own, "without a folder: the folders they are admin of"
            since = auditor.audit(folder_id=team, since=datetime.now(UTC))
            assert since == []
            refusals = [e for e in events(admin) if e["principal_id"] == user]
            assert [(e["action"], e["folder_id"], e["result"], e["code"]) for e in refusals] == [
                ("audit.list", default, "denied", 403),
                ("audit.list", default, "denied", 403),
            ]
            assert all(e["subject"] == f"user:{user}" for e in refusals)
    finally:
        process.stop()
