"""The `fork` state policy: each request runs in a child forked from the instance, which answers and exits.

Standard library only: this module runs inside instances.

The instance moves what it holds into the collector's permanent generation (`gc.freeze()`, so that collections in
the child do not write to it), opens a pipe and forks. The child binds the inputs, runs the cell, checks the outputs,
sends its log records (LOG frames) and then its answer frame over the pipe, and leaves with `os._exit`: whatever the
cell changed, in the namespace or inside objects, goes with it. The instance relays the log records to its log file
and returns the answer.

A SIGINT the instance gets (the front's interrupt, on a timeout) is passed on to the child, or, if it comes while the
child is being forked, sent as soon as the child's pid is known; the child answers INTERRUPTED. A child that ends
without answering (`os._exit` in the cell, a segfault, the OOM killer) makes a CELL_ERROR that says how it ended, and
the instance goes on serving. The child stays in the instance's process group, so the backend's kill ends it too.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import sys
import traceback
from typing import Any, NoReturn

from cellnode.runtime.executor import INTERRUPTED_ANSWER, Answer, Executor, encode_message
from cellnode.runtime.protocol import CELL_ERROR, FAILURE, HEADER, LOG, encode

CHILD_DIED = (
    "The process that ran the cell {how} before it answered (the node's state policy is 'fork', so each request runs "
    "in a process of its own); the instance goes on serving."
)
CANNOT_FORK = (
    "The instance cannot fork a process for the request: {error}. Free memory or raise ulimit -u, or choose the "
    "'isolated' state policy."
)
_CHUNK = 1 << 20
# Children that answered and may not have ended yet: the next request reaps them.
_exiting: list[int] = []


def run_in_child(executor: Executor, inputs: dict[str, Any]) -> Answer:
    """The answer of a child forked to run the request on `inputs`."""
    _reap()
    read_fd, write_fd = os.pipe()
    gc.freeze()
    executor.is_interrupt_pending = False
    executor.is_forking = True
    try:
        pid = os.fork()
    except OSError as exc:
        executor.is_forking = False
        os.close(read_fd)
        os.close(write_fd)
        return FAILURE, encode_message(CANNOT_FORK.format(error=exc.strerror))
    if pid == 0:
        os.close(read_fd)
        _serve_child(executor, inputs, write_fd)
    os.close(write_fd)
    executor.child_pid = pid
    executor.is_forking = False
    if executor.is_interrupt_pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    try:
        return _wait(executor, pid, read_fd)
    finally:
        executor.child_pid = 0
        os.close(read_fd)


def _serve_child(executor: Executor, inputs: dict[str, Any], fd: int) -> NoReturn:
    code = 0
    try:
        signal.set_wakeup_fd(-1)  # The instance's wakeup socket is the instance's business.
        log = executor.log
        if log is not None:
            log.sink = _PipeSink(fd)
        answer = _run(executor, inputs)
        if log is not None:
            log.end()
        else:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
        _send(fd, *answer)
    except BaseException:
        code = 1
        with contextlib.suppress(BaseException):
            message = f"The process that ran the request failed: {traceback.format_exc()}"
            _send(fd, FAILURE, json.dumps({"message": message}).encode())
    finally:
        os._exit(code)


def _run(executor: Executor, inputs: dict[str, Any]) -> Answer:
    try:
        # From here on SIGINT interrupts the cell; one that came while the child was being forked is pending.
        executor.is_executing = True
        executor.is_forking = False
        if executor.is_interrupt_pending:
            raise KeyboardInterrupt
        return executor.run(inputs)
    except KeyboardInterrupt:
        return INTERRUPTED_ANSWER
    finally:
        executor.is_executing = False


def _wait(executor: Executor, pid: int, fd: int) -> Answer:
    """Relay the child's LOG frames until its answer, or a CELL_ERROR once it has ended without one.

    A child that answered is reaped later: the kernel tears its address space down before the pipe's end closes, and
    the request need not wait for that.
    """
    buffer = bytearray()
    pidfd = os.pidfd_open(pid)
    try:
        is_open = True
        while is_open:
            ready, _, _ = select.select([fd, pidfd], [], [])
            if fd in ready:
                chunk = os.read(fd, _CHUNK)
                is_open = bool(chunk)
                buffer += chunk
            else:
                # The child is gone, but a process it started may hold the pipe open: read what is there.
                os.set_blocking(fd, False)
                with contextlib.suppress(BlockingIOError):
                    while chunk := os.read(fd, _CHUNK):
                        buffer += chunk
                is_open = False
            answer = _take_frames(executor, buffer)
            if answer is not None:
                _exiting.append(pid)
                return answer
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    code = os.waitstatus_to_exitcode(status)
    how = f"exited with code {code}"
    if code < 0:
        try:
            how = f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    message = CHILD_DIED.format(how=how)
    print(message, file=sys.stderr)
    return CELL_ERROR, json.dumps({"error_name": "WorkerDied", "error_message": message, "traceback": []}).encode()


def _reap() -> None:
    """Reap the children that answered and have ended since."""
    for pid in list(_exiting):
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                continue
        _exiting.remove(pid)


def _take_frames(executor: Executor, buffer: bytearray) -> Answer | None:
    answer = None
    while len(buffer) >= HEADER.size:
        length, kind = HEADER.unpack_from(buffer)
        end = HEADER.size + length
        if len(buffer) < end:
            break
        payload = bytes(buffer[HEADER.size : end])
        del buffer[:end]
        if kind != LOG:
            answer = (kind, payload)
        elif executor.log is not None:
            with contextlib.suppress(OSError):
                executor.log.sink.write(payload)
    return answer


def _send(fd: int, kind: int, payload: bytes) -> None:
    view = memoryview(encode(kind, payload))
    while view:
        view = view[os.write(fd, view) :]


class _PipeSink:
    """The child's log sink: its records go to the instance as LOG frames."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        _send(self.fd, LOG, data)

    def close(self) -> None:
        pass
