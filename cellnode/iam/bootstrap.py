"""First start: the default folder, an admin service account, and its API key in a 0600 file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from cellnode._files import atomic_file
from cellnode.iam.credentials import digest, new_api_key
from cellnode.store.db import Database
from cellnode.store.models import AccessBinding, ApiKey, Folder, Principal

DEFAULT_FOLDER = "default"
ADMIN_ACCOUNT = "admin"


@dataclass(frozen=True)
class Bootstrap:
    folder_id: str
    admin_id: str
    new_key: str | None  # the admin key, only on the start that created it


def bootstrap(db: Database, key_path: Path) -> Bootstrap:
    """Create the default folder and the admin account once; later starts find them."""
    with db.session() as session:
        folder = session.scalar(select(Folder).where(Folder.name == DEFAULT_FOLDER))
        if folder is None:
            folder = Folder(name=DEFAULT_FOLDER, description="Created at first start.")
            session.add(folder)
            session.flush()
        admin = session.scalar(
            select(Principal).where(Principal.name == ADMIN_ACCOUNT, Principal.folder_id == folder.id)
        )
        if admin is not None:
            return Bootstrap(folder.id, admin.id, None)
        admin = Principal(
            kind="serviceAccount",
            name=ADMIN_ACCOUNT,
            folder_id=folder.id,
            server_admin=True,
            description="Made at first start; a server admin.",
        )
        session.add(admin)
        session.flush()
        session.add(AccessBinding(folder_id=folder.id, role="admin", principal_id=admin.id))
        key = new_api_key()
        session.add(ApiKey(principal_id=admin.id, secret_hash=digest(key), description="first admin key"))
        # Write the file before the commit: if it fails, nothing is half-made.
        write_private(key_path, key + "\n")
        return Bootstrap(folder.id, admin.id, key)


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_file(path, 0o600) as handle:
        handle.write(text.encode())
