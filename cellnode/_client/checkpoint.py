"""`Client` methods for checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from cellnode._client.base import BaseClient, folder_params
from cellnode.exceptions import ConfigError


class CheckpointMethods(BaseClient):
    """Checkpoints: captured from a notebook on the server, pinned, listed and deleted."""

    def create_checkpoint(
        self,
        notebook: str | Path,
        *,
        cell: int | None = None,
        name: str | None = None,
        folder_id: str | None = None,
        timeout: float = 900.0,
    ) -> dict[str, Any]:
        """Run the notebook's code cells 1..`cell` in a fresh kernel on the server and save its state."""
        path = Path(notebook)
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read the notebook {str(path)!r}: {exc}.") from exc
        body = {"notebook": content, "notebook_name": path.name, "cell": cell, "name": name, "folder_id": folder_id}
        return self._request("POST", "/cellnode/v1/checkpoints", json=body, timeout=timeout)

    def list_checkpoints(self, *, folder_id: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request(
            "GET", "/cellnode/v1/checkpoints", params=folder_params(folder_id)
        )["checkpoints"]
        return result

    def get_checkpoint(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        return self._request("GET", f"/cellnode/v1/checkpoints/{quote(ref, safe='')}", params=folder_params(folder_id))

    def pin_checkpoint(self, ref: str, name: str, *, folder_id: str | None = None) -> dict[str, Any]:
        return self._request(
            "POST",
            f"/cellnode/v1/checkpoints/{quote(ref, safe='')}:pin",
            json={"name": name},
            params=folder_params(folder_id),
        )

    def unpin_checkpoint(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        return self._request(
            "POST", f"/cellnode/v1/checkpoints/{quote(ref, safe='')}:unpin", params=folder_params(folder_id)
        )

    def delete_checkpoint(self, ref: str, *, folder_id: str | None = None) -> dict[str, Any]:
        return self._request(
            "DELETE", f"/cellnode/v1/checkpoints/{quote(ref, safe='')}", params=folder_params(folder_id)
        )
