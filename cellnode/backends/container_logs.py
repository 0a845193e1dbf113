"""A container's output copied into the node's log files, as the runtime's log records (see
`cellnode/backends/container.py`, "Logs").

A runtime instance in a container (`cellnode.backends.kernel_image`) writes its records itself, request IDs included,
into a FIFO that `copy_records` reads: they are copied into the same file as they are, so that the file has one writer,
which rotates it.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from pathlib import Path

import docker.errors
import requests
from docker.models.containers import Container

from cellnode.runtime.logs import LogFile

ENGINE_ERRORS = (docker.errors.DockerException, requests.RequestException)
RECORDS_DRAIN = 5.0  # seconds `close()` waits for a FIFO's copy to take in what its writer left
READ_SIZE = 65536


class ContainerLog:
    """Copies a container's output into `<instance_id>.log` as runtime log records (see the module docstring)."""

    def __init__(self, path: Path, instance_id: str, *, max_bytes: int, backups: int) -> None:
        self.path = path
        self.instance_id = instance_id
        self._file = LogFile(str(path), max_bytes=max_bytes, backups=backups)
        self._lock = threading.Lock()
        self._last = ("", "")  # (timestamp, text) of the latest non-empty line of either stream
        self._closed = False
        self._copies: list[tuple[threading.Thread, int]] = []  # FIFO copies: thread, write end of its wakeup pipe

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

    def copy_records(self, fifo: str) -> None:
        """Copy the log records written into the FIFO at `fifo` (whole lines, already in the format), in a thread,
        until its writer closes it, or until `close()`. Open it before the writer starts: the writer's open then
        does not block, and what it writes waits in the pipe until the thread reads it."""
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        wakeup, wake = os.pipe2(os.O_CLOEXEC)
        thread = threading.Thread(target=self._copy, args=(fd, wakeup), name=f"records-{self.instance_id}", daemon=True)
        self._copies.append((thread, wake))
        thread.start()

    def close(self) -> None:
        """Stop copying, once the FIFOs' copies have taken in what their writers left (the writer is gone by now)."""
        copies, self._copies = self._copies, []
        for thread, wake in copies:
            with contextlib.suppress(OSError):
                os.write(wake, b"x")
            thread.join(RECORDS_DRAIN)
            os.close(wake)
        with self._lock:
            if not self._closed:
                self._closed = True
                self._file.close()

    def _copy(self, fd: int, wakeup: int) -> None:
        # A FIFO opened before any writer polls as nothing to read (not as hung up) until a writer comes and goes.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wakeup, select.POLLIN)
        pending = bytearray()
        try:
            is_done = False
            while not is_done:
                is_done = any(ready == wakeup for ready, _ in poller.poll())
                while True:
                    try:
                        chunk = os.read(fd, READ_SIZE)
                    except BlockingIOError:
                        break  # the writer is there, and has written nothing more
                    if not chunk:
                        is_done = True  # the writer closed it (or, woken, none ever opened it)
                        break
                    pending += chunk
                    cut = pending.rfind(b"\n") + 1
                    if cut:
                        self._write_records(bytes(pending[:cut]))
                        del pending[:cut]
        except OSError:
            pass  # The FIFO went away with its directory: what it held is lost.
        finally:
            if pending:
                self._write_records(bytes(pending) + b"\n")
            os.close(fd)
            os.close(wakeup)

    def _write_records(self, data: bytes) -> None:
        """Append whole record lines as they are; the last one with text becomes `last_line`."""
        last = ("", "")
        for line in reversed(data.decode("utf-8", "replace").splitlines()):
            fields = line.split(" ", 4)  # TIMESTAMP INSTANCE_ID REQUEST_ID STREAM TEXT
            if len(fields) == 5 and fields[4].strip():
                last = (fields[0], fields[4].strip())
                break
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(OSError):  # A full disk must not stop the copy; the lines are lost.
                self._file.write(data)
            if last[1] and last[0] >= self._last[0]:
                self._last = last

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
