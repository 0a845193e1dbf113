"""Ended instances' log files go after the retention or past the size cap; running instances' stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cellnode.telemetry.logs import prune_logs
from tests.helpers import ServerProcess

DAY = 86_400


def write(directory: Path, name: str, size: int, age: float) -> Path:
    path = directory / name
    path.write_bytes(b"x" * size)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_old_files_of_ended_instances_go(tmp_path: Path) -> None:
    old = write(tmp_path, "ended.log", 10, age=8 * DAY)
    old_rotated = write(tmp_path, "ended.log.1", 10, age=9 * DAY)
    running = write(tmp_path, "running.log", 10, age=30 * DAY)
    fresh = write(tmp_path, "other.log", 10, age=DAY)
    removed = prune_logs(tmp_path, live={"running"}, retention=7 * DAY, max_bytes=10**9)
    assert sorted(removed) == sorted([old, old_rotated])
    assert running.exists() and fresh.exists()


def test_past_the_cap_the_oldest_ended_files_go_first(tmp_path: Path) -> None:
    oldest = write(tmp_path, "a.log", 400, age=3 * DAY)
    middle = write(tmp_path, "b.log", 400, age=2 * DAY)
    newest = write(tmp_path, "c.log", 400, age=DAY)
    running = write(tmp_path, "d.log", 400, age=4 * DAY)
    just_written = write(tmp_path, "e.log", 400, age=1)  # maybe an instance that is starting
    assert prune_logs(tmp_path, live={"d"}, retention=7 * DAY, max_bytes=1300) == [oldest, middle]
    assert newest.exists() and running.exists() and just_written.exists()


def test_a_missing_directory_is_nothing_to_prune(tmp_path: Path) -> None:
    assert prune_logs(tmp_path / "none", live=set(), retention=1, max_bytes=1) == []


def test_the_server_prunes_when_it_starts(tmp_path: Path) -> None:
    logs = tmp_path / "data" / "logs" / "some-node"
    logs.mkdir(parents=True)
    old = write(logs, "ended.log", 10, age=2 * 3600)
    kept = write(logs, "recent.log", 10, age=600)
    server = ServerProcess(
        tmp_path / "data",
        env={"CELLNODE_PROFILE": str(tmp_path / "profile.json"), "CELLNODE_LOG_RETENTION_HOURS": "1"},
    ).start()
    try:
        deadline = time.monotonic() + 10
        while old.exists():
            assert time.monotonic() < deadline, "the old log file was not pruned"
            time.sleep(0.05)
        assert kept.exists()
    finally:
        server.stop()
