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

The zygote stays single-threaded, so fork is safe. It reaps its children and reports each exit as EXITED. When its
control connection closes (the backend released it, or the server died) or its parent is gone, it kills its
instances and exits 0. On SIGTERM it passes SIGTERM to its instances, waits for them, and exits 0. An instance
whose zygote is gone exits within a second (the parent check of `InstanceServer`).
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
import time
import traceback
import types
from typing import Any, NoReturn

from cellnode.runtime.executor import Executor, read_state
from cellnode.runtime.instance import PARENT_CHECK_INTERVAL, InstanceServer, bind_socket, drain, read_spec
from cellnode.runtime.loader import EXIT_BAD_SPEC, LoadError, load
from cellnode.runtime.logs import LogFile, log_file, open_log
from cellnode.runtime.protocol import EXITED, FAILURE, FORK, FORKED, READY, recv_frame, send_frame

USAGE = "Usage: python -m cellnode.runtime --zygote SPEC_PATH (the zygote spec JSON written by the local backend)."
CONTROL_TIMEOUT = 60.0
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
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
                if log is not None:
                    log.close()
            os._exit(code)

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
    try:
        spec = read_spec(argv[0], "control_fd", int)
        control = _control_socket(spec["control_fd"])
        log = open_log(spec, str(spec.get("log_name", "zygote")))
        state = read_state(spec)
        ns, code = load(spec)
    except LoadError as exc:
        print(exc.message, file=sys.stderr)
        return exc.exit_code
    executor = Executor(ns, code, spec.get("outputs", {}), state=state, log=log)
    node_id = str(spec.get("node_id"))
    gc.collect()
    gc.freeze()
    seconds = time.monotonic() - started
    count = len(spec.get("variables", []))
    _name_process("cn-zygote")
    print(
        f"Zygote of node {node_id!r} loaded {count} variable{'' if count == 1 else 's'} in {seconds:.2f} s; "
        f"forking instances on request (pid {os.getpid()}, state policy {state!r}).",
        file=sys.stderr,
    )
    try:
        send_frame(control, READY, _encode({"pid": os.getpid(), "seconds": round(seconds, 3)}))
    except OSError:
        return 0  # The backend is already gone.
    return Zygote(control, executor, node_id).serve()


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


def _name_process(name: str) -> None:
    """Show `name` in ps and top (the command line stays the zygote's)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)


def _ignore(signum: int, frame: types.FrameType | None) -> None:
    pass
