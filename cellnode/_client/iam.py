"""`Client` methods for folders, IAM (users, service accounts, API keys, access bindings), specs, usage and
audit."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

from cellnode._client.base import BaseClient, folder_params


class IAMMethods(BaseClient):
    """Folders, principals and their keys, roles on folders; specs, usage and the audit log."""

    def list_folders(self) -> list[dict[str, Any]]:
        folders: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/folders")["folders"]
        return folders

    def create_token(self) -> dict[str, Any]:
        """A new IAM token (`{"iam_token": ..., "expires_at": ...}`), valid 12 hours."""
        return self._request("POST", "/cellnode/v1/iam/tokens")

    def create_folder(self, name: str, *, description: str = "") -> dict[str, Any]:
        """A new folder (server admins only)."""
        return self._request("POST", "/cellnode/v1/folders", json={"name": name, "description": description})

    def get_folder(self, ref: str) -> dict[str, Any]:
        return self._request("GET", f"/cellnode/v1/folders/{quote(ref, safe='')}")

    def update_folder(self, ref: str, *, name: str | None = None, description: str | None = None) -> dict[str, Any]:
        changes = {key: value for key, value in (("name", name), ("description", description)) if value is not None}
        return self._request("PATCH", f"/cellnode/v1/folders/{quote(ref, safe='')}", json=changes)

    def delete_folder(self, ref: str) -> dict[str, Any]:
        """Delete an empty folder (server admins only)."""
        return self._request("DELETE", f"/cellnode/v1/folders/{quote(ref, safe='')}")

    def list_access_bindings(self, folder: str) -> list[dict[str, Any]]:
        path = f"/cellnode/v1/folders/{quote(folder, safe='')}/access-bindings"
        bindings: list[dict[str, Any]] = self._request("GET", path)["bindings"]
        return bindings

    def add_access_binding(self, folder: str, *, role: str, subject: str) -> dict[str, Any]:
        """Grant `role` (viewer, developer, admin) on the folder to `subject` (serviceAccount:ID or user:ID)."""
        path = f"/cellnode/v1/folders/{quote(folder, safe='')}/access-bindings"
        return self._request("POST", path, json={"role": role, "subject": subject})

    def remove_access_binding(self, folder: str, *, role: str, subject: str) -> dict[str, Any]:
        path = f"/cellnode/v1/folders/{quote(folder, safe='')}/access-bindings"
        return self._request("DELETE", path, params={"role": role, "subject": subject})

    def whoami(self) -> dict[str, Any]:
        """The caller: its ID, kind, subject and roles by folder."""
        return self._request("GET", "/cellnode/v1/iam/whoami")

    def create_user(self, name: str, *, description: str = "", server_admin: bool = False) -> dict[str, Any]:
        body = {"name": name, "description": description, "server_admin": server_admin}
        return self._request("POST", "/cellnode/v1/iam/users", json=body)

    def list_users(self) -> list[dict[str, Any]]:
        users: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/iam/users")["principals"]
        return users

    def delete_user(self, user_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/cellnode/v1/iam/users/{quote(user_id, safe='')}")

    def create_service_account(
        self, name: str, *, folder_id: str | None = None, description: str = ""
    ) -> dict[str, Any]:
        body = {"name": name, "folder_id": folder_id, "description": description}
        return self._request("POST", "/cellnode/v1/iam/service-accounts", json=body)

    def list_service_accounts(self, *, folder_id: str | None = None) -> list[dict[str, Any]]:
        answer = self._request("GET", "/cellnode/v1/iam/service-accounts", params=folder_params(folder_id))
        accounts: list[dict[str, Any]] = answer["principals"]
        return accounts

    def delete_service_account(self, account_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/cellnode/v1/iam/service-accounts/{quote(account_id, safe='')}")

    def create_api_key(self, *, principal_id: str | None = None, description: str = "") -> dict[str, Any]:
        """A new API key (for the caller, or a principal it manages); `secret` is in this answer only."""
        body = {"principal_id": principal_id, "description": description}
        return self._request("POST", "/cellnode/v1/iam/api-keys", json=body)

    def list_api_keys(self, *, principal_id: str | None = None) -> list[dict[str, Any]]:
        params = {"principal_id": principal_id} if principal_id else None
        keys: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/iam/api-keys", params=params)["api_keys"]
        return keys

    def revoke_api_key(self, key_id: str) -> dict[str, Any]:
        """Revoke a key and the IAM tokens made from it."""
        return self._request("DELETE", f"/cellnode/v1/iam/api-keys/{quote(key_id, safe='')}")

    def list_specs(self) -> dict[str, Any]:
        """The instance specs the server offers (`specs`), its CPUs and GPUs, and its overcommit `policy`."""
        return self._request("GET", "/cellnode/v1/specs")

    def usage(
        self, *, folder_id: str | None = None, node_id: str | None = None, since: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Instance uptime and units per node (and spec) of a folder, since a time."""
        params = {key: value for key, value in (("folder_id", folder_id), ("node_id", node_id)) if value}
        if since is not None:
            params["since"] = since.isoformat()
        result: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/usage", params=params)["usage"]
        return result

    def audit(
        self, folder_id: str | None = None, *, since: datetime | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Audit events, newest first (`at`, `subject`, `action`, `resource`, `result`, `code`, `client`, ...): of a
        folder you are an admin of, or of every such folder (a server admin: all). `limit` is at most 10000."""
        params = {"limit": str(limit)} | ({"folder_id": folder_id} if folder_id else {})
        if since is not None:
            params["since"] = since.isoformat()
        events: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/audit", params=params)["events"]
        return events
