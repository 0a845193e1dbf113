"""The instance process itself, driven over its socket with blocking frames."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellnode.runtime.instance import main
from cellnode.runtime.protocol import EXECUTE, FAILURE, INTERRUPTED, OK, PING, PONG, recv_frame, send_frame
from tests.runtime.checkpoints import launch_spec, randomizer_spec, threaded_spec

RANDOM_INPUT = json.dumps({"input_data": {"left_bound": 1, "right_bound": 10}}).encode()
# Runs the instance and records, at exit, every module it imported.
IMPORT_HARNESS = """\
import atexit, json, sys
def dump():
    with open(sys.argv[2], "w") as file:
        json.dump(sorted(sys.modules), file)
atexit.register(dump)
from cellnode.runtime.instance import main
sys.exit(main(sys.argv[1:2]))
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths hold at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cn-t"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Runtime:
    """`python -u -m cellnode.runtime SPEC` as a child process."""

    def __init__(
        self,
        spec: dict[str, Any],
        directory: Path,
        *,
        argv: list[str] | None = None,
        extra: tuple[str, ...] = (),
        **popen: Any,
    ) -> None:
        self.socket = str(directory / "i.sock")
        spec_path = directory / "spec.json"
        spec_path.write_text(json.dumps({**spec, "socket": self.socket}))
        command = argv or [sys.executable, "-u", "-m", "cellnode.runtime"]
        self.process = subprocess.Popen(
            [*command, str(spec_path), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen
        )

    def connect(self, timeout: float = 20.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(self.socket)
                return conn
            except OSError:
                conn.close()
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def finish(self, timeout: float = 10.0) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out.decode(), err.decode()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    started: list[Runtime] = []
    yield started
    for runtime in started:
        runtime.stop()


def wait_for(path: Path, timeout: float = 20.0) -> None:
    """Wait until the cell has created `path`: it is running."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"The cell did not create {path} in time."
        time.sleep(0.01)


def call(conn: socket.socket, kind: int, payload: bytes = b"") -> tuple[int, bytes]:
    send_frame(conn, kind, payload)
    frame = recv_frame(conn)
    assert frame is not None
    return frame


def test_executes_and_answers_pings_on_two_connections(
    tmp_path: Path, short_dir: Path, runtimes: list[Runtime]
) -> None:
    runtime = Runtime(randomizer_spec(tmp_path), short_dir)
    runtimes.append(runtime)
    front, health = runtime.connect(), runtime.connect()
    assert stat.S_IMODE(os.stat(runtime.socket).st_mode) == 0o600
    kind, payload = call(front, EXECUTE, RANDOM_INPUT)
    assert kind == OK
    assert 1 <= json.loads(payload)["output_data"]["generated_value"] <= 10
    assert call(health, PING) == (PONG, b"")
    health.close()
    assert call(front, EXECUTE, RANDOM_INPUT)[0] == OK
    kind, payload = call(front, ord("?"))
    assert kind == FAILURE
    assert json.loads(payload)["message"].startswith("Unknown frame kind 63")
    front.send(b"\x00\x00")  # Half a header, then gone: the instance drops this connection only.
    front.close()
    with runtime.connect() as again:
        assert call(again, PING) == (PONG, b"")


def test_cell_output_goes_to_stdout(tmp_path: Path, short_dir: Path, runtimes: list[Runtime]) -> None:
    runtime = Runtime(randomizer_spec(tmp_path), short_dir)
    runtimes.append(runtime)
    with runtime.connect() as conn:
        call(conn, EXECUTE, RANDOM_INPUT)
    runtime.process.send_signal(signal.SIGTERM)
    code, out, err = runtime.finish()
    assert code == 0
    assert out.startswith("{'generated_value': ")
    assert "Instance 'i1' of node 'n1' loaded 5 variables" in err


def test_sigint_interrupts_only_a_running_cell(tmp_path: Path, short_dir: Path, runtimes: list[Runtime]) -> None:
    source = "open(marker, 'w').close()\ntime.sleep(seconds)\ny = seconds"
    spec = launch_spec(tmp_path, source, setup=("import time",), outputs={"y": "int"})
    runtime = Runtime(spec, short_dir)
    runtimes.append(runtime)
    conn = runtime.connect()
    runtime.process.send_signal(signal.SIGINT)  # Idle: ignored.
    marker = tmp_path / "running"
    assert call(conn, EXECUTE, json.dumps({"seconds": 0, "marker": str(marker)}).encode()) == (OK, b'{"y":0}')
    marker.unlink()
    send_frame(conn, EXECUTE, json.dumps({"seconds": 60, "marker": str(marker)}).encode())
    wait_for(marker)
    runtime.process.send_signal(signal.SIGINT)
    frame = recv_frame(conn)
    assert frame is not None
    assert frame == (INTERRUPTED, b'{"message":"The cell was interrupted after running past the node\'s timeout."}')
    assert call(conn, EXECUTE, json.dumps({"seconds": 0, "marker": str(marker)}).encode()) == (OK, b'{"y":0}')
    conn.close()


def test_sigterm_finishes_the_request_then_exits(tmp_path: Path, short_dir: Path, runtimes: list[Runtime]) -> None:
    source = "open(marker, 'w').close()\ntime.sleep(0.3)\ny = 1"
    spec = launch_spec(tmp_path, source, setup=("import time",), outputs={"y": "int"})
    runtime = Runtime(spec, short_dir)
    runtimes.append(runtime)
    conn = runtime.connect()
    marker = tmp_path / "running"
    send_frame(conn, EXECUTE, json.dumps({"marker": str(marker)}).encode())
    wait_for(marker)
    runtime.process.send_signal(signal.SIGTERM)
    assert recv_frame(conn) == (OK, b'{"y":1}')
    assert recv_frame(conn) is None
    assert runtime.finish()[0] == 0
    assert not os.path.exists(runtime.socket)
    conn.close()


def test_corrupt_blob_exits_3(tmp_path: Path, short_dir: Path) -> None:
    spec = randomizer_spec(tmp_path)
    variable = next(v for v in spec["variables"] if v["name"] == "input_data")
    Path(variable["path"]).write_bytes(b"tampered")
    code, _, err = Runtime(spec, short_dir).finish()
    assert code == 3
    assert err.splitlines()[-1].startswith(f"Blob for variable 'input_data' at {variable['path']} is corrupt:")
    assert not os.path.exists(short_dir / "i.sock")


def test_missing_spec_exits_2(short_dir: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "cellnode.runtime", str(short_dir / "none.json")], capture_output=True, text=True
    )
    assert process.returncode == 2
    assert "The launch spec" in process.stderr and "cannot be read" in process.stderr


def test_imports_only_stdlib_cloudpickle_and_the_runtime(tmp_path: Path, short_dir: Path) -> None:
    modules_file = short_dir / "modules.json"
    baseline = subprocess.run(
        [sys.executable, "-c", "import json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        check=True,
    )
    harness = [sys.executable, "-u", "-c", IMPORT_HARNESS]
    runtime = Runtime(randomizer_spec(tmp_path), short_dir, argv=harness, extra=(str(modules_file),))
    with runtime.connect() as conn:
        assert call(conn, EXECUTE, RANDOM_INPUT)[0] == OK
    runtime.process.send_signal(signal.SIGTERM)
    assert runtime.finish()[0] == 0
    imported = set(json.loads(modules_file.read_text()))
    allowed = set(json.loads(baseline.stdout))
    foreign = {
        name
        for name in imported - allowed
        if name.split(".")[0] not in sys.stdlib_module_names
        and name.split(".")[0] != "cloudpickle"
        and name not in ("cellnode", "cellnode._version")
        and not name.startswith("cellnode.runtime")
    }
    assert "cellnode.runtime.executor" in imported
    assert foreign == set()


def test_magics_run_against_the_namespace(tmp_path: Path, short_dir: Path, runtimes: list[Runtime]) -> None:
    source = "get_ipython().run_line_magic('time', 'output = value * 2')\n"
    spec = launch_spec(tmp_path, source, outputs={"output": "int"}, uses_ipython=True)
    runtime = Runtime(spec, short_dir, env={**os.environ, "HOME": str(tmp_path)})
    runtimes.append(runtime)
    with runtime.connect() as conn:
        assert call(conn, EXECUTE, b'{"value": 21}') == (OK, b'{"output":42}')
        assert call(conn, EXECUTE, b'{"value": 2}') == (OK, b'{"output":4}')


def test_ipython_syntax_without_ipython_exits_4(tmp_path: Path, short_dir: Path) -> None:
    fake = tmp_path / "fake"
    (fake / "IPython").mkdir(parents=True)
    (fake / "IPython" / "__init__.py").write_text("raise ImportError('No module named IPython')\n")
    spec = launch_spec(tmp_path, "get_ipython().run_line_magic('time', 'x = 1')", uses_ipython=True)
    runtime = Runtime(spec, short_dir, env={**os.environ, "PYTHONPATH": str(fake)})
    code, _, err = runtime.finish()
    assert code == 4
    assert err.splitlines()[-1].startswith("The cell uses IPython syntax")
    assert "Install ipython there, or remove the IPython syntax from the cell." in err


@pytest.mark.usefixtures("keep_main")
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("usage", "Usage: python -m cellnode.runtime SPEC_PATH"),
        ("not json", "cannot be read"),
        ("no socket", "has no 'socket'; the backend must write one."),
        ("long socket", "is longer than 107 bytes; use a shorter runtime directory."),
        ("taken socket", "Cannot bind socket"),
        ("bad parent", "The launch spec has parent_pid '1'; it must be a process ID."),
    ],
)
def test_setup_errors_exit_2(
    case: str, expected: str, tmp_path: Path, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_path = tmp_path / "spec.json"
    spec = {**launch_spec(tmp_path, "y = 1"), "socket": str(short_dir / "i.sock")}
    if case == "not json":
        spec_path.write_text("{")
    elif case == "no socket":
        spec_path.write_text(json.dumps({**spec, "socket": None}))
    elif case == "long socket":
        spec_path.write_text(json.dumps({**spec, "socket": "/tmp/" + "x" * 110}))
    elif case == "bad parent":
        spec_path.write_text(json.dumps({**spec, "parent_pid": "1"}))
    else:
        (short_dir / "i.sock").write_text("")
        spec_path.write_text(json.dumps(spec))
    argv = [] if case == "usage" else [str(spec_path)]
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_sigterm_does_not_wait_for_the_checkpoints_threads(
    tmp_path: Path, short_dir: Path, runtimes: list[Runtime]
) -> None:
    spec = threaded_spec(tmp_path, "y = pool.size", daemon=False, outputs={"y": "int"})
    runtime = Runtime(spec, short_dir)
    runtimes.append(runtime)
    with runtime.connect() as conn:
        assert call(conn, EXECUTE, b"{}") == (OK, b'{"y":2}')
    assert len(os.listdir(f"/proc/{runtime.process.pid}/task")) == 2, "the pool's thread runs"
    runtime.process.send_signal(signal.SIGTERM)
    assert runtime.finish()[0] == 0, "the thread is not joined"
    assert not os.path.exists(runtime.socket)


def test_a_load_error_after_a_thread_started_still_exits(
    tmp_path: Path, short_dir: Path, runtimes: list[Runtime]
) -> None:
    runtime = Runtime(threaded_spec(tmp_path, "y = (", daemon=False), short_dir)
    runtimes.append(runtime)
    code, _, err = runtime.finish()
    assert code == 4, "the pool's thread does not hold the exit"
    assert err.splitlines()[-1].startswith("The deployed cell does not compile:")


def test_exits_when_its_parent_is_not_the_spec_s(tmp_path: Path, short_dir: Path, runtimes: list[Runtime]) -> None:
    # The server that wrote the spec died while the instance loaded: it was reparented before it could look.
    gone = os.getppid()
    runtime = Runtime({**randomizer_spec(tmp_path), "parent_pid": gone}, short_dir)
    runtimes.append(runtime)
    code, _, err = runtime.finish(timeout=20)
    assert code == 0
    assert f"The process that started this instance ({gone}) is gone; exiting." in err
    assert not os.path.exists(runtime.socket)


@pytest.mark.slow
def test_exits_when_its_parent_dies(tmp_path: Path, short_dir: Path) -> None:
    spec_path = short_dir / "spec.json"
    socket_path = short_dir / "i.sock"
    spec_path.write_text(json.dumps({**randomizer_spec(tmp_path), "socket": str(socket_path)}))
    parent_code = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-m', 'cellnode.runtime', sys.argv[1]])\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, str(spec_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    exited = False
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        parent.kill()
        parent.communicate()
        deadline = time.monotonic() + 5
        while socket_path.exists():
            assert time.monotonic() < deadline, "The orphaned instance did not exit."
            time.sleep(0.05)
        exited = True
    finally:
        parent.kill()
        parent.communicate()
        if not exited:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)
