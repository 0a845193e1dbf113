"""A container's output copied into the node's log files, as the runtime's log records (see
`cellnode/backends/container.py`, "Logs")."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import docker.errors
import requests
from docker.models.containers import Container

from cellnode.runtime.logs import LogFile

ENGINE_ERRORS = (docker.errors.DockerException, requests.RequestException)


class ContainerLog:
    """Copies a container's output into `<instance_id>.log` as runtime log records (see the module docstring)."""

    def __init__(self, path: Path, instance_id: str, *, max_bytes: int, backups: int) -> None:
        self.path = path
        self.instance_id = instance_id
        self._file = LogFile(str(path), max_bytes=max_bytes, backups=backups)
        self._lock = threading.Lock()
        self._last = ("", "")  # (timestamp, text) of the latest non-empty line of either stream
        self._closed = False

    @property
    def last_line(self) -> str:
        return self._last[1]

    def follow(self, container: Container, stream: str) -> None:
        """Copy `stream` ("out" or "err") until the container ends (run in a thread of its own)."""
        pending: tuple[str, bytearray] | None = None
        try:
            frames = container.logs(
                stream=True, follow=True, stdout=stream == "out", stderr=stream == "err", timestamps=True
            )
            # The engine sends one frame per line, stamped; a line over 16 KiB arrives in several frames, each
            # stamped, the last one ending in a newline.
            for frame in frames:
                stamp, _, data = frame.partition(b" ")
                if pending is None:
                    pending = (_stamp(stamp), bytearray())
                pending[1].extend(data)
                if data.endswith(b"\n"):
                    self._write(pending[0], stream, bytes(pending[1]))
                    pending = None
        except ENGINE_ERRORS:
            pass  # The container was removed, or the engine went away: its output ends here.
        finally:
            if pending is not None:
                self._write(pending[0], stream, bytes(pending[1]))

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._file.close()

    def _write(self, stamp: str, stream: str, data: bytes) -> None:
        lines = data.decode("utf-8", "backslashreplace").rstrip("\n").split("\n")
        lines = [line.removesuffix("\r") for line in lines]
        records = "".join(f"{stamp} {self.instance_id} - {stream} {line}\n" for line in lines)
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(OSError):  # A full disk must not stop the copy; the lines are lost.
                self._file.write(records.encode("utf-8", "backslashreplace"))
            text = next((line.strip() for line in reversed(lines) if line.strip()), "")
            if text and stamp >= self._last[0]:
                self._last = (stamp, text)


def _stamp(engine_stamp: bytes) -> str:
    """The engine's RFC 3339 timestamp (nanoseconds, trailing zeros dropped) as a log record's, in milliseconds."""
    text = engine_stamp.decode("ascii", "replace")
    whole, _, fraction = text.removesuffix("Z").partition(".")
    if text.endswith("Z") and len(whole) == 19 and whole[10] == "T" and (fraction.isdigit() or not fraction):
        return f"{whole}.{(fraction + '000')[:3]}Z"
    now = time.time()  # not the engine's format (podman's offset form, say): the time we read it
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
