"""The log file of a runtime process: every line it outputs, as `TIMESTAMP INSTANCE_ID REQUEST_ID STREAM TEXT`.

Standard library only: this module runs inside instances, on the hot path.

When the launch spec names a `"log_dir"`, each process (the zygote, and each instance) writes its own file there:
`<instance_id>.log` for an instance, `<log_name>.log` for a zygote. A record is one line of output: the time the line
was completed (ISO 8601 UTC with milliseconds, `2026-11-24T10:00:00.123Z`), the instance ID (the zygote's log name in a
zygote), the request ID (`-` outside a request), `out` or `err`, and the text. `sys.stdout` and `sys.stderr` become
`LogStream`s, so `print` in the cell costs no system call: lines are buffered for the whole request and written with
one `write` when it ends (at once outside a request, or when a request has buffered `FLUSH_CHARS`); a partial line is
flushed at the end of the request. Descriptors 1 and 2 point at in-memory files (memfd), read at the end of each
request and when the process is idle, so output that bypasses `sys.stdout` (C code, a subprocess the cell runs) gets
records too. Output buffered when a process dies abruptly (SIGKILL, a segfault) is lost.

Each process rotates its own file: past `"log_max_bytes"` (10 MiB by default) `x.log` becomes `x.log.1`, `x.log.1`
becomes `x.log.2`, and so on up to `"log_backups"` (2 by default); records are never split across files.
"""

from __future__ import annotations

import atexit
import io
import os
import sys
import threading
import time
from typing import Any, Protocol

from cellnode.runtime.loader import EXIT_BAD_SPEC, LoadError

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 2
# A request that has buffered this many characters writes them at once: its memory stays bounded.
FLUSH_CHARS = 64 * 1024
NO_REQUEST = "-"

Record = tuple[float, str, str]


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class LogFile:
    """An append-only file that this process alone writes, rotated at `max_bytes` into `backups` numbered files."""

    def __init__(self, path: str, *, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        """Append whole lines, rotating first where they would take the file past `max_bytes`."""
        while self.size + len(data) > self.max_bytes:
            room = self.max_bytes - self.size
            cut = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if cut == 0 and self.size == 0:
                cut = data.find(b"\n") + 1 or len(data)  # One line longer than the cap gets a file of its own.
            if cut:
                self._append(data[:cut])
                data = data[cut:]
            if not data:
                return
            self.rotate()
        self._append(data)

    def rotate(self) -> None:
        os.close(self._fd)
        names = [self.path] + [f"{self.path}.{number}" for number in range(1, self.backups + 1)]
        try:
            if self.backups == 0:
                os.unlink(self.path)
            for older, newer in reversed(list(zip(names, names[1:], strict=False))):
                if os.path.exists(older):
                    os.replace(older, newer)
        finally:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.size = os.fstat(self._fd).st_size

    def close(self) -> None:
        os.close(self._fd)

    def _append(self, data: bytes) -> None:
        written = os.write(self._fd, data)
        if written < len(data):  # Interrupted by a signal, or a full disk.
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(self._fd, view) :]
        self.size += len(data)


class LogStream(io.TextIOBase):
    """`sys.stdout` or `sys.stderr` of a process whose output goes to a `ProcessLog`."""

    encoding = "utf-8"
    errors = "backslashreplace"

    def __init__(self, log: ProcessLog, stream: str, fd: int) -> None:
        super().__init__()
        self.log = log
        self.stream = stream  # "out" or "err": the records' STREAM field.
        self.fd = fd
        self.partial: list[str] = []

    @property
    def name(self) -> str:
        return f"<std{self.stream}>"

    def write(self, text: str) -> int:
        log = self.log
        with log.lock:
            partial = self.partial
            if text == "\n":  # The end of each print().
                log.records.append((time.time(), self.stream, "".join(partial)))
                partial.clear()
            elif "\n" in text:
                log.add_lines(self, text)
            else:
                partial.append(text)
            log.buffered += len(text)
            if not log.in_request:
                if log.records:
                    log.write_records(log.records)
            elif log.buffered > FLUSH_CHARS:
                log.write_records(log.take(partial=True))
        return len(text)

    def flush(self) -> None:
        self.log.flush(partial=True)

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class ProcessLog:
    """Buffers this process's output as records and writes them to `sink` (see the module docstring)."""

    def __init__(self, sink: Sink, name: str) -> None:
        self.sink = sink
        self.name = name
        self.request_id = NO_REQUEST
        self.in_request = False
        self.out = LogStream(self, "out", 1)
        self.err = LogStream(self, "err", 2)
        self.records: list[Record] = []
        self.buffered = 0
        self._captures: list[tuple[str, int]] = []
        # Reentrant: a signal handler of the cell's may print while this thread holds it.
        self.lock = threading.RLock()
        self._second = -1
        self._prefix = ""

    def install(self) -> None:
        """Make this log the process's `sys.stdout`, `sys.stderr` and descriptors 1 and 2."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._capture()
        sys.stdout, sys.stderr = self.out, self.err
        os.register_at_fork(after_in_child=self._after_fork)
        atexit.register(self.close)

    def reopen(self, name: str, sink: Sink) -> None:
        """In a forked child that is a process of its own (an instance): write as `name` to `sink`, capturing anew."""
        self.sink.close()
        for _, fd in self._captures:
            os.close(fd)
        self.sink, self.name, self._captures = sink, name, []
        self._capture()

    def add_lines(self, stream: LogStream, text: str) -> None:
        """A record for each line `text`, written to `stream`, completes (the caller holds the lock)."""
        lines = text.split("\n")
        partial = stream.partial
        if partial:
            partial.append(lines[0])
            lines[0] = "".join(partial)
            partial.clear()
        last = lines.pop()
        now = time.time()
        name = stream.stream
        self.records += [(now, name, line) for line in lines]
        if last:
            partial.append(last)

    def begin(self, request_id: str) -> None:
        """A request starts: its lines carry `request_id` and wait for `end()`."""
        self.request_id = request_id
        self.in_request = True

    def end(self) -> None:
        """The request is over: write its records, partial lines included, and forget its ID."""
        with self.lock:
            records = self.take(partial=True)
            if records:
                self.write_records(records)
            self.request_id = NO_REQUEST
            self.in_request = False

    def flush(self, *, partial: bool = False) -> None:
        """Write what is buffered, outside a request only (within one, lines wait for its end)."""
        if not self.in_request:
            with self.lock:
                records = self.take(partial=partial)
                if records:
                    self.write_records(records)

    def close(self) -> None:
        """Write everything that is buffered; the process is about to exit."""
        self.in_request = False
        self.flush(partial=True)

    def take(self, *, partial: bool) -> list[Record]:
        """What is buffered, partial lines included if `partial`, and what descriptors 1 and 2 got (lock held)."""
        records, self.records, self.buffered = self.records, [], 0
        if partial:
            for stream in (self.out, self.err):
                if stream.partial:
                    records.append((time.time(), stream.stream, "".join(stream.partial)))
                    stream.partial.clear()
        for name, fd in self._captures:
            size = os.lseek(fd, 0, os.SEEK_CUR)
            if size:
                text = os.pread(fd, size, 0).decode("utf-8", "backslashreplace")
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                now = time.time()
                records += [(now, name, line) for line in text.splitlines()]
        return records

    def write_records(self, records: list[Record]) -> None:
        """Format `records` and write them to the sink with one call (lock held)."""
        self.records, self.buffered = [], 0
        head = f" {self.name} {self.request_id} "
        lines = []
        for moment, stream, text in records:
            second = int(moment)
            if second != self._second:
                self._second = second
                self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            lines.append(f"{self._prefix}.{int((moment - second) * 1000):03d}Z{head}{stream} {text}\n")
        try:
            self.sink.write("".join(lines).encode("utf-8", "backslashreplace"))
        except OSError:
            pass  # A full disk must not fail the request; the lines are lost.

    def _capture(self) -> None:
        for name, target in (("out", 1), ("err", 2)):
            fd = os.memfd_create(f"cn-{name}", os.MFD_CLOEXEC)
            os.dup2(fd, target)
            self._captures.append((name, fd))

    def _after_fork(self) -> None:
        # Another thread may have held the lock when this thread forked: the child has no such thread.
        self.lock = threading.RLock()


def open_log(spec: dict[str, Any], name: str) -> ProcessLog | None:
    """The log of a process named `name` that the launch spec asks for, installed; None if it names no log_dir."""
    max_bytes = spec.get("log_max_bytes", DEFAULT_MAX_BYTES)
    backups = spec.get("log_backups", DEFAULT_BACKUPS)
    for key, value, least in (("log_max_bytes", max_bytes, 1), ("log_backups", backups, 0)):
        if type(value) is not int or value < least:
            raise LoadError(f"The launch spec has {key} {value!r}; it must be an integer >= {least}.", EXIT_BAD_SPEC)
    directory = spec.get("log_dir")
    if directory is None:
        return None
    if not isinstance(directory, str):
        raise LoadError(f"The launch spec has log_dir {directory!r}; it must be a directory path.", EXIT_BAD_SPEC)
    try:
        sink = LogFile(log_file(directory, name), max_bytes=max_bytes, backups=backups)
    except OSError as exc:
        message = f"Cannot open the log file in {directory!r}: {exc.strerror}. The backend must create the directory."
        raise LoadError(message, EXIT_BAD_SPEC) from exc
    log = ProcessLog(sink, name)
    log.install()
    return log


def log_file(directory: str, name: str) -> str:
    """The path of the log file of the process named `name` (an instance ID, or a zygote's log name)."""
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise LoadError(f"{name!r} cannot name a log file; instance IDs must be plain file names.", EXIT_BAD_SPEC)
    return os.path.join(directory, f"{name}.log")
