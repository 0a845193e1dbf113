"""What the supervisor reads of an instance's process tree on this machine, from /proc."""

from __future__ import annotations

import os
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid: int | None) -> int | None:
    """Resident memory of a process and its descendants (a `fork` state policy's request children, the processes a
    cell started), from /proc; None once the process is gone."""
    if pid is None:
        return None
    total, pending, seen = 0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * PAGE_SIZE
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, ValueError, IndexError):
            if current == pid:
                return None
            continue
        pending.extend(int(child) for child in children)
    return total


def exists(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
