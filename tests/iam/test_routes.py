"""Every route of the API, walked from the server's own OpenAPI document: each one refuses a missing, bad, revoked or
expired credential, and each caller below the route's role. A route with no rule here fails the suite, so a new route
cannot ship without its check."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from cellnode.iam.credentials import digest
from cellnode.store.models import new_id
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow

LEVELS = ("outsider", "viewer", "developer", "admin", "server_admin")
PUBLIC = "public"  # no credential needed
ANY = "authenticated"  # any valid credential; what it shows depends on the caller


@dataclass
class Rule:
    """The least a caller must be for a route, and a request that would pass everything but that check."""

    need: str
    body: Any = None
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class World:
    server: ServerProcess
    keys: dict[str, str]  # level -> API key
    ids: dict[str, str]  # what path parameters name
    bad: dict[str, str]  # name -> Authorization header that must get 401


def rules(ids: dict[str, str]) -> dict[tuple[str, str], Rule]:
    """The expected rule of every route, with a request body that is valid for it."""
    folder = {"folder_id": ids["folder"]}
    nb = "# %%\nx = 1\n# %%\ny = x\n"
    node = {"name": "walker", "checkpoint": ids["checkpoint"], "outputs": [{"name": "y", "type": "int"}], **folder}
    return {
        ("GET", "/health"): Rule(PUBLIC),
        ("GET", "/metrics"): Rule(ANY),
        ("GET", "/cellnode/v1/specs"): Rule(ANY),
        ("GET", "/cellnode/v1/usage"): Rule("viewer", params=folder),
        ("GET", "/cellnode/v1/audit"): Rule("admin", params=folder),
        ("GET", "/cellnode/v1/folders"): Rule(ANY),
        ("POST", "/cellnode/v1/folders"): Rule("server_admin", {"name": "walked"}),
        ("GET", "/cellnode/v1/folders/{ref}"): Rule("viewer"),
        ("PATCH", "/cellnode/v1/folders/{ref}"): Rule("admin", {"description": "walked"}),
        ("DELETE", "/cellnode/v1/folders/{ref}"): Rule("server_admin"),
        ("GET", "/cellnode/v1/folders/{ref}/access-bindings"): Rule("viewer"),
        ("POST", "/cellnode/v1/folders/{ref}/access-bindings"): Rule(
            "admin", {"role": "viewer", "subject": f"user:{ids['victim_user']}"}
        ),
        ("DELETE", "/cellnode/v1/folders/{ref}/access-bindings"): Rule(
            "admin", params={"role": "viewer", "subject": f"user:{ids['victim_user']}"}
        ),
        ("POST", "/cellnode/v1/iam/tokens"): Rule(ANY),
        ("GET", "/cellnode/v1/iam/whoami"): Rule(ANY),
        ("POST", "/cellnode/v1/iam/users"): Rule("server_admin", {"name": "walked"}),
        ("GET", "/cellnode/v1/iam/users"): Rule("server_admin"),
        ("DELETE", "/cellnode/v1/iam/users/{user_id}"): Rule("server_admin"),
        ("POST", "/cellnode/v1/iam/service-accounts"): Rule("admin", {"name": "walked", **folder}),
        ("GET", "/cellnode/v1/iam/service-accounts"): Rule("viewer", params=folder),
        ("DELETE", "/cellnode/v1/iam/service-accounts/{account_id}"): Rule("admin"),
        ("POST", "/cellnode/v1/iam/api-keys"): Rule("admin", {"principal_id": ids["victim_account"]}),
        ("GET", "/cellnode/v1/iam/api-keys"): Rule("admin", params={"principal_id": ids["victim_account"]}),
        ("DELETE", "/cellnode/v1/iam/api-keys/{key_id}"): Rule("admin"),
        ("POST", "/cellnode/v1/checkpoints"): Rule("developer", {"notebook": nb, "notebook_name": "walk.py", **folder}),
        ("GET", "/cellnode/v1/checkpoints"): Rule("viewer", params=folder),
        ("GET", "/cellnode/v1/checkpoints/{ref}"): Rule("viewer"),
        ("DELETE", "/cellnode/v1/checkpoints/{ref}"): Rule("developer"),
        ("POST", "/cellnode/v1/checkpoints/{ref}:pin"): Rule("developer", {"name": "walked"}),
        ("POST", "/cellnode/v1/checkpoints/{ref}:unpin"): Rule("developer"),
        ("POST", "/cellnode/v1/nodes"): Rule("developer", node),
        ("GET", "/cellnode/v1/nodes"): Rule("viewer", params=folder),
        ("GET", "/cellnode/v1/nodes/{ref}"): Rule("viewer"),
        ("PATCH", "/cellnode/v1/nodes/{ref}"): Rule("developer", {"description": "walked"}),
        ("DELETE", "/cellnode/v1/nodes/{ref}"): Rule("developer"),
        ("POST", "/cellnode/v1/nodes/{ref}:suspend"): Rule("developer"),
        ("POST", "/cellnode/v1/nodes/{ref}:resume"): Rule("developer"),
        ("GET", "/cellnode/v1/nodes/{ref}/logs"): Rule("viewer"),
        ("GET", "/cellnode/v1/nodes/{ref}/openapi.json"): Rule("viewer"),
        ("GET", "/cellnode/v1/nodes/{ref}/proto"): Rule("viewer"),
        ("POST", "/cellnode/v1/secrets"): Rule("admin", {"name": "WALKED_TOO", "value": "walked", **folder}),
        ("GET", "/cellnode/v1/secrets"): Rule("developer", params=folder),
        ("GET", "/cellnode/v1/secrets/{ref}"): Rule("developer"),
        ("PATCH", "/cellnode/v1/secrets/{ref}"): Rule("admin", {"description": "walked"}),
        ("DELETE", "/cellnode/v1/secrets/{ref}"): Rule("admin"),
        ("POST", "/cellnode/v1/aliases"): Rule(
            "developer", {"name": "walker", "nodes": [{"node": ids["node"], "percent": 100}], **folder}
        ),
        ("GET", "/cellnode/v1/aliases"): Rule("viewer", params=folder),
        ("GET", "/cellnode/v1/aliases/{ref}"): Rule("viewer"),
        ("PATCH", "/cellnode/v1/aliases/{ref}"): Rule("developer", {"description": "walked"}),
        ("DELETE", "/cellnode/v1/aliases/{ref}"): Rule("developer"),
        # The execute API is served outside FastAPI's routing, so the OpenAPI document does not list it.
        ("POST", "/datasphere/v1/nodes/{node_id}:execute"): Rule("developer", {"input": {}, **folder}),
        ("POST", "/datasphere/v1/aliases/{alias_name}:execute"): Rule("developer", {"input": {}, **folder}),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    home = tmp_path_factory.mktemp("routes")
    # Hundreds of bad credentials from one address: without a higher limit they would get 429 instead of 401.
    env = {"CELLNODE_PROFILE": str(home / "profile.json"), "CELLNODE_AUTH_FAILURE_LIMIT": "100000"}
    server = ServerProcess(home / "data", env=env).start()
    with server.client() as admin:
        folder = admin.create_folder("walked-folder")["id"]
        keys = {"server_admin": server.key}
        for level in ("outsider", "viewer", "developer", "admin"):
            user = admin.create_user(f"{level}-user")
            keys[level] = admin.create_api_key(principal_id=user["id"])["secret"]
            if level != "outsider":
                admin.add_access_binding(folder, role=level, subject=user["subject"])
        path = notebook(home, "x = 1", "y = x")
        checkpoint = admin.create_checkpoint(path, name="walked", folder_id=folder)
        node = admin.create_node("walked", checkpoint="walked", inputs={}, outputs={"y": "int"}, folder_id=folder)
        secret = admin.create_secret("WALKED", "walked", folder_id=folder)
        body = {"name": "walked", "nodes": [{"node": node["id"], "percent": 100}], "folder_id": folder}
        alias = admin._request("POST", "/cellnode/v1/aliases", json=body)
        victim_user = admin.create_user("victim")
        victim_account = admin.create_service_account("victim", folder_id=folder)
        victim_key = admin.create_api_key(principal_id=victim_account["id"])
        revoked = admin.create_api_key(principal_id=victim_user["id"])
        admin.revoke_api_key(revoked["id"])
    expired = "t1." + new_id() + new_id()
    with sqlite3.connect(server.data_dir / "cellnode.db") as db:
        past = (datetime.now(UTC) - timedelta(hours=1)).replace(tzinfo=None).isoformat(" ")
        db.execute(
            "INSERT INTO iam_tokens (id, principal_id, api_key_id, token_hash, created_at, expires_at) "
            "VALUES (?, ?, NULL, ?, ?, ?)",
            (new_id(), victim_user["id"], digest(expired), past, past),
        )
    ids = {
        "folder": folder,
        "checkpoint": checkpoint["id"],
        "node": node["id"],
        "secret": secret["id"],
        "alias": alias["id"],
        "victim_user": victim_user["id"],
        "victim_account": victim_account["id"],
        "victim_key": victim_key["id"],
    }
    bad = {
        "none": "",
        "unknown key": "Api-Key cnk_" + "x" * 40,
        "revoked key": f"Api-Key {revoked['secret']}",
        "expired token": f"Bearer {expired}",
        "malformed": "Basic dXNlcjpwYXNz",
    }
    yield World(server, keys, ids, bad)
    server.stop()


def fill(path: str, ids: dict[str, str]) -> str:
    ref = ids["folder"] if path.startswith("/cellnode/v1/folders") else ids["node"]
    if path.startswith("/cellnode/v1/checkpoints"):
        ref = ids["checkpoint"]
    if path.startswith("/cellnode/v1/secrets"):
        ref = ids["secret"]
    if path.startswith("/cellnode/v1/aliases"):
        ref = ids["alias"]
    return (
        path.replace("{ref}", ref)
        .replace("{node_id}", ids["node"])
        .replace("{alias_name}", "datasphere.user.walked")
        .replace("{user_id}", ids["victim_user"])
        .replace("{account_id}", ids["victim_account"])
        .replace("{key_id}", ids["victim_key"])
    )


def call(world: World, method: str, path: str, rule: Rule, authorization: str) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization else {}
    return httpx.request(
        method,
        world.server.url + fill(path, world.ids),
        headers=headers,
        json=rule.body,
        params=rule.params,
        timeout=60,
    )


def test_every_route_has_a_rule(world: World) -> None:
    document = httpx.get(f"{world.server.url}/openapi.json").json()
    routes = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    routes.add(("GET", "/health"))
    known = set(rules(world.ids))
    missing = routes - known
    assert not missing, f"routes with no rule in tests/iam/test_routes.py; add one for each: {sorted(missing)}"
    stale = {route for route in known - routes if not route[1].startswith(("/datasphere", "/health"))}
    assert not stale, f"rules for routes that no longer exist: {sorted(stale)}"


def test_every_route_refuses_a_missing_or_bad_credential(world: World) -> None:
    failures = []
    for (method, path), rule in rules(world.ids).items():
        if rule.need == PUBLIC:
            continue
        for name, authorization in world.bad.items():
            answer = call(world, method, path, rule, authorization)
            if answer.status_code != 401:
                failures.append(f"{method} {path} with {name}: {answer.status_code} {answer.text[:200]}")
            elif world.keys["server_admin"] in answer.text:
                failures.append(f"{method} {path} echoed a credential")
    assert not failures, "\n".join(failures)


def test_every_route_refuses_callers_below_its_role(world: World) -> None:
    failures, checked = [], 0
    for (method, path), rule in rules(world.ids).items():
        if rule.need in (PUBLIC, ANY):
            continue
        for level in LEVELS[: LEVELS.index(rule.need)]:
            answer = call(world, method, path, rule, f"Api-Key {world.keys[level]}")
            checked += 1
            if answer.status_code not in (403, 404):
                failures.append(f"{method} {path} as {level}: {answer.status_code} {answer.text[:200]}")
    assert not failures, "\n".join(failures)
    assert checked > 60


def test_the_rules_bodies_are_valid(world: World) -> None:
    """The denials above are real only if the requests were otherwise acceptable: a server admin's read calls pass."""
    for (method, path), rule in rules(world.ids).items():
        if method == "GET" and rule.need != PUBLIC:
            answer = call(world, method, path, rule, f"Api-Key {world.keys['server_admin']}")
            assert answer.status_code == 200, (method, path, answer.text[:300])
