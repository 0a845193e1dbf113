"""What every group of `Client` methods builds on: the connection, the management API's JSON requests and
their errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from cellnode.exceptions import APIError, InternalError, TransportError


class BaseClient:
    """The HTTP connection that `Client.__init__` opens, and requests over it."""

    url: str
    _http: httpx.Client

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        with self._transport_errors(method, path):
            response = self._http.request(
                method,
                path,
                json=json,
                params=params,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.is_success:
            if not isinstance(body, dict):
                raise InternalError(
                    f"{method} {path} answered {response.status_code} with a body that is not an object."
                )
            return body
        raise APIError.from_status(response.status_code, body)

    @contextmanager
    def _transport_errors(self, method: str, path: str) -> Iterator[None]:
        """httpx's errors as our TransportError, which says what to check."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise TransportError(f"{self.url} did not answer {method} {path} in time: {exc}.") from exc
        except httpx.HTTPError as exc:
            raise TransportError(
                f"Cannot reach the cellnode server at {self.url}: {exc}. Is 'cellnode serve' running? "
                "Set the address with --url or CELLNODE_URL."
            ) from exc


def folder_params(folder_id: str | None) -> dict[str, str] | None:
    return {"folder_id": folder_id} if folder_id else None
