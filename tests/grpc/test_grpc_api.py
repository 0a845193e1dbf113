"""The gRPC front against a real `cellnode serve --grpc-port 0`, called by a client that learns everything from
reflection (as grpcurl does): NodeService Execute and ExecuteAlias, typed per-node services, health, every error
code with its rich status, deadlines, the 16 MB limit, metrics and the audit log."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format, message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellnode.client import Client
from cellnode.grpc.typed import field_number
from tests.grpc.reflection_client import ReflectionClient, rich_status
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow
EXECUTE = "yandex.cloud.datasphere.v1.NodeService/Execute"
EXECUTE_ALIAS = "yandex.cloud.datasphere.v1.NodeService/ExecuteAlias"
ECHO_IN = {"x": "int", "y": "float", "name": "str", "flag": "bool", "items": "list", "opts": "dict", "extra": "any"}
ECHO_OUT = {f"r_{name}": kind for name, kind in ECHO_IN.items()}
NODES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "echo": (
        (
            "x = 0\ny = 0.0\nname = ''\nflag = False\nitems = []\nopts = {}\nextra = None",
            "r_x = x * 2\nr_y = y / 2\nr_name = name.upper()\nr_flag = not flag\nr_items = items[::-1]\n"
            "r_opts = dict(opts, seen=True)\nr_extra = extra",
        ),
        {"inputs": ECHO_IN, "outputs": ECHO_OUT},
    ),
    "boom": (("x = 1", "y = 10 // x"), {"inputs": {"x": "int"}, "outputs": {"y": "int"}}),
    "liar": (("x = 1", "y = 'not an int'"), {"inputs": {"x": "int"}, "outputs": {"y": "int"}}),
    "sleepy": (
        ("import time\ns = 0.0", "time.sleep(s)\ndone = True"),
        {"inputs": {"s": "float"}, "outputs": {"done": "bool"}, "timeout": 2},
    ),
    "big": (("n = 0", "blob = 'a' * n"), {"inputs": {"n": "int"}, "outputs": {"blob": "str"}}),
    "napper": (
        ("import time\ns = 0.0", "time.sleep(s)\ndone = True"),
        {"inputs": {"s": "float"}, "outputs": {"done": "bool"}, "timeout": 60},
    ),
    "kinds": (
        ("y = 0.0\nd = {'n': 0}", "t = type(y).__name__\nu = type(d['n']).__name__"),
        {"inputs": {"y": "float", "d": "dict"}, "outputs": {"t": "str", "u": "str"}},
    ),
    "pair": (("a = 0\nb = 0", "r = f'a={a},b={b}'"), {"inputs": {"a": "int", "b": "int"}, "outputs": {"r": "str"}}),
}
ECHO_INPUT = {
    "x": 21,
    "y": 3.0,
    "name": "grpc",
    "flag": False,
    "items": [1, "two", None],
    "opts": {"k": [1.5]},
    "extra": {"a": True},
}


@dataclass
class Setup:
    server: ServerProcess
    admin: Client
    folder: str
    nodes: dict[str, str]
    client: ReflectionClient  # the admin, by API key

    def reflect(self, authorization: str | None) -> ReflectionClient:
        return ReflectionClient(self.server.grpc_address, authorization)

    def execute(self, node: str, inputs: dict[str, Any], **kwargs: Any) -> tuple[dict[str, Any], dict[str, str]]:
        request = {"folder_id": self.folder, "node_id": self.nodes[node], "input": inputs}
        return self.client.call(EXECUTE, request, **kwargs)

    def metrics(self) -> str:
        return httpx.get(f"{self.server.url}/metrics", headers={"Authorization": f"Api-Key {self.server.key}"}).text


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    home = tmp_path_factory.mktemp("grpc")
    server = ServerProcess(home / "data", env={"CELLNODE_PROFILE": "none"}, args=("--grpc-port", "0")).start()
    admin = server.client()
    client = ReflectionClient(server.grpc_address, f"Api-Key {server.key}")
    try:
        for name, (cells, variables) in NODES.items():
            admin.create_checkpoint(notebook(home, *cells, name=f"{name}.ipynb"), name=name)
            admin.create_node(name, checkpoint=name, **variables)
        nodes = {name: admin.wait_node(name)["id"] for name in NODES}
        folder = admin.get_node("echo")["folder_id"]
        yield Setup(server, admin, folder, nodes, client)
    finally:
        client.close()
        admin.close()
        server.stop()


def code_of(error: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    code: grpc.StatusCode = error.value.code()  # type: ignore[attr-defined]
    return code


def details_of(error: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    details: str = error.value.details()  # type: ignore[attr-defined]
    return details


def test_server_announces_its_grpc_port(setup: Setup) -> None:
    host, _, port = setup.server.grpc_address.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0


def test_reflection_lists_the_services(setup: Setup) -> None:
    services = setup.client.services()
    for name in (
        "yandex.cloud.datasphere.v1.NodeService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ):
        assert name in services
    typed = {f"cellnode.nodes.n{node_id}.Node" for node_id in setup.nodes.values()}
    assert typed <= set(services), services


def test_execute_through_reflection_only(setup: Setup) -> None:
    output, trailer = setup.execute("echo", ECHO_INPUT)
    assert output == {
        "output": {
            "r_x": 42,
            "r_y": 1.5,
            "r_name": "GRPC",
            "r_flag": True,
            "r_items": [None, "two", 1],
            "r_opts": {"k": [1.5], "seen": True},
            "r_extra": {"a": True},
        }
    }
    assert len(trailer["x-request-id"]) == 16
    # The reference's own messages, as reflection describes them.
    request_class, response_class = setup.client.method(EXECUTE)
    assert [f.name for f in request_class.DESCRIPTOR.fields] == ["folder_id", "node_id", "input"]
    assert request_class.DESCRIPTOR.fields_by_name["input"].message_type.full_name == "google.protobuf.Struct"
    assert [f.name for f in response_class.DESCRIPTOR.fields] == ["output"]


def test_whole_numbers_in_a_struct_reach_the_cell_as_ints(setup: Setup) -> None:
    # grpcurl sends {"x": 21} as the double 21.0; an int variable must still take it.
    output, _ = setup.execute("boom", {"x": 5})
    assert output == {"output": {"y": 2}}


def test_a_float_variable_gets_a_float(setup: Setup) -> None:
    # Over REST, 3.0 is a float; the Struct carries it as a double either way, and a float variable gets a float.
    # Whole numbers inside a dict come as ints (see docs/grpc.md).
    output, _ = setup.execute("kinds", {"y": 3.0, "d": {"n": 3}})
    assert output == {"output": {"t": "float", "u": "int"}}


def test_typed_service_follows_a_reordering_update(setup: Setup) -> None:
    service = f"cellnode.nodes.n{setup.nodes['pair']}.Node/Execute"
    before, _ = setup.client.method(service)  # as a client generated before the update would have it
    request = {"folder_id": setup.folder, "input": {"a": 1, "b": 2}}
    assert setup.client.call(service, request)[0] == {"output": {"r": "a=1,b=2"}}
    setup.admin.update_node("pair", inputs={"b": "int", "a": "int"})
    stub = setup.client.channel.unary_unary(f"/{service}", request_serializer=before.SerializeToString)
    raw = stub(json_format.ParseDict(request, before()), timeout=30)
    fresh = setup.reflect(f"Api-Key {setup.server.key}")
    try:
        _, response_class = fresh.method(service)
    finally:
        fresh.close()
    assert json_format.MessageToDict(response_class.FromString(raw)) == {"output": {"r": "a=1,b=2"}}


def test_header_form_in_metadata(setup: Setup) -> None:
    metadata = (("x-node-id", setup.nodes["boom"]), ("x-folder-id", setup.folder))
    output, _ = setup.client.call(EXECUTE, {"input": {"x": 2}}, metadata=metadata)
    assert output == {"output": {"y": 5}}
    with pytest.raises(grpc.RpcError) as refused:
        setup.client.call(EXECUTE, {"node_id": setup.nodes["echo"], "input": {"x": 2}}, metadata=metadata)
    assert code_of(refused) == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-node-id" in details_of(refused) and setup.nodes["echo"] in details_of(refused)


def test_execute_alias(setup: Setup) -> None:
    setup.admin.create_alias("grpc-boom", nodes={"boom": 100})
    try:
        request = {"folder_id": setup.folder, "alias_name": "datasphere.user.grpc-boom", "input": {"x": 3}}
        output, trailer = setup.client.call(EXECUTE_ALIAS, request)
        assert output == {"output": {"y": 3}}
        assert trailer["x-node-id"] == setup.nodes["boom"]
        # The header form: Execute with x-node-alias.
        metadata = (("x-node-alias", "datasphere.user.grpc-boom"), ("x-folder-id", setup.folder))
        output, _ = setup.client.call(EXECUTE, {"input": {"x": 4}}, metadata=metadata)
        assert output == {"output": {"y": 2}}
        with pytest.raises(grpc.RpcError) as missing:
            setup.client.call(EXECUTE_ALIAS, {**request, "alias_name": "datasphere.user.nope"})
        assert code_of(missing) == grpc.StatusCode.NOT_FOUND
        assert 'alias_grpc_codes_total{alias_name="datasphere.user.grpc-boom"' in setup.metrics()
    finally:
        setup.admin.delete_alias("grpc-boom")


def test_typed_service_through_reflection_only(setup: Setup) -> None:
    service = f"cellnode.nodes.n{setup.nodes['echo']}.Node"
    request_class, response_class = setup.client.method(f"{service}/Execute")
    inputs = request_class.DESCRIPTOR.fields_by_name["input"].message_type
    kinds = {field.name: (field.type, field.message_type and field.message_type.full_name) for field in inputs.fields}
    assert list(kinds) == list(ECHO_IN)
    assert kinds["x"][0] == inputs.fields_by_name["x"].TYPE_INT64
    assert kinds["y"][0] == inputs.fields_by_name["y"].TYPE_DOUBLE
    assert kinds["items"][1] == "google.protobuf.ListValue" and kinds["opts"][1] == "google.protobuf.Struct"
    output, _ = setup.client.call(f"{service}/Execute", {"folder_id": setup.folder, "input": ECHO_INPUT})
    assert output["output"]["r_x"] == "42"  # int64 is a string in proto3 JSON
    assert output["output"]["r_name"] == "GRPC" and output["output"]["r_flag"] is True
    with pytest.raises(grpc.RpcError) as missing:
        setup.client.call(f"{service}/Execute", {"folder_id": setup.folder, "input": {"x": 1}})
    assert code_of(missing) == grpc.StatusCode.INVALID_ARGUMENT and "is missing" in details_of(missing)


def test_invalid_argument_names_the_variable(setup: Setup) -> None:
    with pytest.raises(grpc.RpcError) as wrong:
        setup.execute("echo", {**ECHO_INPUT, "name": 5})
    assert code_of(wrong) == grpc.StatusCode.INVALID_ARGUMENT
    assert "'name'" in details_of(wrong) and "str" in details_of(wrong)
    with pytest.raises(grpc.RpcError) as no_folder:
        setup.client.call(EXECUTE, {"node_id": setup.nodes["boom"], "input": {"x": 1}})
    assert code_of(no_folder) == grpc.StatusCode.INVALID_ARGUMENT and "folder" in details_of(no_folder)
    status = rich_status(no_folder.value)
    info = error_details_pb2.ErrorInfo()
    assert status.code == 3 and status.details[0].Unpack(info) and info.reason == "INVALID_ARGUMENT"
    assert ("x-cellnode-error", "INVALID_ARGUMENT") in list(no_folder.value.trailing_metadata())


def test_unauthenticated(setup: Setup) -> None:
    """Every unary method but the server's own health needs a credential."""
    methods = (
        f"/{EXECUTE}",
        f"/{EXECUTE_ALIAS}",
        f"/cellnode.nodes.n{setup.nodes['boom']}.Node/Execute",
        "/grpc.health.v1.Health/List",
    )
    for authorization in (None, "Bearer t1.not-a-token"):
        client = ReflectionClient(setup.server.grpc_address, None)
        metadata = () if authorization is None else (("authorization", authorization),)
        try:
            for method in methods:
                stub = client._channel.unary_unary(method)
                with pytest.raises(grpc.RpcError) as refused:
                    stub(b"", metadata=metadata, timeout=10)
                assert code_of(refused) == grpc.StatusCode.UNAUTHENTICATED, method
            # Reflection needs a credential too.
            with pytest.raises(grpc.RpcError) as hidden:
                client.services()
            assert code_of(hidden) == grpc.StatusCode.UNAUTHENTICATED
        finally:
            client.close()


def test_permission_denied_and_not_found(setup: Setup) -> None:
    other = setup.admin.create_folder("grpc-outsiders")["id"]
    stranger = setup.admin.create_user("grpc-stranger")
    setup.admin.add_access_binding(other, role="developer", subject=stranger["subject"])
    key = setup.admin.create_api_key(principal_id=stranger["id"])["secret"]
    with Client(setup.server.url, key) as as_stranger:
        token = as_stranger.create_token()["iam_token"]
    theirs = setup.reflect(f"Bearer {token}")
    try:
        # A folder outside the node's ACL.
        request = {"folder_id": other, "node_id": setup.nodes["boom"], "input": {"x": 1}}
        with pytest.raises(grpc.RpcError) as outside:
            theirs.call(EXECUTE, request)
        assert code_of(outside) == grpc.StatusCode.PERMISSION_DENIED and other in details_of(outside)
        # The node's folder, where the stranger has no role.
        with pytest.raises(grpc.RpcError) as no_role:
            theirs.call(EXECUTE, {**request, "folder_id": setup.folder})
        assert code_of(no_role) == grpc.StatusCode.PERMISSION_DENIED and "developer" in details_of(no_role)
        # Reflection shows the stranger no typed service of a node it may not call.
        assert not [name for name in theirs.services() if name.startswith("cellnode.nodes.")]
        with pytest.raises(KeyError):
            theirs.method(f"cellnode.nodes.n{setup.nodes['boom']}.Node/Execute")
        # The typed service checks the folder and the caller before it reads, or tells, anything of the variables.
        typed = f"/cellnode.nodes.n{setup.nodes['echo']}.Node/Execute"
        stub = theirs._channel.unary_unary(typed)
        stale_input = b"\x12\x03\xb8\x3e\x01"  # input {field 999: 1}: a variable the node does not have
        for folder in (other, setup.folder):
            with pytest.raises(grpc.RpcError) as typed_refused:
                raw = b"\n\x14" + folder.encode() + stale_input
                stub(raw, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            assert code_of(typed_refused) == grpc.StatusCode.PERMISSION_DENIED
            assert "r_x" not in details_of(typed_refused) and "'x'" not in details_of(typed_refused)
        # A private alias, likewise; denied alias calls are audited as such.
        setup.admin.create_alias("grpc-private", nodes={"boom": 100})
        try:
            alias = {"folder_id": setup.folder, "alias_name": "datasphere.user.grpc-private", "input": {"x": 1}}
            with pytest.raises(grpc.RpcError) as alias_refused:
                theirs.call(EXECUTE_ALIAS, alias)
            assert code_of(alias_refused) == grpc.StatusCode.PERMISSION_DENIED
        finally:
            setup.admin.delete_alias("grpc-private")
        # Health tells the stranger nothing of the node, and lists none.
        health = health_pb2_grpc.HealthStub(theirs._channel)
        bearer = (("authorization", f"Bearer {token}"),)
        with pytest.raises(grpc.RpcError) as hidden:
            health.Check(health_pb2.HealthCheckRequest(service=setup.nodes["boom"]), metadata=bearer, timeout=10)
        assert code_of(hidden) == grpc.StatusCode.NOT_FOUND
        listed = health.List(health_pb2.HealthListRequest(), metadata=bearer, timeout=10)  # type: ignore[attr-defined]
        assert set(listed.statuses) == {"", "yandex.cloud.datasphere.v1.NodeService"}
        everything = health.List(  # type: ignore[attr-defined]
            health_pb2.HealthListRequest(), metadata=(("authorization", f"Api-Key {setup.server.key}"),), timeout=10
        )
        assert set(setup.nodes.values()) <= set(everything.statuses)
        with pytest.raises(grpc.RpcError) as unknown:
            setup.client.call(EXECUTE, {**request, "folder_id": setup.folder, "node_id": "nosuchnode"})
        assert code_of(unknown) == grpc.StatusCode.NOT_FOUND and "nosuchnode" in details_of(unknown)
        events = setup.admin.audit(setup.folder)
        denied = [row for row in events if row["action"] == "nodes.execute"]
        assert any(row["code"] == 403 and row["resource"] == f"node/{setup.nodes['boom']}" for row in denied), denied
        aliases = [row for row in events if row["action"] == "aliases.execute"]
        assert any(row["code"] == 403 and row["resource"] == "alias/datasphere.user.grpc-private" for row in aliases)
    finally:
        theirs.close()


def test_cell_exception_carries_its_details(setup: Setup) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        setup.execute("boom", {"x": 0})
    assert code_of(raised) == grpc.StatusCode.UNKNOWN
    assert "ZeroDivisionError" in details_of(raised)
    status = rich_status(raised.value)
    # The details type comes from reflection too.
    details_class = setup.client.pool.FindMessageTypeByName("yandex.cloud.datasphere.v1.NodeExecutionErrorDetails")
    execution = message_factory.GetMessageClass(details_class)()
    assert status.details[1].Unpack(execution)
    assert (
        execution.error_name == "ZeroDivisionError" and execution.error_message == "integer division or modulo by zero"
    )
    assert any("10 // x" in line for line in execution.traceback)


def test_output_error_is_internal(setup: Setup) -> None:
    with pytest.raises(grpc.RpcError) as wrong:
        setup.execute("liar", {"x": 1})
    assert code_of(wrong) == grpc.StatusCode.INTERNAL and "'y'" in details_of(wrong)


def test_deadlines(setup: Setup) -> None:
    # The node's own timeout (2 s) ends the call on the server.
    with pytest.raises(grpc.RpcError) as timed_out:
        setup.execute("sleepy", {"s": 10.0}, timeout=30)
    assert code_of(timed_out) == grpc.StatusCode.DEADLINE_EXCEEDED and "2 s" in details_of(timed_out)
    # A shorter client deadline reaches the node: the cell is stopped then, so the next call finds it free.
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as client_deadline:
        setup.execute("napper", {"s": 20.0}, timeout=0.5)
    assert code_of(client_deadline) == grpc.StatusCode.DEADLINE_EXCEEDED
    output, _ = setup.execute("napper", {"s": 0.0}, timeout=30)
    assert output == {"output": {"done": True}}
    # Without the deadline reaching it, the instance would still sleep its 20 s (its timeout is 60 s).
    assert time.monotonic() - started < 10
    # The server answered the deadline itself (a little before the client's), so it counts as such.
    text = setup.metrics()
    napper = setup.nodes["napper"]
    assert f'node_grpc_codes_total{{code="DEADLINE_EXCEEDED",node_id="{napper}"' in text
    assert f'node_grpc_codes_total{{code="CANCELLED",node_id="{napper}"' not in text


def test_a_cancelled_call_frees_the_instance(setup: Setup) -> None:
    request_class, response_class = setup.client.method(EXECUTE)
    stub = setup.client.channel.unary_unary(
        f"/{EXECUTE}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    request = {"folder_id": setup.folder, "node_id": setup.nodes["napper"], "input": {"s": 20.0}}
    future = stub.future(json_format.ParseDict(request, request_class()))  # no deadline
    time.sleep(0.5)
    started = time.monotonic()
    future.cancel()
    output, _ = setup.execute("napper", {"s": 0.0}, timeout=30)
    assert output == {"output": {"done": True}}
    assert time.monotonic() - started < 10, "the abandoned cell was interrupted, not left to sleep its 20 s"


def test_the_16_mb_limit_both_ways(setup: Setup) -> None:
    with pytest.raises(grpc.RpcError) as too_big:
        setup.execute("big", {"n": 1, "pad": "a" * (17 * 2**20)})
    assert code_of(too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED and "16 MB" in details_of(too_big)
    output, _ = setup.execute("big", {"n": 15 * 2**20})
    assert len(output["output"]["blob"]) == 15 * 2**20
    with pytest.raises(grpc.RpcError) as answer_too_big:
        setup.execute("big", {"n": 17 * 2**20})
    assert code_of(answer_too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED and "16 MB" in details_of(answer_too_big)


def test_unavailable_and_health(setup: Setup) -> None:
    channel = grpc.insecure_channel(setup.server.grpc_address)
    health = health_pb2_grpc.HealthStub(channel)
    credential = (("authorization", f"Api-Key {setup.server.key}"),)
    try:
        serving = health_pb2.HealthCheckResponse.SERVING
        # The server and NodeService answer without a credential, as GET /health does.
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        service = "yandex.cloud.datasphere.v1.NodeService"
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == serving
        node = setup.nodes["boom"]
        with pytest.raises(grpc.RpcError) as anonymous:
            health.Check(health_pb2.HealthCheckRequest(service=node))
        assert code_of(anonymous) == grpc.StatusCode.UNAUTHENTICATED
        assert health.Check(health_pb2.HealthCheckRequest(service=node), metadata=credential).status == serving
        typed = f"cellnode.nodes.n{node}.Node"
        assert health.Check(health_pb2.HealthCheckRequest(service=typed), metadata=credential).status == serving
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nosuchnode"), metadata=credential)
        assert code_of(unknown) == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=node), metadata=credential, timeout=60)
        assert next(watch).status == serving
        setup.admin.suspend_node("boom")
        try:
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            with pytest.raises(grpc.RpcError) as suspended:
                setup.execute("boom", {"x": 1})
            assert code_of(suspended) == grpc.StatusCode.UNAVAILABLE and "suspended" in details_of(suspended)
        finally:
            setup.admin.resume_node("boom")
        assert health.Check(health_pb2.HealthCheckRequest(service=node), metadata=credential).status == serving
    finally:
        channel.close()


def test_metrics_count_grpc_codes(setup: Setup) -> None:
    setup.execute("boom", {"x": 1})
    with pytest.raises(grpc.RpcError):
        setup.execute("boom", {"x": "one"})
    text = setup.metrics()
    node = setup.nodes["boom"]
    method = "/yandex.cloud.datasphere.v1.NodeService/Execute"
    assert f'node_grpc_codes_total{{code="OK",node_id="{node}",node_path="{method}"}}' in text
    assert f'node_grpc_codes_total{{code="INVALID_ARGUMENT",node_id="{node}",node_path="{method}"}}' in text


def test_proto_download_builds_a_client(setup: Setup, tmp_path: Path) -> None:
    """`cellnode node proto` gives a file that protoc compiles into a client calling the node, with no reflection."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLNODE_")}
    env |= {"CELLNODE_URL": setup.server.url, "CELLNODE_TOKEN": setup.server.key}
    target = tmp_path / "echo.proto"
    result = subprocess.run(
        [sys.executable, "-m", "cellnode", "node", "proto", "echo", "-o", str(target)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    found = setup.admin.node_proto("echo")
    assert target.read_text() == found["proto"]
    assert found["service"] == f"cellnode.nodes.n{setup.nodes['echo']}.Node"
    assert f"optional int64 x = {field_number('x', 'int')};" in found["proto"]
    assert f"google.protobuf.Struct opts = {field_number('opts', 'dict')};" in found["proto"]
    # Compile it as a user would, and call the service with the generated message classes.
    out = tmp_path / "generated"
    out.mkdir()
    includes = resources.files("grpc_tools") / "_proto"
    protoc = [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"-I{includes}", f"--python_out={out}"]
    compiled = subprocess.run(
        [*protoc, target.name],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert compiled.returncode == 0, compiled.stderr
    spec = importlib.util.spec_from_file_location("echo_pb2", out / "echo_pb2.py")
    assert spec is not None and spec.loader is not None
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    request = generated.ExecuteRequest(folder_id=setup.folder)
    request.input.x, request.input.y, request.input.name, request.input.flag = 5, 1.0, "a", True
    request.input.items.extend([1])
    request.input.opts.update({"k": 1})
    request.input.extra.string_value = "e"
    with grpc.insecure_channel(setup.server.grpc_address) as channel:
        stub = channel.unary_unary(
            found["method"],
            request_serializer=generated.ExecuteRequest.SerializeToString,
            response_deserializer=generated.ExecuteResponse.FromString,
        )
        response = stub(request, metadata=(("authorization", f"Api-Key {setup.server.key}"),), timeout=30)
    assert response.output.r_x == 10 and response.output.r_name == "A" and response.output.r_flag is False
    assert response.output.r_extra.string_value == "e"
