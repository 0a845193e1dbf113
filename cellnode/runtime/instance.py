"""The serving loop of an instance: `python -u -m cellnode.runtime SPEC_PATH`.

Standard library and cloudpickle only: this module runs inside instances.

The local backend forks instances from a zygote (`cellnode.runtime.zygote`), which hands `InstanceServer` a socket it
has already bound. Run alone, as here, the instance loads its checkpoint, then binds its Unix socket, so a successful
connect means it is ready. The local backend runs instances this way ("standalone") for a node whose zygote is not
safe to fork, or whose launch spec says `"fork": false`. One thread serves every connection through a selector, one
frame at a time: the front keeps one persistent connection and a health check may open another. Signals: SIGINT
interrupts a running cell (and is ignored between requests); SIGTERM lets the current request finish, then closes the
socket, removes its file and exits 0, without waiting for threads the checkpoint started. An instance whose parent
process dies (the server, or the zygote it was forked from) exits the same way, so that no instance outlives its
server.

Besides the checkpoint, the launch spec may hold:
- `"state"`, the state policy (`cellnode.runtime.executor`);
- `"log_dir"`, `"log_max_bytes"` and `"log_backups"`: with a `log_dir`, the instance writes its output as log records
  to `<log_dir>/<instance_id>.log` (`cellnode.runtime.logs`); without one, to its stdout and stderr as they are;
- `"parent_pid"`, the process whose end the instance outlives by a second at most (its parent when it started, by
  default); the backend sets it, so that a server that dies while the instance loads is noticed too;
- `"fork"`, read by the local backend only: `false` (default `true`) starts each instance of the node standalone,
  with no zygote.

Exit codes: 0 after SIGTERM, 2 for a bad spec or socket, 3 for a corrupt blob, 4 when the checkpoint cannot be
loaded (a missing module, a cell that does not compile); the reason is the last line on stderr (the last record of the
log file once it is open).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import types
from typing import Any, NoReturn

from cellnode.runtime.executor import Executor, encode_message, read_state
from cellnode.runtime.loader import EXIT_BAD_SPEC, LoadError, load
from cellnode.runtime.logs import ProcessLog, open_log
from cellnode.runtime.protocol import (
    EXECUTE,
    EXECUTE_ID,
    FAILURE,
    PING,
    PONG,
    recv_frame,
    send_frame,
    split_request_id,
)

BAD_REQUEST_ID = encode_message(
    "The EXECUTE_ID payload does not start with a request ID (1 to 32 of [A-Za-z0-9_-]) and a newline; the front "
    "sent a bad frame."
)
USAGE = (
    "Usage: python -m cellnode.runtime SPEC_PATH (the launch spec JSON written by the backend), "
    "or python -m cellnode.runtime --zygote SPEC_PATH."
)
# sockaddr_un.sun_path holds 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
FRAME_TIMEOUT = 60.0
# How often an idle instance checks that the process that started it is still there.
PARENT_CHECK_INTERVAL = 1.0

_LISTENER = "listener"
_WAKEUP = "wakeup"


class InstanceServer:
    """Serves EXECUTE and PING frames on a Unix socket until SIGTERM; binds `socket_path` unless given `listener`.

    It exits too once its parent is no longer `parent_pid` (by default the parent it has now).
    """

    def __init__(
        self,
        socket_path: str,
        executor: Executor,
        *,
        listener: socket.socket | None = None,
        parent_pid: int | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.executor = executor
        self.listener = listener
        self.should_exit = False
        self.parent_pid = os.getppid() if parent_pid is None else parent_pid

    def handle_sigterm(self, signum: int, frame: types.FrameType | None) -> None:
        """Ask the loop to stop after the frame it is handling; the wakeup fd breaks a blocked select."""
        self.should_exit = True

    def serve(self) -> int:
        """Bind the socket and serve until SIGTERM; the process exit code."""
        listener = self.listener if self.listener is not None else bind_socket(self.socket_path)
        wakeup_r, wakeup_w = socket.socketpair()
        wakeup_r.setblocking(False)
        wakeup_w.setblocking(False)
        selector = selectors.DefaultSelector()
        log = self.executor.log
        try:
            signal.signal(signal.SIGINT, self.executor.handle_sigint)
            signal.signal(signal.SIGTERM, self.handle_sigterm)
            signal.set_wakeup_fd(wakeup_w.fileno(), warn_on_full_buffer=False)
            selector.register(listener, selectors.EVENT_READ, _LISTENER)
            selector.register(wakeup_r, selectors.EVENT_READ, _WAKEUP)
            while not self.should_exit:
                events = selector.select(PARENT_CHECK_INTERVAL)
                if not events and log is not None:
                    log.flush()  # Idle: what processes the cell started wrote to descriptors 1 and 2.
                if not events and os.getppid() != self.parent_pid:
                    # Reparented while idle: the server died without stopping us (we run in a session of our own).
                    print(
                        f"The process that started this instance ({self.parent_pid}) is gone; exiting.", file=sys.stderr
                    )
                    break
                for key, _ in events:
                    if key.data is _LISTENER:
                        self._accept(listener, selector)
                    elif key.data is _WAKEUP:
                        drain(wakeup_r)
                    else:
                        self._handle(key.fileobj, selector)  # type: ignore[arg-type]
                    if self.should_exit:
                        break
        finally:
            signal.set_wakeup_fd(-1)
            for key in list(selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            selector.close()
            wakeup_w.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        return 0

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        # Frames are read whole once they start: a peer stalling mid-frame must not hold the instance forever.
        conn.settimeout(FRAME_TIMEOUT)
        selector.register(conn, selectors.EVENT_READ, conn)

    def _handle(self, conn: socket.socket, selector: selectors.BaseSelector) -> None:
        try:
            frame = recv_frame(conn)
            if frame is not None:
                kind, payload = frame
                if kind == EXECUTE_ID or kind == EXECUTE:
                    try:
                        if kind == EXECUTE:
                            answer = self.executor.execute(payload)
                        elif request := split_request_id(payload):
                            answer = self.executor.execute(request[1], request[0])
                        else:
                            answer = (FAILURE, BAD_REQUEST_ID)
                        send_frame(conn, *answer)
                    finally:
                        self.executor.finish()  # Its log lines, once the answer is on its way.
                    return
                if kind == PING:
                    answer = (PONG, b"")
                else:
                    message = f"Unknown frame kind {kind!r}; this instance understands EXECUTE, EXECUTE_ID and PING."
                    answer = (FAILURE, encode_message(message))
                send_frame(conn, *answer)
                return
        except OSError:  # ProtocolError included: a peer that breaks a frame loses its connection.
            pass
        selector.unregister(conn)
        conn.close()


def main(argv: list[str]) -> int:
    """Run one instance from the launch spec at `argv[0]`; the process exit code."""
    if len(argv) != 1:
        print(USAGE, file=sys.stderr)
        return EXIT_BAD_SPEC
    started = time.monotonic()
    before = set(threading.enumerate())
    log = None
    try:
        spec = read_spec(argv[0], "socket", str)
        parent_pid = spec.get("parent_pid")
        if parent_pid is not None and type(parent_pid) is not int:
            raise LoadError(f"The launch spec has parent_pid {parent_pid!r}; it must be a process ID.", EXIT_BAD_SPEC)
        log = open_log(spec, str(spec.get("instance_id")))
        state = read_state(spec)
        ns, code = load(spec)
    except LoadError as exc:
        print(exc.message, file=sys.stderr)
        return leave(exc.exit_code, log, before)
    executor = Executor(ns, code, spec.get("outputs", {}), state=state, log=log)
    count = len(spec.get("variables", []))
    print(
        f"Instance {spec.get('instance_id')!r} of node {spec.get('node_id')!r} loaded {count} "
        f"variable{'' if count == 1 else 's'} in {time.monotonic() - started:.2f} s; serving on {spec['socket']} "
        f"(state policy {state!r}).",
        file=sys.stderr,
    )
    try:
        exit_code = InstanceServer(spec["socket"], executor, parent_pid=parent_pid).serve()
    except LoadError as exc:
        print(exc.message, file=sys.stderr)
        return leave(exc.exit_code, log, before)
    return leave(exit_code, log, before)


def read_spec(path: str, key: str, kind: type) -> dict[str, Any]:
    """The JSON object at `path`, which must hold `key` of type `kind`; LoadError (exit 2) otherwise."""
    try:
        with open(path, encoding="utf-8") as file:
            spec = json.load(file)
    except (OSError, ValueError) as exc:
        message = f"The launch spec {path!r} cannot be read: {exc}. Start the instance through a backend."
        raise LoadError(message, EXIT_BAD_SPEC) from exc
    if not isinstance(spec, dict) or not isinstance(spec.get(key), kind):
        raise LoadError(f"The launch spec {path!r} has no {key!r}; the backend must write one.", EXIT_BAD_SPEC)
    return spec


def bind_socket(path: str) -> socket.socket:
    """A non-blocking Unix socket listening at `path`, mode 0600; LoadError (exit 2) if it cannot be bound."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise LoadError(
            f"Socket path {path!r} is longer than {MAX_SOCKET_PATH} bytes; use a shorter runtime directory.",
            EXIT_BAD_SPEC,
        )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError as exc:
        listener.close()
        raise LoadError(f"Cannot bind socket {path!r}: {exc.strerror}. Remove the stale file.", EXIT_BAD_SPEC) from exc
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    listener.listen(16)
    listener.setblocking(False)
    return listener


def leave(code: int, log: ProcessLog | None, before: set[threading.Thread]) -> int:
    """`code`, for `main` to return; but if the checkpoint started non-daemon threads (any not in `before`), exit
    with it at once (`exit_process`): the interpreter would wait for them before it exits, maybe forever."""
    if any(t.is_alive() and not t.daemon and t not in before for t in threading.enumerate()):
        exit_process(code, log)
    return code


def exit_process(code: int, log: ProcessLog | None) -> NoReturn:
    """Write what is buffered, then exit with `code` at once: no atexit handlers, no wait for other threads."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
        if log is not None:
            log.close()
    os._exit(code)


def drain(wakeup: socket.socket) -> None:
    """Read everything a non-blocking signal wakeup socket holds."""
    try:
        while wakeup.recv(512):
            pass
    except (BlockingIOError, InterruptedError):
        pass
