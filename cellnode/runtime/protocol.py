"""The frames the front and an instance exchange over one persistent stream connection.

Standard library only: this module runs inside instances.

A frame is a 5-byte header, a big-endian unsigned 32-bit payload length and a one-byte kind, followed by the
payload. The front sends one request frame and waits for its one answer frame before it sends the next
(an instance runs one cell at a time). Payloads are UTF-8 JSON unless said otherwise.

front -> instance:
  EXECUTE     the input object, `{"name": value, ...}`, already checked against the declared input types
  EXECUTE_ID  the request ID (1 to 32 ASCII characters of `[A-Za-z0-9_-]`), a newline, then EXECUTE's payload: the
              same request, whose log lines carry that ID (EXECUTE's carry `-`); the answer is the same
  PING        empty; answered by PONG once the instance can execute

instance -> front:
  OK            the output object, `{"name": value, ...}`, already checked against the declared output types
  PONG          empty
  CELL_ERROR    `{"error_name": ..., "error_message": ..., "traceback": [...]}`: the cell raised
  OUTPUT_ERROR  `{"message": ...}`: an output is missing or of the wrong type; the message names it
  INTERRUPTED   `{"message": ...}`: the cell was interrupted (SIGINT, sent by the front on a timeout)
  FAILURE       `{"message": ...}`: the instance failed to handle the frame (a bug, not the cell's fault)

The same frames run the control connection between the backend and a zygote (`cellnode.runtime.zygote`), a socket
pair the backend creates when it starts the zygote:

Under the `fork` state policy an instance runs each request in a child process, which sends the instance, over a pipe,
LOG frames (formatted log records, UTF-8 lines, to append to the instance's log file) and then exactly one of the
answer frames above, and exits.

zygote -> backend:
  READY     `{"pid": ..., "seconds": ..., "fork_safe": ..., "reason": ...}`: the checkpoint is loaded and frozen; FORK
            requests may follow. With `"fork_safe": false` (the load started threads or initialised CUDA, which
            `"reason"` names) the zygote exits instead, and the backend starts the node's instances standalone
  FORKED    `{"pid": ...}`: the answer to FORK, the pid of the new instance
  FAILURE   `{"message": ..., "code": ...}`: the answer to a FORK that could not be done (a socket path that cannot
            be bound: code 2); `code` is the exit code the backend reports for the instance that never ran
  EXITED    `{"pid": ..., "code": ...}`: an instance forked from this zygote ended (code < 0: killed by that signal);
            sent at any time, but for a given pid always after its FORKED

backend -> zygote:
  FORK      `{"instance_id": ..., "socket": ...}`: fork an instance serving on that Unix socket path; the backend
            sends the next FORK only after the answer to this one
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct

HEADER = struct.Struct(">IB")
MAX_PAYLOAD = 64 * 1024 * 1024

EXECUTE = ord("E")
EXECUTE_ID = ord("Q")
PING = ord("P")
OK = ord("O")
PONG = ord("p")
CELL_ERROR = ord("X")
OUTPUT_ERROR = ord("V")
INTERRUPTED = ord("I")
FAILURE = ord("F")
READY = ord("R")
FORK = ord("K")
FORKED = ord("k")
EXITED = ord("Z")
LOG = ord("L")
REQUEST_ID = re.compile(rb"[A-Za-z0-9_-]{1,32}")


class ProtocolError(ConnectionError):
    """The peer sent something that is not a frame, or closed the connection mid-frame."""


def encode(kind: int, payload: bytes = b"", prefix: bytes = b"") -> bytes:
    """One frame as bytes; its payload is `prefix` then `payload` (joined here, so that they are copied once)."""
    if prefix:
        return b"".join((HEADER.pack(len(prefix) + len(payload), kind), prefix, payload))
    return HEADER.pack(len(payload), kind) + payload


def split_request_id(payload: bytes) -> tuple[str, bytes] | None:
    """The request ID and the input JSON of an EXECUTE_ID payload; None if the ID is missing or not valid."""
    request_id, newline, body = payload.partition(b"\n")
    if not newline or REQUEST_ID.fullmatch(request_id) is None:
        return None
    return request_id.decode("ascii"), body


def recv_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """Read one frame from a blocking socket; None when the peer closed the connection between frames."""
    header = _recv_exactly(sock, HEADER.size, allow_eof=True)
    if header is None:
        return None
    length, kind = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"Frame of {length} bytes is over the {MAX_PAYLOAD}-byte limit.")
    payload = _recv_exactly(sock, length, allow_eof=False) if length else b""
    assert payload is not None
    return kind, payload


def send_frame(sock: socket.socket, kind: int, payload: bytes = b"") -> None:
    """Write one frame to a blocking socket."""
    sock.sendall(encode(kind, payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one frame from an asyncio stream; ProtocolError if the stream ends first."""
    try:
        header = await reader.readexactly(HEADER.size)
        length, kind = HEADER.unpack(header)
        if length > MAX_PAYLOAD:
            raise ProtocolError(f"Frame of {length} bytes is over the {MAX_PAYLOAD}-byte limit.")
        payload = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("The instance closed the connection.") from exc
    return kind, payload


def _recv_exactly(sock: socket.socket, size: int, *, allow_eof: bool) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            if allow_eof and not chunks:
                return None
            raise ProtocolError("The peer closed the connection in the middle of a frame.")
        chunks += chunk
    return bytes(chunks)
