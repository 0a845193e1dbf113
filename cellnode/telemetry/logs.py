"""A node's logs: the per-instance files its instances write, merged in time order.

Each line is `TIMESTAMP INSTANCE_ID REQUEST_ID STREAM TEXT` (the timestamp ISO 8601 UTC, so lines sort by it as
text). Files rotate (`x.log`, `x.log.1`, `x.log.2`), so reading a node's logs never has more than a few files per
instance to go through.

Ended instances' files are kept for a while and then removed (`prune_logs`): those untouched for longer than the
retention, and the oldest beyond a size cap per node. A running instance's files are never removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

MAX_TAIL = 10_000
RECENT = 60.0  # seconds: a file written this recently may belong to an instance that is starting


@dataclass(frozen=True)
class LogRecord:
    time: str
    instance_id: str
    request_id: str
    stream: str
    text: str


def parse(line: str) -> LogRecord | None:
    """A record, or None for a line not in the format (such as one written before it existed)."""
    parts = line.rstrip("\n").split(" ", 4)
    if len(parts) < 4 or not parts[0][:4].isdigit() or "T" not in parts[0]:
        return None
    time, instance_id, request_id, stream = parts[:4]
    return LogRecord(time, instance_id, request_id, stream, parts[4] if len(parts) == 5 else "")


def read_logs(
    directory: Path, *, since: str | None = None, instance_id: str | None = None, tail: int = 100
) -> list[LogRecord]:
    """The last `tail` records of the node's logs, oldest first, at or after `since`, of one instance if given."""
    records: list[LogRecord] = []
    if not directory.is_dir():
        return records
    for path in directory.glob("*.log*"):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue  # rotated away while we looked
        for line in lines:
            record = parse(line)
            if record is None:
                continue
            if since is not None and record.time < since:
                continue
            if instance_id is not None and record.instance_id != instance_id:
                continue
            records.append(record)
    records.sort(key=lambda record: record.time)
    return records[-min(max(tail, 1), MAX_TAIL) :]


def prune_logs(directory: Path, *, live: set[str], retention: float, max_bytes: int) -> list[Path]:
    """Remove the log files of a node's ended processes: those untouched for `retention` seconds, then the oldest
    until the node's files fit in `max_bytes`. Files of the instances in `live`, and files written in the last
    minute, stay. Returns the files removed."""
    now = time.time()
    files = []
    for path in directory.glob("*.log*") if directory.is_dir() else ():
        try:
            stat = path.stat()
        except OSError:
            continue  # removed meanwhile
        files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    removed = []
    for mtime, size, path in sorted(files):
        owner = path.name.split(".log", 1)[0]
        if owner in live or now - mtime < RECENT:
            continue
        if now - mtime > retention or total > max_bytes:
            path.unlink(missing_ok=True)
            removed.append(path)
            total -= size
    return removed
