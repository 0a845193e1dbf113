"""Roles on folders, and the checks every route makes with them.

A principal holds a role on a folder through an access binding: `viewer` (read), `developer` (also create, change,
delete and call nodes, aliases and checkpoints; use secrets), `admin` (also manage access bindings, service accounts
and secrets). Each role includes the ones before it. A server admin (the account made at first start, and any other
made one) holds `admin` on every folder and alone manages folders and users.

The bindings are few and read on every request, so `Access` keeps them all in memory: a change made through this
server applies at once, and one made through another server sharing the database within `CACHE_SECONDS`. Checks
never query the database; `refresh()` (in a worker thread) or `refresh_async()` reloads a stale cache first.

    access.require(caller, folder_id, "developer", "create nodes")   # PermissionDenied naming what is missing
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Literal

from sqlalchemy import select

from cellnode.exceptions import PermissionDenied
from cellnode.iam.credentials import Caller
from cellnode.store.db import Database
from cellnode.store.models import AccessBinding, Principal

Role = Literal["viewer", "developer", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "developer", "admin")
RANK: dict[str, int] = {role: rank for rank, role in enumerate(ROLES, start=1)}
CACHE_SECONDS = 60.0


def subject(caller: Caller) -> str:
    """How a binding names the caller: `serviceAccount:ID` or `user:ID`."""
    return f"{caller.kind}:{caller.principal_id}"


class Access:
    """The access bindings and server admins, cached; the one place that decides who may do what."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._roles: dict[str, dict[str, int]] = {}  # principal -> folder -> rank
        self._admins: frozenset[str] = frozenset()
        self._loaded_at = float("-inf")

    def invalidate(self) -> None:
        """Read the bindings again at the next check (after a change)."""
        self._loaded_at = float("-inf")

    def is_stale(self) -> bool:
        return time.monotonic() - self._loaded_at > CACHE_SECONDS

    def reload(self) -> None:
        """Read every binding and server admin (in a worker thread: this queries the database)."""
        with self._db.session() as session:
            roles: dict[str, dict[str, int]] = {}
            for binding in session.scalars(select(AccessBinding)):
                folders = roles.setdefault(binding.principal_id, {})
                folders[binding.folder_id] = max(folders.get(binding.folder_id, 0), RANK.get(binding.role, 0))
            admins = frozenset(session.scalars(select(Principal.id).where(Principal.server_admin.is_(True))))
        with self._lock:
            self._roles, self._admins, self._loaded_at = roles, admins, time.monotonic()

    def refresh(self) -> None:
        """Reload if stale; in a worker thread (the management routes' dependency calls it once per request)."""
        if self.is_stale():
            self.reload()

    async def refresh_async(self) -> None:
        """Reload if stale, off the event loop (the execute path)."""
        if self.is_stale():
            await asyncio.to_thread(self.reload)

    def is_server_admin(self, caller: Caller) -> bool:
        return caller.principal_id in self._admins

    def role(self, caller: Caller, folder_id: str) -> Role | None:
        """The highest role the caller holds on the folder, if any."""
        if self.is_server_admin(caller):
            return "admin"
        rank = self._roles.get(caller.principal_id, {}).get(folder_id, 0)
        return ROLES[rank - 1] if rank else None

    def has(self, caller: Caller, folder_id: str, role: Role) -> bool:
        held = self.role(caller, folder_id)
        return held is not None and RANK[held] >= RANK[role]

    def folders(self, caller: Caller) -> set[str] | None:
        """The folders on which the caller holds any role; None for a server admin (every folder)."""
        if self.is_server_admin(caller):
            return None
        return set(self._roles.get(caller.principal_id, {}))

    def require(self, caller: Caller, folder_id: str, role: Role, action: str) -> None:
        """PermissionDenied unless the caller holds `role` (or more) on the folder."""
        if self.has(caller, folder_id, role):
            return
        held = self.role(caller, folder_id)
        raise PermissionDenied(
            f"{subject(caller)} may not {action} in folder {folder_id!r}: that needs the role {role!r} there, and it "
            f"has {repr(held) if held else 'no role'}. An admin of the folder can grant it: 'cellnode folder "
            f"add-access-binding {folder_id} --role {role} --subject {subject(caller)}'."
        )

    def require_server_admin(self, caller: Caller, action: str) -> None:
        if not self.is_server_admin(caller):
            raise PermissionDenied(
                f"{subject(caller)} may not {action}: only a server admin may. A server admin can make one with "
                "'cellnode iam create-user NAME --server-admin'."
            )

    def may_call(self, caller: Caller, folder_id: str) -> bool:
        """The reference's rule for calling a node or alias from a folder (already in its ACL): `developer` or more on
        that folder, or a service account that lives in it."""
        if caller.kind == "serviceAccount" and caller.folder_id == folder_id:
            return True
        return self.has(caller, folder_id, "developer")
