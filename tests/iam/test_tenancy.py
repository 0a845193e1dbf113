"""Two teams on one server: folders, users, service accounts, keys, roles and node ACLs, against a real server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from cellnode.exceptions import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from tests.conftest import EXAMPLES
from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow
RANDOMIZER = {"inputs": {"input_data": "dict"}, "outputs": {"output_data": "dict"}}
CALL = {"input_data": {"left_bound": 1, "right_bound": 3}}


@dataclass
class Team:
    server: ServerProcess
    admin: Client
    folders: dict[str, str]  # name -> ID
    people: dict[str, dict[str, Any]]  # name -> principal
    keys: dict[str, str]  # name -> API key
    node: dict[str, Any]

    def client(self, who: str) -> Client:
        return Client(self.server.url, self.keys[who])


@pytest.fixture(scope="module")
def teams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    home = tmp_path_factory.mktemp("teams")
    server = ServerProcess(home / "data", env={"CELLNODE_PROFILE": str(home / "profile.json")}).start()
    admin = server.client()
    folders = {name: admin.create_folder(name)["id"] for name in ("team-a", "team-b")}
    people = {name: admin.create_user(name) for name in ("alice", "bob", "carol")}
    people["scorer"] = admin.create_service_account("scorer", folder_id=folders["team-a"])
    keys = {name: admin.create_api_key(principal_id=p["id"])["secret"] for name, p in people.items()}
    admin.add_access_binding("team-a", role="developer", subject=people["alice"]["subject"])
    admin.add_access_binding("team-b", role="developer", subject=people["bob"]["subject"])
    admin.add_access_binding("team-a", role="viewer", subject=people["carol"]["subject"])
    team = Team(server, admin, folders, people, keys, {})
    with team.client("alice") as alice:
        alice.create_checkpoint(EXAMPLES / "randomizer.ipynb", name="randomizer", folder_id="team-a")
        team.node = alice.create_node("randomizer", checkpoint="randomizer", folder_id="team-a", **RANDOMIZER)
    yield team
    admin.close()
    server.stop()


def execute(team: Team, who: str, folder_id: str) -> httpx.Response:
    return httpx.post(
        f"{team.server.url}/datasphere/v1/nodes/{team.node['id']}:execute",
        headers={"Authorization": f"Api-Key {team.keys[who]}"},
        json={"folder_id": folder_id, "input": CALL},
    )


def test_each_team_sees_only_its_folders(teams: Team) -> None:
    answers: dict[tuple[str, str | None], set[str]] = {}
    with teams.client("alice") as alice, teams.client("bob") as bob:
        assert [f["name"] for f in alice.list_folders()] == ["team-a"]
        assert [f["name"] for f in bob.list_folders()] == ["team-b"]
        assert alice.whoami()["roles"] == {teams.folders["team-a"]: "developer"}
        assert [n["name"] for n in alice.list_nodes(folder_id="team-a")] == ["randomizer"]
        with pytest.raises(PermissionDenied, match="needs the role 'viewer' there, and it has no role"):
            bob.list_nodes(folder_id="team-a")
        # Its existence is not bob's to learn: the answer is the one for an ID that does not exist.
        for call in (bob.get_node, bob.delete_node):
            for ref, folder in ((teams.node["id"], None), ("zzzzzzzzzzzzzzzzzzzz", None), (teams.node["id"], "team-b")):
                with pytest.raises((NotFound, PermissionDenied)) as caught:
                    call(ref, folder_id=folder)
                answers.setdefault((call.__name__, folder), set()).add(str(caught.value).replace(ref, "REF"))
        assert all(len(texts) == 1 for texts in answers.values()), answers


def test_a_viewer_reads_but_does_not_change_or_call(teams: Team) -> None:
    with teams.client("carol") as carol:
        assert carol.get_node(teams.node["id"])["name"] == "randomizer"
        with pytest.raises(PermissionDenied, match="may not change nodes in folder .* needs the role 'developer'"):
            carol.update_node(teams.node["id"], description="mine now")
        with pytest.raises(PermissionDenied):
            carol.delete_node(teams.node["id"])
        with pytest.raises(PermissionDenied, match="create checkpoints"):
            carol.create_checkpoint(EXAMPLES / "randomizer.ipynb", folder_id="team-a")
    answer = execute(teams, "carol", teams.folders["team-a"])
    assert answer.status_code == 403 and "needs the role 'developer'" in answer.json()["message"]


def test_the_reference_call_rule(teams: Team) -> None:
    a, b = teams.folders["team-a"], teams.folders["team-b"]
    first = execute(teams, "alice", a)
    assert first.status_code == 200, first.text
    assert execute(teams, "scorer", a).status_code == 200, "a service account that lives in it"
    refused = execute(teams, "bob", b)
    assert refused.status_code == 403 and "is not in the ACL" in refused.json()["message"]
    with teams.client("alice") as alice:
        alice.update_node(teams.node["id"], acl=[a, b])
    try:
        assert execute(teams, "bob", b).status_code == 200, "developer on a folder now in the ACL"
        assert execute(teams, "bob", a).status_code == 403, "but not from a folder where he has no role"
        assert execute(teams, "scorer", b).status_code == 403, "a service account only for its own folder"
    finally:
        with teams.client("alice") as alice:
            alice.update_node(teams.node["id"], acl=[a])


def test_metrics_show_only_the_callers_nodes(teams: Team) -> None:
    execute(teams, "alice", teams.folders["team-a"])
    seen = {}
    for who in ("alice", "bob"):
        seen[who] = httpx.get(
            f"{teams.server.url}/metrics", headers={"Authorization": f"Api-Key {teams.keys[who]}"}
        ).text
    assert f'node_id="{teams.node["id"]}"' in seen["alice"]
    assert "node_id=" not in seen["bob"] and "# TYPE node_requests_total counter" in seen["bob"]


def test_folders_are_managed_by_server_admins(teams: Team) -> None:
    with teams.client("alice") as alice:
        with pytest.raises(PermissionDenied, match="only a server admin may"):
            alice.create_folder("mine")
        with pytest.raises(PermissionDenied, match="needs the role 'admin'"):
            alice.update_folder("team-a", description="x")
    with pytest.raises(AlreadyExists, match="A folder named 'team-a' already exists"):
        teams.admin.create_folder("team-a")
    with pytest.raises(FailedPrecondition, match=r"still holds 1 node\(s\) \(randomizer\); 1 checkpoint"):
        teams.admin.delete_folder("team-a")
    with pytest.raises(FailedPrecondition, match="is the default folder; it stays"):
        teams.admin.delete_folder("default")
    spare = teams.admin.create_folder("spare", description="for a while")
    assert teams.admin.update_folder("spare", name="spare-2")["name"] == "spare-2"
    assert teams.admin.delete_folder(spare["id"])["id"] == spare["id"]
    with pytest.raises(NotFound):
        teams.admin.get_folder(spare["id"])


def test_access_bindings(teams: Team) -> None:
    dave = teams.admin.create_user("dave")
    key = teams.admin.create_api_key(principal_id=dave["id"])["secret"]
    with Client(teams.server.url, key) as as_dave:
        with pytest.raises(PermissionDenied):
            as_dave.list_nodes(folder_id="team-b")
        teams.admin.add_access_binding("team-b", role="viewer", subject=dave["subject"])
        assert as_dave.list_nodes(folder_id="team-b") == [], "a new binding applies at once"
        bindings = {(b["role"], b["name"]) for b in teams.admin.list_access_bindings("team-b")}
        assert bindings == {("developer", "bob"), ("viewer", "dave")}
        teams.admin.remove_access_binding("team-b", role="viewer", subject=dave["subject"])
        with pytest.raises(PermissionDenied):
            as_dave.list_nodes(folder_id="team-b")
    with pytest.raises(InvalidArgument, match="is not 'serviceAccount:ID' or 'user:ID'"):
        teams.admin.add_access_binding("team-b", role="viewer", subject=dave["id"])
    with pytest.raises(NotFound, match="No serviceAccount has the ID"):
        teams.admin.add_access_binding("team-b", role="viewer", subject=f"serviceAccount:{dave['id']}")
    with pytest.raises(InvalidArgument, match="role"):
        teams.admin.add_access_binding("team-b", role="owner", subject=dave["subject"])
    with teams.client("bob") as bob, pytest.raises(PermissionDenied, match="manage access bindings"):
        bob.add_access_binding("team-b", role="admin", subject=teams.people["bob"]["subject"])
    teams.admin.delete_user(dave["id"])
    with Client(teams.server.url, key) as as_dave, pytest.raises(Unauthenticated):
        as_dave.whoami()


def test_api_keys_are_shown_once_and_revocable(teams: Team) -> None:
    with teams.client("alice") as alice:
        created = alice.create_api_key(description="laptop")
        listed = alice.list_api_keys()
        assert created["id"] in {k["id"] for k in listed}
        assert all("secret" not in k for k in listed) and created["secret"] not in str(listed)
        with Client(teams.server.url, created["secret"]) as laptop:
            token = laptop.create_token()["iam_token"]
            with Client(teams.server.url, token) as by_token:
                assert by_token.whoami()["name"] == "alice"
                alice.revoke_api_key(created["id"])
                with pytest.raises(Unauthenticated, match="The IAM token was revoked with the API key"):
                    by_token.whoami()
            with pytest.raises(Unauthenticated, match="The API key was revoked"):
                laptop.whoami()
        with pytest.raises(PermissionDenied, match="only a server admin may"):
            alice.create_api_key(principal_id=teams.people["bob"]["id"])


def test_service_accounts_belong_to_their_folder(teams: Team) -> None:
    teams.admin.add_access_binding("team-b", role="admin", subject=teams.people["bob"]["subject"])
    with teams.client("bob") as bob:
        robot = bob.create_service_account("robot", folder_id="team-b")
        assert [a["name"] for a in bob.list_service_accounts(folder_id="team-b")] == ["robot"]
        assert bob.create_api_key(principal_id=robot["id"])["secret"].startswith("cnk_")
        with pytest.raises(PermissionDenied, match="create service accounts"):
            bob.create_service_account("intruder", folder_id="team-a")
        with pytest.raises(NotFound):
            bob.delete_service_account(teams.people["scorer"]["id"])
        with pytest.raises(AlreadyExists):
            bob.create_service_account("robot", folder_id="team-b")
        assert bob.delete_service_account(robot["id"])["name"] == "robot"
    teams.admin.remove_access_binding("team-b", role="admin", subject=teams.people["bob"]["subject"])


def test_the_last_server_admin_stays(teams: Team) -> None:
    me = teams.admin.whoami()
    assert me["server_admin"] and me["kind"] == "serviceAccount"
    with pytest.raises(FailedPrecondition, match="is the last server admin"):
        teams.admin.delete_service_account(me["id"])
    with teams.client("alice") as alice, pytest.raises(PermissionDenied, match="only a server admin"):
        alice.list_users()


def test_the_audit_log_names_who_did_what_in_each_team(teams: Team) -> None:
    assert execute(teams, "carol", teams.folders["team-a"]).status_code == 403
    events = teams.admin.audit(teams.folders["team-a"], limit=10000)
    created = [e for e in events if e["action"] == "nodes.create" and e["resource"] == f"node/{teams.node['id']}"]
    assert [(e["subject"], e["result"]) for e in created] == [(teams.people["alice"]["subject"], "ok")]
    refused = [e for e in events if e["action"] == "nodes.execute" and e["result"] == "denied"]
    assert teams.people["carol"]["subject"] in {e["subject"] for e in refused}
    with teams.client("bob") as bob, pytest.raises(PermissionDenied, match="read the audit log"):
        bob.audit(teams.folders["team-a"])
