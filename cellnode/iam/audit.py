"""The audit log: every management action and every denied request, kept append-only in `audit_events`.

Recording must not slow a request down, so `AuditLog.record()` only puts a row on an in-memory queue, from the event
loop, without waiting. One writer thread takes whatever has gathered and inserts it in one transaction per batch, so a
burst of requests costs a few inserts, not one commit each. `close()`, at server shutdown (after the last request has
been answered), writes everything still queued: a SIGTERM loses nothing. A SIGKILL or a power cut loses the rows still
queued, which is what was recorded in the last moments before it.

The queue is bounded (`MAX_QUEUED`). If the database cannot keep up and it fills, a new row is dropped rather than the
event loop blocked; every drop is counted (`dropped`) and logged as an error (at most every `REPORT_SECONDS`, so that
a flood of drops is not also a flood of log lines), and `close()` logs the total. A batch the database refuses is tried
`WRITE_ATTEMPTS` times before its rows are dropped the same way.

A row never holds a secret: no request or response body (the writer is given no body; of a change's answer, the
middleware reads only the `id` and `folder_id` fields), no Authorization header, no query string but the folder a
request names. `describe()` names the action and resource from the route's path template, never from the raw URL:

    describe("POST", "/cellnode/v1/nodes/{ref}:suspend", {"ref": "churn"})  # Target("nodes.suspend", "node/churn", ...)
    audit.record(action="nodes.suspend", code=200, resource="node/churn", caller=caller, client="127.0.0.1")
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from sqlalchemy import insert, or_, select
from sqlalchemy.orm import Session

from cellnode.iam.access import subject
from cellnode.iam.credentials import Caller
from cellnode.store.db import Database
from cellnode.store.models import AuditEvent, Folder, utcnow

# Rows waiting for the writer; past this, new ones are dropped (and counted) so that a request never waits.
MAX_QUEUED = 100_000
BATCH = 1000  # rows per transaction, at most
WRITE_ATTEMPTS = 3
RETRY_SECONDS = 1.0
FLUSH_SECONDS = 5.0  # how long a reader waits for the rows recorded before it
CLOSE_SECONDS = 30.0
REPORT_SECONDS = 10.0  # between two error lines about dropped rows
CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DENIED = frozenset({401, 403})
# The columns' sizes (migration 0009): a longer value is cut, never refused.
SIZES = {"subject": 64, "action": 64, "resource": 255, "client": 64, "request_id": 32}
FOLDER_ID_LENGTH = 20
VERBS = {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}
API_PREFIX = re.compile(r"^/[a-z]+/v\d+/")  # /cellnode/v1/, /datasphere/v1/
DROPPED = (
    "Audit log: dropped {count} row(s) ({total} in all) because {reason}. The audit log is incomplete from here; "
    "check that the database is writable and not locked by another process."
)
logger = logging.getLogger("cellnode.audit")


class Target(NamedTuple):
    """What a request acts on, as the audit log names it."""

    action: str  # "nodes.suspend"
    resource: str  # "node/churn"; "" for a collection
    noun: str  # the kind of thing acted on ("node"): a create's resource is `noun/<the new ID>`
    folder: str | None  # the folder the path names (`/folders/{id}/...`), if any
    is_create: bool  # a POST to a collection: the answer names the new resource


def result_of(code: int) -> str:
    """`ok` (below 400), `denied` (401, 403) or `failed` (any other error)."""
    if code < 400:
        return "ok"
    return "denied" if code in DENIED else "failed"


def describe(method: str, template: str, params: Mapping[str, Any]) -> Target:
    """The action and resource of a request, from its route's path template and path parameters.

    The action is the template's literal segments and a verb: the custom one (`:suspend`), else one from the method
    (POST `create`, PUT/PATCH `update`, DELETE `delete`, GET `get` or, on a collection, `list`). The resource is each
    literal followed by a parameter, in the singular, with the parameter's value: `folder/F/access-binding/B`.
    """
    words: list[str] = []
    resource: list[str] = []
    verb = ""
    folder: str | None = None
    noun = ""
    for segment in API_PREFIX.sub("", template).split("/"):
        if not segment:
            continue
        if segment.startswith("{"):
            name, _, rest = segment[1:].partition("}")
            value = str(params.get(name.partition(":")[0], ""))
            if noun:
                resource.append(f"{noun}/{value}")
            if noun == "folder" and folder is None:
                folder = value
            verb = rest[1:] if rest.startswith(":") else verb
            continue
        word, _, custom = segment.partition(":")
        word = word.rsplit(".", 1)[0]  # openapi.json
        words.append(word.replace("-", "_"))
        noun = _singular(word)
        verb = custom or verb
    is_create = method == "POST" and not verb and not template.endswith("}")
    if not verb and method == "GET":
        verb = "get" if "{" in template else "list"
    elif not verb:
        verb = VERBS.get(method, method.lower())
    return Target(".".join([*words, verb]), "/".join(resource), noun, folder, is_create)


def _singular(word: str) -> str:
    if word.endswith("ies"):
        return word[:-3] + "y"
    return word.removesuffix("s")


class AuditLog:
    """Audit rows, queued without waiting and written in batches by one thread; `close()` writes what is left."""

    def __init__(self, db: Database, *, max_queued: int = MAX_QUEUED) -> None:
        self._db = db
        # Rows (dicts), flush markers (Events), and None to stop.
        self._queue: queue.Queue[dict[str, Any] | threading.Event | None] = queue.Queue(max_queued)
        self._closed = False
        self._drops = threading.Lock()
        self.dropped = 0
        self._unreported = 0
        self._reported_at = float("-inf")
        self.written = 0
        self._writer = threading.Thread(target=self._run, name="cellnode-audit", daemon=True)
        self._writer.start()

    def record(
        self,
        *,
        action: str,
        code: int,
        resource: str = "",
        folder: str | None = None,
        caller: Caller | None = None,
        client: str = "",
        request_id: str = "",
        result: str | None = None,
    ) -> None:
        """Queue one row; never waits. `folder` may be a folder's ID or name (the writer turns a name into its ID);
        `result` is `result_of(code)` unless given (a 429 to a client throttled for failed authentications is
        `denied`)."""
        row: dict[str, Any] = {
            "at": utcnow(),
            "principal_id": caller.principal_id if caller is not None else None,
            "subject": (subject(caller) if caller is not None else "")[: SIZES["subject"]],
            "action": action[: SIZES["action"]],
            "resource": resource[: SIZES["resource"]],
            "folder_id": folder or None,
            "result": result or result_of(code),
            "code": code,
            "client": client[: SIZES["client"]],
            "request_id": request_id[: SIZES["request_id"]],
        }
        if self._closed:
            self._drop(1, "it came after the audit log was closed")
            return
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._drop(1, f"{self._queue.maxsize} rows were already waiting for the database")

    def flush(self, timeout: float = FLUSH_SECONDS) -> bool:
        """Wait (in a worker thread) until the rows recorded so far are written; False if that took over `timeout`."""
        if self._closed:
            return True
        marker = threading.Event()
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.wait(timeout)

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Write every queued row, then stop the writer (at shutdown, after the last request)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(None, timeout=timeout)  # Waits while the queue is full: the writer is emptying it.
        except queue.Full:
            pass  # Reported below: the writer is stuck.
        self._writer.join(timeout)
        if self._writer.is_alive():
            logger.error("Audit log: the writer did not finish in %.0f s; rows still queued are lost.", timeout)
        elif self.dropped:
            logger.error("Audit log: %d row(s) were dropped while the server ran; see the errors above.", self.dropped)

    def _drop(self, count: int, reason: str) -> None:
        with self._drops:
            self.dropped += count
            self._unreported += count
            now = time.monotonic()
            if now - self._reported_at < REPORT_SECONDS:
                return
            self._reported_at, unreported, self._unreported = now, self._unreported, 0
            total = self.dropped
        logger.error(DROPPED.format(count=unreported, total=total, reason=reason))

    def _run(self) -> None:
        stopping = False
        while not stopping:
            items = [self._queue.get()]
            while len(items) < BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [item for item in items if isinstance(item, dict)]
            if rows:
                self._write(rows)
            for item in items:
                if isinstance(item, threading.Event):
                    item.set()
            stopping = None in items
        # Rows queued after the stop marker (a request that raced the shutdown) are written too.
        rest: list[dict[str, Any]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, dict):
                rest.append(item)
            elif isinstance(item, threading.Event):
                item.set()
        if rest:
            self._write(rest)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self._db.session() as session:
                    _resolve_folders(session, rows)
                    session.execute(insert(AuditEvent), rows)
                self.written += len(rows)
                return
            # Any error: this thread must outlive it, and the operator must hear of it.
            except Exception:
                logger.exception(
                    "Audit log: writing %d row(s) failed (try %d of %d).", len(rows), attempt, WRITE_ATTEMPTS
                )
                if attempt < WRITE_ATTEMPTS:
                    time.sleep(RETRY_SECONDS)
        self._drop(len(rows), f"the database refused them {WRITE_ATTEMPTS} times")


def _resolve_folders(session: Session, rows: list[dict[str, Any]]) -> None:
    """Folder names become IDs; a reference that is neither a known ID nor a name is kept if it could be an ID (of a
    folder since deleted), else left out."""
    refs = {row["folder_id"] for row in rows if row["folder_id"]}
    if not refs:
        return
    pairs = [
        (folder_id, name)
        for folder_id, name in session.execute(
            select(Folder.id, Folder.name).where(or_(Folder.id.in_(refs), Folder.name.in_(refs)))
        )
    ]
    # An ID wins over a name that happens to equal it.
    ids = {name: folder_id for folder_id, name in pairs} | {folder_id: folder_id for folder_id, _name in pairs}
    for row in rows:
        ref = row["folder_id"]
        if ref:
            row["folder_id"] = ids.get(ref, ref if len(ref) <= FOLDER_ID_LENGTH else None)
