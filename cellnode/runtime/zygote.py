"""The zygote of a cell node: `python -u -m cellnode.runtime --zygote SPEC_PATH`.

Standard library and cloudpickle only: this module runs where instances run.

The zygote loads the checkpoint once, exactly as a lone instance does (the same sha256 checks, the same exit codes
and one clear stderr line), compiles the cell, and moves everything it holds into the collector's permanent
generation (`gc.freeze()`), so that collections in the instances never write to those objects and un-share their
pages. Only then does it send READY on its control connection: one end of a socket pair whose other end the backend
holds (the spec's "control_fd"). It forks one serving instance per FORK frame; the instances share the loaded state
copy-on-write. `cellnode.runtime.protocol` lists the frames.

The zygote binds each instance's socket before it forks, so a bind error is a FAILURE answer and the socket accepts
connections as soon as FORKED is sent. The child leads a session of its own (`kill()` of its process group also
ends what the cell started), gets back default signal dispositions for SIGCHLD and SIGTERM, keeps SIGINT ignored
until `InstanceServer` sets its handler, closes every descriptor of the zygote's but its log, and serves.

With a `"log_dir"` in the spec, the zygote writes its log records to `<log_dir>/<log_name>.log` (the spec's
`"log_name"`, `zygote` by default) and each instance to `<log_dir>/<instance_id>.log` (`cellnode.runtime.logs`).

Fork is safe only in a process that runs one thread and has not initialised CUDA: a child gets a copy of the memory
but only the forking thread, so a lock another thread held stays locked in it forever. The zygote runs no thread of
its own, but the checkpoint's load may start some (a library's thread pool, an object whose `__setstate__` starts a
thread, torch with CUDA). After the load the zygote counts the threads of the process (`/proc/self/task`, which
also lists native threads) and asks torch, if the load imported it, whether CUDA is initialised. If either is so,
it logs why, sends READY with `"fork_safe": false` and that reason, and exits 0 at once (its threads would keep it
otherwise): the backend then starts the node's instances standalone, each loading the checkpoint itself.

A fork-safe zygote reaps its children and reports each exit as EXITED. When its control connection closes (the
backend released it, or the server died) or its parent is gone, it kills its instances and exits 0. On SIGTERM it
passes SIGTERM to its instances, waits for them, and exits 0. An instance whose zygote is gone exits within a second
(the parent check of `InstanceServer`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
import types
from typing import Any, NoReturn

from cellnode.runtime.executor import Executor, read_state
from cellnode.runtime.instance import (
    PARENT_CHECK_INTERVAL,
    InstanceServer,
    bind_socket,
    drain,
    exit_process,
    leave,
    read_spec,
)
from cellnode.runtime.loader import EXIT_BAD_SPEC, LoadError, load
from cellnode.runtime.logs import LogFile, log_file, open_log
from cellnode.runtime.protocol import EXITED, FAILURE, FORK, FORKED, READY, recv_frame, send_frame

USAGE = "Usage: python -m cellnode.runtime --zygote SPEC_PATH (the zygote spec JSON written by the local backend)."
CONTROL_TIMEOUT = 60.0
# How many threads a fork-safety reason names; it counts them all.
NAMED_THREADS = 5
NOT_FORK_SAFE = (
    "Zygote of node {node_id!r} cannot fork safely: {reason}. Its instances start as standalone processes instead, "
    "each loading the checkpoint itself; to share one loaded copy again, start threads and CUDA in the cell, not "
    "while the checkpoint loads."
)
_CONTROL = "control"
_WAKEUP = "wakeup"

_encoder = json.JSONEncoder(separators=(",", ":"))


def _encode(value: dict[str, Any]) -> bytes:
    return _encoder.encode(value).encode()


class Zygote:
    """Forks instances on FORK frames from its control connection, reaps them, and reports their exits."""

    def __init__(self, control: socket.socket, executor: Executor, node_id: str) -> None:
        self.control = control
        self.executor = executor
        self.node_id = node_id
        self.children: set[int] = set()
        self.is_draining = False
        self.parent_pid = os.getppid()
        self._selector = selectors.DefaultSelector()
        self._wakeup_r, self._wakeup_w = socket.socketpair()

    def handle_sigterm(self, signum: int, frame: types.FrameType | None) -> None:
        """Stop forking; the loop passes SIGTERM on to the instances and exits once they are gone."""
        self.is_draining = True

    def serve(self) -> int:
        """Answer FORK frames until the control connection closes, the parent dies or SIGTERM; the exit code."""
        for end in (self._wakeup_r, self._wakeup_w):
            end.setblocking(False)
        signal.signal(signal.SIGTERM, self.handle_sigterm)
        # A handler that does nothing: the wakeup fd is what breaks the select when a child ends.
        signal.signal(signal.SIGCHLD, _ignore)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        self._selector.register(self.control, selectors.EVENT_READ, _CONTROL)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, _WAKEUP)
        is_connected, is_terminating = True, False
        try:
            while True:
                for key, _ in self._selector.select(PARENT_CHECK_INTERVAL):
                    if key.data is _WAKEUP:
                        drain(self._wakeup_r)
                    elif not self._handle_control():
                        is_connected = False
                self._reap()
                if self.executor.log is not None:
                    self.executor.log.flush()
                if not is_connected or os.getppid() != self.parent_pid:
                    if self.children:
                        print(
                            f"Zygote of node {self.node_id!r}: the server is gone; killing its instances.",
                            file=sys.stderr,
                        )
                    self._kill_children()
                    return 0
                if self.is_draining:
                    if not is_terminating:
                        self._signal_children(signal.SIGTERM)
                        is_terminating = True
                    if not self.children:
                        return 0
        finally:
            signal.set_wakeup_fd(-1)
            self._close()

    def _handle_control(self) -> bool:
        """Answer one frame; False once the backend has closed the connection."""
        try:
            frame = recv_frame(self.control)
        except OSError:  # ProtocolError included.
            frame = None
        if frame is None:
            return False
        kind, payload = frame
        if kind == FORK:
            answer = self._fork(payload)
        else:
            answer = _failure(f"Unknown frame kind {kind!r}; a zygote understands FORK only.", EXIT_BAD_SPEC)
        self._send(*answer)
        return True

    def _fork(self, payload: bytes) -> tuple[int, bytes]:
        try:
            request = json.loads(payload)
            instance_id, path = str(request["instance_id"]), request["socket"]
            assert isinstance(path, str), "socket must be a path"
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            return _failure(f"The FORK payload is not valid ({exc}); the backend sent a bad frame.", EXIT_BAD_SPEC)
        if self.is_draining:
            return _failure(f"The zygote of node {self.node_id!r} is stopping (SIGTERM); start a new one.", 1)
        log = self.executor.log
        try:
            log_path = ""
            if log is not None and isinstance(log.sink, LogFile):
                log_path = log_file(os.path.dirname(log.sink.path), instance_id)
            listener = bind_socket(path)
        except LoadError as exc:
            return _failure(exc.message, exc.exit_code)
        if log is not None:
            log.flush(partial=True)  # The child must not inherit lines to write again.
        started = time.monotonic()
        gc.freeze()  # What the zygote made since the last fork: a collection in the child must not touch it either.
        try:
            pid = os.fork()
        except OSError as exc:
            listener.close()
            os.unlink(path)
            message = (
                f"The zygote of node {self.node_id!r} cannot fork: {exc.strerror}. Free memory or raise ulimit -u."
            )
            return _failure(message, 1)
        if pid == 0:
            self._become_instance(listener, instance_id, path, started, log_path)
        listener.close()
        self.children.add(pid)
        return FORKED, _encode({"pid": pid})

    def _become_instance(
        self, listener: socket.socket, instance_id: str, path: str, started: float, log_path: str
    ) -> NoReturn:
        """The child's side of a fork: serve as an instance, then exit without returning into the zygote's loop."""
        code = 1
        log = self.executor.log
        try:
            if log is not None and isinstance(log.sink, LogFile):
                log.reopen(instance_id, LogFile(log_path, max_bytes=log.sink.max_bytes, backups=log.sink.backups))
            os.setsid()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._close()
            self.control.close()
            _name_process("cn-instance")
            print(
                f"Instance {instance_id!r} of node {self.node_id!r} forked from zygote {os.getppid()} in "
                f"{(time.monotonic() - started) * 1000:.1f} ms; serving on {path}.",
                file=sys.stderr,
            )
            code = InstanceServer(path, self.executor, listener=listener).serve()
        except BaseException:
            traceback.print_exc()
        finally:
            exit_process(code, log)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                self._send(EXITED, _encode({"pid": pid, "code": os.waitstatus_to_exitcode(status)}))

    def _signal_children(self, signum: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _kill_children(self) -> None:
        for pid in self.children:
            # Not yet reaped, so the pid is still this child's; its group also holds what its cell started.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        for pid in self.children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.children.clear()

    def _send(self, kind: int, payload: bytes) -> None:
        # A broken connection shows up as the end of the stream on the next read.
        with contextlib.suppress(OSError):
            send_frame(self.control, kind, payload)

    def _close(self) -> None:
        self._selector.close()
        self._wakeup_r.close()
        self._wakeup_w.close()


def main(argv: list[str]) -> int:
    """Run the zygote of the spec at `argv[0]`; the process exit code."""
    if len(argv) != 1:
        print(USAGE, file=sys.stderr)
        return EXIT_BAD_SPEC
    started = time.monotonic()
    before = set(threading.enumerate())
    log = None
    try:
        spec = read_spec(argv[0], "control_fd", int)
        control = _control_socket(spec["control_fd"])
        log = open_log(spec, str(spec.get("log_name", "zygote")))
        state = read_state(spec)
        ns, code = load(spec)
    except LoadError as exc:
        print(exc.message, file=sys.stderr)
        return leave(exc.exit_code, log, before)
    executor = Executor(ns, code, spec.get("outputs", {}), state=state, log=log)
    node_id = str(spec.get("node_id"))
    gc.collect()
    gc.freeze()
    seconds = time.monotonic() - started
    count = len(spec.get("variables", []))
    reason = fork_hazard()
    _name_process("cn-zygote")
    if reason:
        print(NOT_FORK_SAFE.format(node_id=node_id, reason=reason), file=sys.stderr)
    else:
        print(
            f"Zygote of node {node_id!r} loaded {count} variable{'' if count == 1 else 's'} in {seconds:.2f} s; "
            f"forking instances on request (pid {os.getpid()}, state policy {state!r}).",
            file=sys.stderr,
        )
    ready = {"pid": os.getpid(), "seconds": round(seconds, 3), "fork_safe": not reason, "reason": reason}
    try:
        send_frame(control, READY, _encode(ready))
    except OSError:
        return leave(0, log, before)  # The backend is already gone.
    if reason:
        exit_process(0, log)  # At once: a return would wait for the checkpoint's non-daemon threads.
    return Zygote(control, executor, node_id).serve()


def fork_hazard() -> str:
    """Why this process is not safe to fork (threads besides this one, CUDA initialised), or an empty string."""
    reasons = []
    try:
        tids = sorted(int(tid) for tid in os.listdir("/proc/self/task"))
    except OSError:
        tids = [thread.native_id or 0 for thread in threading.enumerate()]  # No procfs: Python's threads only.
    others = [tid for tid in tids if tid != threading.get_native_id()]
    python_names = {thread.native_id: thread.name for thread in threading.enumerate()}
    native = [tid for tid in others if tid not in python_names]
    if native and len(native) == len(others) and _openblas_pool_only(len(native)):
        others = []  # OpenBLAS's worker pool: it has fork handlers, and numpy starts it on import
    if others:
        names = [repr(python_names[tid]) if tid in python_names else f"native {_comm(tid)!r}" for tid in others]
        more = f" and {len(names) - NAMED_THREADS} more" if len(names) > NAMED_THREADS else ""
        reasons.append(
            f"the checkpoint started {len(others)} thread{'' if len(others) == 1 else 's'} while loading "
            f"({', '.join(names[:NAMED_THREADS])}{more})"
        )
    torch = sys.modules.get("torch")  # Never imported here: only a load that imported torch can have used CUDA.
    if torch is not None:
        try:
            is_cuda = bool(torch.cuda.is_initialized())
        except Exception:  # A torch without CUDA, or a module that only has the name.
            is_cuda = False
        if is_cuda:
            reasons.append("the checkpoint initialised CUDA while loading (torch.cuda.is_initialized() is True)")
    return "; and ".join(reasons)


def _openblas_pool_only(threads: int) -> bool:
    """Whether `threads` native threads can all be OpenBLAS's workers: OpenBLAS is loaded, starts at most
    OPENBLAS_NUM_THREADS - 1 of them (default: one per CPU, less this one), and no OpenMP runtime is loaded whose
    threads could be among them (libgomp, for one, does not survive a fork)."""
    try:
        with open("/proc/self/maps") as maps:
            loaded = maps.read().lower()
    except OSError:
        return False
    if "openblas" not in loaded or any(omp in loaded for omp in ("libgomp", "libiomp", "libomp")):
        return False
    try:
        pool = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count() or 1)
    except ValueError:
        return False
    return threads <= pool - 1


def _failure(message: str, code: int) -> tuple[int, bytes]:
    """A FAILURE answer to FORK, also logged: `code` is the exit code the backend gives the instance that never was."""
    print(message, file=sys.stderr)
    return FAILURE, _encode({"message": message, "code": code})


def _control_socket(fd: int) -> socket.socket:
    try:
        control = socket.socket(fileno=fd)
    except OSError as exc:
        message = f"Control descriptor {fd} is not an open socket ({exc.strerror}); start zygotes through the backend."
        raise LoadError(message, EXIT_BAD_SPEC) from exc
    control.set_inheritable(False)
    control.settimeout(CONTROL_TIMEOUT)
    return control


def _comm(tid: int) -> str:
    """The name the kernel shows for thread `tid` of this process."""
    try:
        with open(f"/proc/self/task/{tid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def _name_process(name: str) -> None:
    """Show `name` in ps and top (the command line stays the zygote's)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)


def _ignore(signum: int, frame: types.FrameType | None) -> None:
    pass
