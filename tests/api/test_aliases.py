"""Aliases against a real server: weighted routing, switches without a failed request, sticky keys, shadow copies,
automatic rollback, access, metrics and integrity."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cellnode.client import Client
from cellnode.exceptions import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow
ALIASES = "/cellnode/v1/aliases"
INT_IO = {"inputs": {"x": "int"}, "outputs": {"y": "int"}}
# name -> (cells, variables): every node takes x and gives y; they differ in what y is, or in failing.
NODES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "blue": (("x = 0", "y = x * 2"), INT_IO),
    "green": (("x = 0", "y = x * 2"), INT_IO),
    "red": (("x = 0", "y = x * 2 if x < 10 else -1"), INT_IO),
    "broken": (("x = 0", "y = x // (x - x) if x else 0"), INT_IO),
    "slow-a": (
        ("import time\nx = 0\ns = 0.0", "time.sleep(s)\ny = x * 2"),
        {**INT_IO, "inputs": {"x": "int", "s": "float"}},
    ),
    "slow-b": (
        ("import time\nx = 0\ns = 0.0", "time.sleep(s)\ny = x * 2"),
        {**INT_IO, "inputs": {"x": "int", "s": "float"}},
    ),
}


@dataclass
class Setup:
    server: ServerProcess
    admin: Client
    folder: str
    nodes: dict[str, str]  # name -> ID

    def call(self, alias: str, x: int, *, key: str | None = None, s: float | None = None) -> httpx.Response:
        headers = {"Authorization": f"Api-Key {self.server.key}"}
        if key is not None:
            headers["x-cellnode-route-key"] = key
        inputs: dict[str, Any] = {"x": x} if s is None else {"x": x, "s": s}
        return httpx.post(
            f"{self.server.url}/datasphere/v1/aliases/datasphere.user.{alias}:execute",
            headers=headers,
            json={"folder_id": self.folder, "input": inputs},
            timeout=30,
        )

    def create(self, name: str, nodes: dict[str, int], **fields: Any) -> dict[str, Any]:
        body = {"name": name, "nodes": [{"node": n, "percent": p} for n, p in nodes.items()], **fields}
        return self.admin._request("POST", ALIASES, json=body)

    def update(self, name: str, **fields: Any) -> dict[str, Any]:
        return self.admin._request("PATCH", f"{ALIASES}/{name}", json=fields)

    def metrics(self) -> str:
        return httpx.get(f"{self.server.url}/metrics", headers={"Authorization": f"Api-Key {self.server.key}"}).text

    def get(self, name: str) -> dict[str, Any]:
        return self.admin._request("GET", f"{ALIASES}/{name}")

    def delete(self, name: str) -> dict[str, Any]:
        return self.admin._request("DELETE", f"{ALIASES}/{name}")


def shares(**percent: int) -> list[dict[str, Any]]:
    return [{"node": node.replace("_", "-"), "percent": p} for node, p in percent.items()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    home = tmp_path_factory.mktemp("aliases")
    server = ServerProcess(home / "data", env={"CELLNODE_PROFILE": "none"}).start()
    admin = server.client()
    try:
        for name, (cells, variables) in NODES.items():
            admin.create_checkpoint(notebook(home, *cells, name=f"{name}.ipynb"), name=name)
            admin.create_node(name, checkpoint=name, **variables)
        nodes = {name: admin.wait_node(name)["id"] for name in NODES}
        folder = admin.get_node("blue")["folder_id"]
        yield Setup(server, admin, folder, nodes)
    finally:
        admin.close()
        server.stop()


def test_create_get_update_delete(setup: Setup) -> None:
    created = setup.create("crud", {"blue": 90, "green": 10}, metadata={"team": "ml"}, description="v1 and v2")
    assert created["routing_name"] == "datasphere.user.crud"
    assert [(n["node_name"], n["percent"], n["status"]) for n in created["nodes"]] == [
        ("blue", 90, "HEALTHY"),
        ("green", 10, "HEALTHY"),
    ]
    assert created["metadata"] == {"team": "ml"} and created["acl"] == [setup.folder] and not created["public"]
    by_routing_name = setup.get("datasphere.user.crud")
    assert by_routing_name["id"] == setup.get(created["id"])["id"] == created["id"]
    updated = setup.update("crud", nodes=shares(blue=0, green=100))
    assert [n["percent"] for n in updated["nodes"]] == [0, 100] and updated["version"] > created["version"]
    assert [n["effective_percent"] for n in updated["nodes"]] == [0.0, 100.0]
    listed = setup.admin._request("GET", ALIASES)["aliases"]
    assert "crud" in [a["name"] for a in listed]
    setup.delete("crud")
    assert setup.call("crud", 1).status_code == 404
    # Deleting an alias never touches its nodes.
    assert setup.admin.get_node("blue")["status"] == "HEALTHY"
    assert setup.admin.execute("blue", {"x": 2}) == {"y": 4}


def test_bad_input_is_refused_naming_the_field(setup: Setup) -> None:
    with pytest.raises(InvalidArgument, match=r"sum to 95, not 100 \(blue=90, green=5\)"):
        setup.create("bad-sum", {"blue": 90, "green": 5})
    with pytest.raises(InvalidArgument, match="percent"):
        setup.create("bad-percent", {"blue": 101})
    with pytest.raises(InvalidArgument, match="not one of this server's \\(datasphere.user\\)"):
        setup.create("bad-prefix", {"blue": 100}, prefix="speechkit.stt")
    with pytest.raises(InvalidArgument, match="public alias .* takes no ACL"):
        setup.create("bad-acl", {"blue": 100}, public=True, acl=[setup.folder])
    with pytest.raises(InvalidArgument, match="rollback_window is given alone"):
        setup.create("bad-rollback", {"blue": 100}, rollback_window=10)
    with pytest.raises(InvalidArgument, match="cannot also shadow"):
        setup.create("bad-mirror", {"blue": 100}, mirrors=shares(blue=10))
    with pytest.raises(NotFound, match="Node 'nope' not found"):
        setup.create("bad-node", {"nope": 100})
    setup.create("taken", {"blue": 100})
    try:
        with pytest.raises(AlreadyExists, match="datasphere.user.taken is taken"):
            setup.create("taken", {"green": 100})
    finally:
        setup.delete("taken")


def test_requests_follow_the_weights(setup: Setup) -> None:
    setup.create("weights", {"blue": 80, "green": 20})
    try:
        answered = Counter(setup.call("weights", 1).headers["x-node-id"] for _ in range(300))
        # 300 draws at p = 0.2: mean 60, standard deviation 6.9; 5 sigma either way.
        assert 25 <= answered[setup.nodes["green"]] <= 95, answered
        assert answered[setup.nodes["blue"]] + answered[setup.nodes["green"]] == 300
        # The header form routes the same way.
        response = httpx.post(
            setup.server.url,
            headers={
                "Authorization": f"Api-Key {setup.server.key}",
                "x-node-alias": "datasphere.user.weights",
                "x-folder-id": setup.folder,
            },
            json={"x": 21},
        )
        assert response.status_code == 200 and response.json() == {"output": {"y": 42}}
    finally:
        setup.delete("weights")


def test_suspended_nodes_share_is_spread_and_503_names_the_nodes(setup: Setup) -> None:
    setup.create("spread", {"blue": 50, "green": 50})
    try:
        setup.admin.suspend_node("green")
        assert {setup.call("spread", 1).headers["x-node-id"] for _ in range(30)} == {setup.nodes["blue"]}
        assert [n["effective_percent"] for n in setup.get("spread")["nodes"]] == [100.0, 0.0]
        setup.admin.suspend_node("blue")
        refused = setup.call("spread", 1)
        assert refused.status_code == 503
        message = refused.json()["message"]
        assert f"blue ({setup.nodes['blue']}, 50%: SUSPENDED)" in message
        assert f"green ({setup.nodes['green']}, 50%: SUSPENDED)" in message
    finally:
        setup.admin.resume_node("blue")
        setup.admin.resume_node("green")
        setup.delete("spread")


def test_switching_under_load_fails_no_request(setup: Setup) -> None:
    """100 % from one node to the other and back, several times, while 8 clients call without pause."""
    setup.create("switch", {"blue": 100, "green": 0})
    stop = threading.Event()
    codes: Counter[int] = Counter()
    answered: Counter[str] = Counter()
    lock = threading.Lock()

    def caller() -> None:
        with httpx.Client(headers={"Authorization": f"Api-Key {setup.server.key}"}, timeout=30) as http:
            while not stop.is_set():
                response = http.post(
                    f"{setup.server.url}/datasphere/v1/aliases/datasphere.user.switch:execute",
                    json={"folder_id": setup.folder, "input": {"x": 3}},
                )
                with lock:
                    codes[response.status_code] += 1
                    answered[response.headers.get("x-node-id", "")] += 1
                    assert response.status_code != 200 or response.json() == {"output": {"y": 6}}

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        for flip in range(6):
            time.sleep(0.4)
            setup.update("switch", nodes=shares(blue=0, green=100) if flip % 2 == 0 else shares(blue=100, green=0))
        time.sleep(0.4)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        setup.delete("switch")
    assert set(codes) == {200}, codes
    assert sum(codes.values()) > 200, codes
    assert answered[setup.nodes["blue"]] > 5 and answered[setup.nodes["green"]] > 5, answered


def test_requests_in_flight_finish_on_their_node(setup: Setup) -> None:
    setup.create("flight", {"slow-a": 100, "slow-b": 0})
    try:
        result: dict[str, httpx.Response] = {}
        slow = threading.Thread(target=lambda: result.update(slow=setup.call("flight", 5, s=1.5)))
        slow.start()
        busy = f'cellnode_requests_in_flight{{node_id="{setup.nodes["slow-a"]}"}} 1.0'
        deadline = time.monotonic() + 10
        while busy not in setup.metrics():  # the request is on slow-a now
            assert time.monotonic() < deadline, "the slow request never reached slow-a"
            time.sleep(0.05)
        setup.update("flight", nodes=shares(slow_a=0, slow_b=100))
        assert setup.call("flight", 1, s=0.0).headers["x-node-id"] == setup.nodes["slow-b"]
        slow.join(30)
        assert result["slow"].status_code == 200 and result["slow"].json() == {"output": {"y": 10}}
        assert result["slow"].headers["x-node-id"] == setup.nodes["slow-a"]
    finally:
        setup.delete("flight")


def test_route_key_sticks_to_one_node(setup: Setup) -> None:
    setup.create("sticky", {"blue": 50, "green": 50})
    try:
        for key in ("user-1", "user-2", "user-3"):
            assert len({setup.call("sticky", 1, key=key).headers["x-node-id"] for _ in range(15)}) == 1
        spread = {setup.call("sticky", 1, key=f"user-{i}").headers["x-node-id"] for i in range(40)}
        assert spread == {setup.nodes["blue"], setup.nodes["green"]}
        # A change of weights moves keys only onto the node whose share grew.
        before = {i: setup.call("sticky", 1, key=f"k{i}").headers["x-node-id"] for i in range(60)}
        setup.update("sticky", nodes=shares(blue=80, green=20))
        after = {i: setup.call("sticky", 1, key=f"k{i}").headers["x-node-id"] for i in range(60)}
        moved = [i for i in before if before[i] != after[i]]
        assert moved and all(after[i] == setup.nodes["blue"] for i in moved)
    finally:
        setup.delete("sticky")


def test_shadow_traffic_is_compared_and_never_returned(setup: Setup) -> None:
    setup.create("shadow", {"blue": 100}, mirrors=shares(red=100))
    try:
        for x in (1, 2, 3, 50, 60):
            response = setup.call("shadow", x)
            assert response.json() == {"output": {"y": 2 * x}}  # the primary's, even where the shadow says -1
            assert response.headers["x-node-id"] == setup.nodes["blue"]
        deadline = time.monotonic() + 10
        while (got := setup.get("shadow"))["mirror_stats"] == [] or got["mirror_stats"][0]["requests"] < 5:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)
        (stats,) = got["mirror_stats"]
        assert (stats["node_id"], stats["requests"], stats["agree"], stats["differ"], stats["error"]) == (
            setup.nodes["red"],
            5,
            3,
            2,
            0,
        )
        assert stats["mean_primary_ms"] > 0 and stats["mean_shadow_ms"] > 0
        records = got["mirrored"]
        assert Counter(r["result"] for r in records) == {"agree": 3, "differ": 2}
        assert all(r["primary_node_id"] == setup.nodes["blue"] and r["shadow_ms"] > 0 for r in records)
        metrics = httpx.get(
            f"{setup.server.url}/metrics", headers={"Authorization": f"Api-Key {setup.server.key}"}
        ).text
        assert (
            f'alias_mirror_requests_total{{alias_name="datasphere.user.shadow",node_id="{setup.nodes["red"]}",'
            'result="differ"} 2.0'
        ) in metrics
        assert "Alias datasphere.user.shadow mirrored a request" in setup.server.log()
    finally:
        setup.delete("shadow")


def test_a_failing_node_is_rolled_back(setup: Setup) -> None:
    setup.create(
        "rollback",
        {"blue": 50, "broken": 50},
        rollback_error_rate=0.5,
        rollback_window=60,
        rollback_min_requests=4,
    )
    try:
        codes = Counter(setup.call("rollback", 1).status_code for _ in range(40))
        assert codes[500] >= 2, codes  # the broken node raised until it was taken out
        deadline = time.monotonic() + 10
        while not (got := setup.get("rollback"))["rollbacks"]:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)
        assert [(n["node_name"], n["percent"]) for n in got["nodes"]] == [("blue", 100), ("broken", 0)]
        (event,) = got["rollbacks"]
        assert event["node_id"] == setup.nodes["broken"] and event["error_rate"] > 0.5
        assert event["before"] == {setup.nodes["blue"]: 50, setup.nodes["broken"]: 50}
        assert {setup.call("rollback", 1).status_code for _ in range(20)} == {200}
        assert f"Alias datasphere.user.rollback: rolled back node {setup.nodes['broken']}" in setup.server.log()
        metrics = httpx.get(
            f"{setup.server.url}/metrics", headers={"Authorization": f"Api-Key {setup.server.key}"}
        ).text
        assert (
            f'alias_rollbacks_total{{alias_name="datasphere.user.rollback",node_id="{setup.nodes["broken"]}"}} 1.0'
            in (metrics)
        )
    finally:
        setup.delete("rollback")


def test_alias_metrics_name_the_alias_and_the_node(setup: Setup) -> None:
    setup.create("metered", {"green": 100})
    try:
        for _ in range(3):
            assert setup.call("metered", 1).status_code == 200
        metrics = httpx.get(
            f"{setup.server.url}/metrics", headers={"Authorization": f"Api-Key {setup.server.key}"}
        ).text
        labels = f'alias_name="datasphere.user.metered",node_id="{setup.nodes["green"]}"'
        assert f"alias_requests_total{{{labels}}} 3.0" in metrics
        coded = f'alias_name="datasphere.user.metered",code="200",node_id="{setup.nodes["green"]}"'
        assert f"alias_http_codes_total{{{coded}}} 3.0" in metrics
        assert f"alias_request_durations_count{{{labels}}} 3.0" in metrics
        assert f'alias_node_percent{{{labels},role="primary"}} 100.0' in metrics
    finally:
        setup.delete("metered")


def test_a_node_an_alias_names_cannot_be_deleted(setup: Setup) -> None:
    alias = setup.create("guard", {"blue": 100}, mirrors=shares(red=10))
    try:
        for node in ("blue", "red"):
            with pytest.raises(FailedPrecondition, match=f"named by datasphere.user.guard \\({alias['id']}\\)"):
                setup.admin.delete_node(node)
    finally:
        setup.delete("guard")
    assert setup.admin.get_node("red")["status"] == "HEALTHY"


def test_private_and_public_access(setup: Setup, tmp_path: Path) -> None:
    admin = setup.admin
    other = admin.create_folder("alias-outsiders")["id"]
    dev = admin.create_user("alias-dev")
    stranger = admin.create_user("alias-stranger")
    admin.add_access_binding(setup.folder, role="developer", subject=dev["subject"])
    keys = {who["name"]: admin.create_api_key(principal_id=who["id"])["secret"] for who in (dev, stranger)}
    setup.create("private", {"blue": 100})
    setup.create("public", {"blue": 100}, public=True)

    def call(alias: str, key: str | None, folder: str | None) -> int:
        headers = {"Authorization": f"Api-Key {key}"} if key else {}
        body: dict[str, Any] = {"input": {"x": 1}}
        if folder:
            body["folder_id"] = folder
        url = f"{setup.server.url}/datasphere/v1/aliases/datasphere.user.{alias}:execute"
        return httpx.post(url, headers=headers, json=body).status_code

    try:
        assert call("private", keys["alias-dev"], setup.folder) == 200
        assert call("private", keys["alias-stranger"], setup.folder) == 403  # no role on the folder
        assert call("private", keys["alias-dev"], other) == 403  # folder not in the alias's ACL
        assert call("private", keys["alias-dev"], None) == 400  # names no folder
        assert call("private", None, setup.folder) == 401
        assert call("public", keys["alias-stranger"], None) == 200  # any authenticated principal
        assert call("public", None, None) == 401
        setup.update("private", acl=[setup.folder, other])
        admin.add_access_binding(other, role="developer", subject=stranger["subject"])
        assert call("private", keys["alias-stranger"], other) == 200
        # The alias itself, and its metrics, are for those with a role on its folder.
        with Client(setup.server.url, keys["alias-stranger"]) as outsider:
            with pytest.raises(NotFound, match="Alias 'public' not found"):
                outsider._request("GET", f"{ALIASES}/public", params={"folder_id": other})
            metrics = outsider._http.get("/metrics").text
        assert setup.nodes["blue"] not in metrics
        assert "datasphere.user.public" not in metrics
    finally:
        setup.delete("private")
        setup.delete("public")
    denied = [e for e in admin.audit(folder_id=setup.folder) if e["action"] == "aliases.execute"]
    assert denied and all(e["result"] == "denied" for e in denied)


def test_a_change_made_through_another_server_arrives(setup: Setup) -> None:
    """Servers sharing a database: a change written by another one (here, straight into the store) reaches this
    server's routing table within a reconcile interval."""
    alias = setup.create("shared", {"blue": 100, "green": 0})
    try:
        moved = json.dumps(
            [{"node_id": setup.nodes["blue"], "percent": 0}, {"node_id": setup.nodes["green"], "percent": 100}]
        )
        with sqlite3.connect(setup.server.data_dir / "cellnode.db") as db:
            db.execute("UPDATE aliases SET nodes = ?, version = version + 1 WHERE id = ?", (moved, alias["id"]))
        deadline = time.monotonic() + 10
        while setup.call("shared", 1).headers["x-node-id"] != setup.nodes["green"]:
            assert time.monotonic() < deadline, "the change never reached the routing table"
            time.sleep(0.2)
        assert {setup.call("shared", 1).headers["x-node-id"] for _ in range(20)} == {setup.nodes["green"]}
    finally:
        setup.delete("shared")


def test_only_who_may_change_the_nodes_may_open_an_alias_to_more_callers(setup: Setup) -> None:
    admin = setup.admin
    theirs = admin.create_folder("alias-open-theirs")["id"]
    mallory = admin.create_user("alias-mallory")
    admin.add_access_binding(theirs, role="developer", subject=mallory["subject"])
    key = admin.create_api_key(principal_id=mallory["id"])["secret"]
    admin.add_access_binding(setup.folder, role="viewer", subject=mallory["subject"])
    alias = setup.create("guarded", {"blue": 100})
    try:
        # Mallory may change aliases in her folder, but not the node: moving the alias there and opening it fails.
        admin.update_alias("guarded", move_to=theirs)
        with Client(setup.server.url, key) as as_mallory:
            with pytest.raises(PermissionDenied, match="needs the role 'developer'"):
                as_mallory.update_alias(alias["id"], public=True)
        assert not setup.get(alias["id"])["public"]
    finally:
        setup.delete(alias["id"])


def test_a_rollback_never_hands_traffic_to_a_mirror(setup: Setup) -> None:
    """broken=100, blue=0 but blue is the shadow: no node may take broken's share, so the shares stay and the
    server says why."""
    setup.create(
        "no-takers",
        {"broken": 100, "blue": 0},
        mirrors=shares(blue=100),
        rollback_error_rate=0.5,
        rollback_window=60,
        rollback_min_requests=3,
    )
    try:
        codes = Counter(setup.call("no-takers", 1).status_code for _ in range(6))
        assert codes == {500: 6}, codes
        got = setup.get("no-takers")
        assert got["rollbacks"] == [] and [n["percent"] for n in got["nodes"]] == [100, 0]
        assert "Alias datasphere.user.no-takers: node" in setup.server.log()
        assert "no other node can take its share" in setup.server.log()
    finally:
        setup.delete("no-takers")
