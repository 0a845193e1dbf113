"""`Client` methods for secrets."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from cellnode._client.base import BaseClient, folder_params


class SecretMethods(BaseClient):
    """Secrets of a folder: created, listed, changed and deleted; their values are never read back."""

    def create_secret(
        self, name: str, value: str, *, description: str = "", folder_id: str | None = None
    ) -> dict[str, Any]:
        """A new secret in a folder (admin there). The answer, as every later one, shows the value as `***`."""
        body = {"name": name, "value": value, "description": description, "folder_id": folder_id}
        return self._request("POST", "/cellnode/v1/secrets", json=body)

    def list_secrets(self, *, folder_id: str | None = None) -> list[dict[str, Any]]:
        """The secrets of a folder, without their values."""
        result: list[dict[str, Any]] = self._request("GET", "/cellnode/v1/secrets", params=folder_params(folder_id))[
            "secrets"
        ]
        return result

    def get_secret(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        """A secret's metadata (ID or name); never its value."""
        return self._request("GET", f"/cellnode/v1/secrets/{quote(ref, safe='')}", params=folder_params(folder_id))

    def update_secret(
        self, ref: str, *, value: str | None = None, description: str | None = None, folder_id: str | None = None
    ) -> dict[str, Any]:
        """A new value (bumps `version`; nodes get it in instances started from now on, as at their next roll:
        `update_node(ref, roll=True)`), a new description, or both."""
        changes = {key: val for key, val in (("value", value), ("description", description)) if val is not None}
        path = f"/cellnode/v1/secrets/{quote(ref, safe='')}"
        return self._request("PATCH", path, json=changes, params=folder_params(folder_id))

    def delete_secret(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        """Delete a secret; FailedPrecondition naming the nodes that still use it."""
        return self._request("DELETE", f"/cellnode/v1/secrets/{quote(ref, safe='')}", params=folder_params(folder_id))
