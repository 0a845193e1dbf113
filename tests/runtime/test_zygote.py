"""The zygote process itself, driven over its control socket pair with blocking frames."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellnode.runtime.protocol import EXECUTE, EXITED, FAILURE, FORK, FORKED, OK, READY, recv_frame, send_frame
from tests.runtime.checkpoints import launch_spec, randomizer_spec, threaded_spec

RANDOM_INPUT = json.dumps({"input_data": {"left_bound": 1, "right_bound": 10}}).encode()


class ZygoteProcess:
    """`python -u -m cellnode.runtime --zygote SPEC` with a control socket pair, as the local backend starts it."""

    def __init__(self, spec: dict[str, Any], directory: Path, *, control_fd: int | None = None) -> None:
        self.directory = directory
        self.control, theirs = socket.socketpair()
        self.control.settimeout(20)
        fd = theirs.fileno() if control_fd is None else control_fd
        spec_path = directory / "zygote.json"
        spec_path.write_text(json.dumps({**spec, "control_fd": fd}))
        self.log_path = directory / "zygote.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-u", "-m", "cellnode.runtime", "--zygote", str(spec_path)],
                stdout=log,
                stderr=log,
                pass_fds=(theirs.fileno(),),
            )
        theirs.close()

    def frame(self) -> tuple[int, Any]:
        frame = recv_frame(self.control)
        assert frame is not None, "the zygote closed its control connection"
        return frame[0], json.loads(frame[1])

    def fork(self, instance_id: str) -> tuple[int, Any]:
        path = str(self.directory / f"{instance_id}.sock")
        send_frame(self.control, FORK, json.dumps({"instance_id": instance_id, "socket": path}).encode())
        return self.frame()

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.control.close()
        if self.process.poll() is None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths hold at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cn-z"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def zygotes() -> Iterator[list[ZygoteProcess]]:
    started: list[ZygoteProcess] = []
    yield started
    for zygote in started:
        zygote.stop()


def execute(path: Path, payload: bytes = RANDOM_INPUT) -> tuple[int, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(20)
        conn.connect(str(path))
        send_frame(conn, EXECUTE, payload)
        frame = recv_frame(conn)
    assert frame is not None
    return frame[0], json.loads(frame[1])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_forks_reports_exits_and_exits_with_its_control_connection(
    tmp_path: Path, short_dir: Path, zygotes: list[ZygoteProcess]
) -> None:
    zygote = ZygoteProcess(randomizer_spec(tmp_path), short_dir)
    zygotes.append(zygote)
    kind, ready = zygote.frame()
    assert (kind, ready["pid"], ready["fork_safe"], ready["reason"]) == (READY, zygote.process.pid, True, "")
    assert "Zygote of node 'n1' loaded 5 variables in " in zygote.log()

    kind, first = zygote.fork("a")
    assert kind == FORKED
    kind, second = zygote.fork("b")
    assert kind == FORKED
    for name in ("a", "b"):
        kind, body = execute(short_dir / f"{name}.sock")
        assert kind == OK and 1 <= body["output_data"]["generated_value"] <= 10
    assert os.stat(short_dir / "a.sock").st_mode & 0o777 == 0o600

    os.kill(first["pid"], signal.SIGKILL)
    assert zygote.frame() == (EXITED, {"pid": first["pid"], "code": -signal.SIGKILL})
    assert execute(short_dir / "b.sock")[0] == OK

    kind, failure = zygote.fork("a")  # The killed instance left its socket file behind.
    assert kind == FAILURE and failure["code"] == 2
    assert failure["message"].startswith(f"Cannot bind socket {str(short_dir / 'a.sock')!r}")
    send_frame(zygote.control, ord("?"))
    kind, failure = zygote.frame()
    assert kind == FAILURE and "a zygote understands FORK only" in failure["message"]

    zygote.control.close()
    assert zygote.process.wait(10) == 0
    deadline = time.monotonic() + 5
    while alive(second["pid"]):
        assert time.monotonic() < deadline, "the instance outlived its zygote"
        time.sleep(0.02)
    assert zygote.log().count("forked from zygote") == 2


def test_sigterm_drains_the_instances(tmp_path: Path, short_dir: Path, zygotes: list[ZygoteProcess]) -> None:
    source = "open(marker, 'w').close()\ntime.sleep(0.3)\ny = 1"
    zygote = ZygoteProcess(launch_spec(tmp_path, source, setup=("import time",), outputs={"y": "int"}), short_dir)
    zygotes.append(zygote)
    assert zygote.frame()[0] == READY
    kind, forked = zygote.fork("a")
    assert kind == FORKED
    marker = tmp_path / "running"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(short_dir / "a.sock"))
        send_frame(conn, EXECUTE, json.dumps({"marker": str(marker)}).encode())
        while not marker.exists():
            time.sleep(0.01)
        zygote.process.send_signal(signal.SIGTERM)
        assert recv_frame(conn) == (OK, b'{"y":1}'), "the running request finishes"
    assert zygote.frame() == (EXITED, {"pid": forked["pid"], "code": 0})
    assert zygote.process.wait(10) == 0


def test_corrupt_blob_exits_3_without_ready(tmp_path: Path, short_dir: Path, zygotes: list[ZygoteProcess]) -> None:
    spec = randomizer_spec(tmp_path)
    variable = next(v for v in spec["variables"] if v["name"] == "input_data")
    Path(variable["path"]).write_bytes(b"tampered")
    zygote = ZygoteProcess(spec, short_dir)
    zygotes.append(zygote)
    assert recv_frame(zygote.control) is None
    assert zygote.process.wait(10) == 3
    last = zygote.log().splitlines()[-1]
    assert last.startswith(f"Blob for variable 'input_data' at {variable['path']} is corrupt:")


def test_usage_exits_2() -> None:
    command = [sys.executable, "-m", "cellnode.runtime", "--zygote"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "Usage: python -m cellnode.runtime --zygote SPEC_PATH" in result.stderr


def test_a_control_fd_that_is_not_open_exits_2(tmp_path: Path, short_dir: Path) -> None:
    zygote = ZygoteProcess(randomizer_spec(tmp_path), short_dir, control_fd=1000)
    assert zygote.process.wait(30) == 2
    assert "Control descriptor 1000 is not an open socket" in zygote.log()
    zygote.stop()


@pytest.mark.parametrize("daemon", [True, False])
def test_a_load_that_starts_a_thread_is_not_fork_safe(
    daemon: bool, tmp_path: Path, short_dir: Path, zygotes: list[ZygoteProcess]
) -> None:
    zygote = ZygoteProcess(threaded_spec(tmp_path, "y = pool.size", daemon=daemon, outputs={"y": "int"}), short_dir)
    zygotes.append(zygote)
    kind, ready = zygote.frame()
    reason = "the checkpoint started 1 thread while loading ('pool-worker')"
    assert (kind, ready["pid"], ready["fork_safe"], ready["reason"]) == (READY, zygote.process.pid, False, reason)
    assert recv_frame(zygote.control) is None, "it exits instead of forking, its thread (daemon or not) regardless"
    assert zygote.process.wait(10) == 0
    assert zygote.log().splitlines()[-1] == (
        f"Zygote of node 'n1' cannot fork safely: {reason}. Its instances start as standalone processes instead, "
        "each loading the checkpoint itself; to share one loaded copy again, start threads and CUDA in the cell, not "
        "while the checkpoint loads."
    )


def test_a_load_error_after_a_thread_started_still_exits(
    tmp_path: Path, short_dir: Path, zygotes: list[ZygoteProcess]
) -> None:
    zygote = ZygoteProcess(threaded_spec(tmp_path, "y = (", daemon=False), short_dir)
    zygotes.append(zygote)
    assert recv_frame(zygote.control) is None
    assert zygote.process.wait(10) == 4, "the pool's thread does not hold the exit"
    assert zygote.log().splitlines()[-1].startswith("The deployed cell does not compile:")
