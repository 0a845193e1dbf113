"""Log records and rotation: `ProcessLog` and `LogFile` in process, then a real instance writing its own log file."""

from __future__ import annotations

import json
import os
import re
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

from cellnode.runtime.logs import LogFile, ProcessLog
from cellnode.runtime.protocol import EXECUTE, EXECUTE_ID, FAILURE, OK, recv_frame, send_frame
from tests.runtime.checkpoints import launch_spec

RECORD = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) (\S+) (out|err) (.*)")
PRINTER = "print('hello', x)\nprint('partial', x, end='')\nimport os\nos.system('echo from-a-subprocess')\ny = x"


class MemorySink:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        pass

    def records(self) -> list[tuple[str, ...]]:
        lines = b"".join(self.writes).decode().splitlines()
        matches = [RECORD.fullmatch(line) for line in lines]
        assert all(matches), lines
        return [match.groups()[1:] for match in matches if match]


def test_records_are_buffered_per_request() -> None:
    sink = MemorySink()
    log = ProcessLog(sink, "i7")
    log.out.write("before\n")
    assert sink.records() == [("i7", "-", "out", "before")], "outside a request, a line is written at once"
    log.begin("req-1")
    print("one", "two", file=log.out)
    print("oops", file=log.err)
    log.out.write("no newline")
    log.out.flush()
    assert len(sink.writes) == 1, "within a request, nothing is written before its end"
    log.end()
    assert len(sink.writes) == 2, "the whole request is one write"
    assert sink.records()[1:] == [
        ("i7", "req-1", "out", "one two"),
        ("i7", "req-1", "err", "oops"),
        ("i7", "req-1", "out", "no newline"),
    ]
    log.out.write("after\n\n")
    assert sink.records()[-2:] == [("i7", "-", "out", "after"), ("i7", "-", "out", "")]


def test_a_request_that_prints_a_lot_is_written_in_chunks() -> None:
    sink = MemorySink()
    log = ProcessLog(sink, "i1")
    log.begin("big")
    for _ in range(1000):
        log.out.write("x" * 199 + "\n")
    assert 1 <= len(sink.writes) <= 4, "written every FLUSH_CHARS, not once per line"
    log.end()
    assert len(sink.records()) == 1000


def test_rotation_keeps_whole_records_and_two_backups(tmp_path: Path) -> None:
    path = tmp_path / "i1.log"
    log = LogFile(str(path), max_bytes=100, backups=2)
    for number in range(30):
        log.write(f"line {number:02d} ".encode() + b"." * 20 + b"\n")  # 29 bytes
    log.write(b"y" * 250 + b"\n")  # Longer than the cap: a file of its own.
    log.write(b"z\n")
    log.close()
    assert sorted(os.listdir(tmp_path)) == ["i1.log", "i1.log.1", "i1.log.2"]
    assert path.read_bytes() == b"z\n"
    assert (tmp_path / "i1.log.1").read_bytes() == b"y" * 250 + b"\n"
    backup = (tmp_path / "i1.log.2").read_bytes()
    assert len(backup) <= 100 and backup.endswith(b"line 29 " + b"." * 20 + b"\n")
    assert all(len(line) == 28 for line in backup.splitlines())


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cn-t"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve(spec: dict[str, Any], directory: Path) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A standalone instance of `spec` and a connection to it."""
    path = directory / "i.sock"
    (directory / "spec.json").write_text(json.dumps({**spec, "socket": str(path)}))
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "cellnode.runtime", str(directory / "spec.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))
            return process, conn
        except OSError:
            conn.close()
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)


def call(conn: socket.socket, kind: int, payload: bytes) -> tuple[int, bytes]:
    send_frame(conn, kind, payload)
    frame = recv_frame(conn)
    assert frame is not None
    return frame


def stop(process: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    return out, err


def test_an_instance_logs_its_requests_with_their_ids(tmp_path: Path, short_dir: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    spec = launch_spec(tmp_path, PRINTER, inputs={"x": "int"}, outputs={"y": "int"})
    process, conn = serve({**spec, "log_dir": str(logs)}, short_dir)
    assert call(conn, EXECUTE_ID, b"Req_1-a\n" + b'{"x": 1}') == (OK, b'{"y":1}')
    assert call(conn, EXECUTE, b'{"x": 2}') == (OK, b'{"y":2}')
    kind, _ = call(conn, EXECUTE_ID, b"bad id!\n{}")
    assert kind == FAILURE
    conn.close()
    out, err = stop(process)
    assert out == err == b"", "everything goes to the log file"
    assert os.listdir(logs) == ["i1.log"]
    lines = (logs / "i1.log").read_text().splitlines()
    matches = [RECORD.fullmatch(line) for line in lines]
    assert all(matches), lines
    records = [match.groups()[1:] for match in matches if match]
    assert records[0][:3] == ("i1", "-", "err") and "loaded 0 variables" in records[0][3]
    assert records[1:] == [
        ("i1", "Req_1-a", "out", "hello 1"),
        ("i1", "Req_1-a", "out", "partial 1"),
        ("i1", "Req_1-a", "out", "from-a-subprocess"),
        ("i1", "-", "out", "hello 2"),
        ("i1", "-", "out", "partial 2"),
        ("i1", "-", "out", "from-a-subprocess"),
    ]


def test_an_instance_rotates_its_file(tmp_path: Path, short_dir: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    spec = launch_spec(tmp_path, "for i in range(40):\n    print('x' * 60)\ny = 1", outputs={"y": "int"})
    process, conn = serve({**spec, "log_dir": str(logs), "log_max_bytes": 4096, "log_backups": 2}, short_dir)
    for number in range(12):
        assert call(conn, EXECUTE_ID, f"r{number}\n{{}}".encode())[0] == OK
    conn.close()
    stop(process)
    assert sorted(os.listdir(logs)) == ["i1.log", "i1.log.1", "i1.log.2"]
    for name in os.listdir(logs):
        data = (logs / name).read_text()
        assert 0 < len(data) <= 4096 and data.endswith("\n")
        assert all(RECORD.fullmatch(line) for line in data.splitlines())
    assert (logs / "i1.log").read_text().splitlines()[-1].split()[2] == "r11"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"state": "shared"}, "The launch spec has state 'shared'; use 'isolated', 'persistent' or 'fork'."),
        ({"log_max_bytes": "10MB"}, "The launch spec has log_max_bytes '10MB'; it must be an integer >= 1."),
        ({"log_backups": -1}, "The launch spec has log_backups -1; it must be an integer >= 0."),
    ],
)
def test_bad_settings_exit_2(tmp_path: Path, short_dir: Path, extra: dict[str, Any], message: str) -> None:
    spec = {**launch_spec(tmp_path, "y = 1"), "socket": str(short_dir / "i.sock"), **extra}
    (short_dir / "spec.json").write_text(json.dumps(spec))
    process = subprocess.run(
        [sys.executable, "-m", "cellnode.runtime", str(short_dir / "spec.json")],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert (process.returncode, process.stderr) == (2, message + "\n")
