"""`cellnode serve` as a process: first start, the key file and profile, restart, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cellnode.client import Client
from tests.helpers import ServerProcess, notebook

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def instance_pids(server: ServerProcess) -> set[int]:
    """The `python -m cellnode.runtime` processes below the server: instances (and a zygote, if one forks them)."""
    assert server.proc is not None
    parents: dict[int, int] = {}
    runtime: set[int] = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if b"cellnode.runtime" in cmdline:
                runtime.add(int(proc.name))
    below = {server.proc.pid}
    while True:
        more = {pid for pid, parent in parents.items() if parent in below} - below
        if not more:
            return below & runtime
        below |= more


def test_first_start_restart_and_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    profile = tmp_path / "profile.json"
    server = ServerProcess(tmp_path / "data", env={"CELLNODE_PROFILE": str(profile)}).start()
    request.addfinalizer(lambda: server.stop(signal.SIGKILL))
    key_file = tmp_path / "data" / "admin.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert server.key in server.log(), "the first start prints the key once"
    saved = json.loads(profile.read_text())
    assert saved == {"url": server.url, "key_file": str(key_file)}

    monkeypatch.setenv("CELLNODE_PROFILE", str(profile))
    with Client() as api:  # no URL or token: both come from the profile
        folders = api.list_folders()
        assert [f["name"] for f in folders] == ["default"]
        path = notebook(tmp_path, "n = 2", "m = n * 10")
        api.create_checkpoint(path, name="keep")
        api.create_node("keep-node", checkpoint="keep", inputs={"n": "int"}, outputs={"m": "int"})
        assert api.execute("keep-node", {"n": 4}) == {"m": 40}
    before = instance_pids(server)
    assert before
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    # Graceful, even after a capture ran a kernel (nbclient once replaced our signal handlers): the server stops
    # its instances itself rather than leaving them to notice that it is gone.
    assert "Stopping all instances." in server.log()
    assert "Application shutdown complete." in server.log()
    assert not any(alive(pid) for pid in before), "SIGTERM stops every instance"

    server.start()
    assert server.key not in server.log(), "later starts do not print the key"
    with server.client() as api:
        api.wait_node("keep-node", timeout=60)
        assert api.execute("keep-node", {"n": 5}) == {"m": 50}
        assert [f["id"] for f in api.list_folders()] == [f["id"] for f in folders]
    assert server.stop(signal.SIGINT) == 130
    assert "Stopping all instances." in server.log()
    assert "Traceback" not in server.log()
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/health", timeout=1)


def test_bad_setting_is_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cellnode", "serve", "--data-dir", str(tmp_path)],
        env={**os.environ, "CELLNODE_PORT": "eighty"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "CELLNODE_PORT" in result.stderr and "eighty" in result.stderr


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_a_taken_port_is_one_clear_line(flag: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = ["--port", port] if flag == "--port" else ["--port", "0", "--grpc-port", port]
        result = subprocess.run(
            [sys.executable, "-m", "cellnode", "serve", "--data-dir", str(tmp_path), *args],
            env={**{k: v for k, v in os.environ.items() if not k.startswith("CELLNODE_")}, "CELLNODE_PROFILE": "none"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"Cannot listen on 127.0.0.1:{port} ({flag}): Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_instances_exit_when_the_server_is_killed(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    server = ServerProcess(tmp_path / "data", env={"CELLNODE_PROFILE": str(tmp_path / "p.json")}).start()
    request.addfinalizer(lambda: server.stop(signal.SIGKILL))
    with server.client() as api:
        api.create_checkpoint(notebook(tmp_path, "a = 1", "b = a + 1"), name="k")
        node = api.create_node("k-node", checkpoint="k", inputs={"a": "int"}, outputs={"b": "int"}, instances=2)
    pids = instance_pids(server)
    assert {i["pid"] for i in node["instances"]} <= pids and len(node["instances"]) == 2
    server.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids), "instances of a killed server exit by themselves"


def test_idle_connections_are_closed(tmp_path: Path) -> None:
    import socket
    from urllib.parse import urlsplit

    server = ServerProcess(
        tmp_path / "data", env={"CELLNODE_PROFILE": str(tmp_path / "p.json"), "CELLNODE_IDLE_TIMEOUT": "1"}
    ).start()
    try:
        url = urlsplit(server.url)
        assert url.hostname is not None and url.port is not None
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):  # the whole answer, which may come in more than one read
                answer += sock.recv(4096)
            assert b"200 OK" in answer
            started = time.monotonic()
            assert sock.recv(4096) == b"", "the server closes the idle connection"
            assert 0.5 < time.monotonic() - started < 5
    finally:
        server.stop()
