"""A node's logs: the per-instance files its instances write, merged in time order.

Each line is `TIMESTAMP INSTANCE_ID REQUEST_ID STREAM TEXT` (the timestamp ISO 8601 UTC, so lines sort by it as
text). Files rotate (`x.log`, `x.log.1`, `x.log.2`), so reading a node's logs never has more than a few files per
instance to go through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAX_TAIL = 10_000


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
