"""The SDK: `cellnode.Client` over the public HTTP API. The CLI uses nothing else.

Example:
    >>> from cellnode import Client
    >>> client = Client()  # URL and key from CELLNODE_URL / CELLNODE_TOKEN, or the profile `serve` wrote
    >>> node = client.get_node("randomizer-node")
    >>> client.execute(node["id"], {"input_data": {"left_bound": 1, "right_bound": 10}})
    {'output_data': {'generated_value': 6}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

from cellnode._client.alias import ROUTE_KEY_HEADER, AliasMethods, Shares
from cellnode._client.checkpoint import CheckpointMethods
from cellnode._client.iam import IAMMethods
from cellnode._client.node import SIZE_FIELDS, NodeMethods, Variables
from cellnode._client.secret import SecretMethods
from cellnode.config import DEFAULT_PORT, default_profile_path
from cellnode.exceptions import APIError, ConfigError, InvalidArgument, NotFound
from cellnode.iam.formats import authorization

__all__ = [
    "DEFAULT_URL",
    "OWN_PREFIXES",
    "ROUTE_KEY_HEADER",
    "SIZE_FIELDS",
    "Client",
    "Shares",
    "Variables",
    "resolve_connection",
]

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
OWN_PREFIXES = ("/cellnode/v1/", "/datasphere/v1/")  # cellnode's own API: never passed through to a node


def resolve_connection(url: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """URL and credential: arguments, then CELLNODE_URL / CELLNODE_TOKEN, then the profile `serve` wrote."""
    url = url or os.environ.get("CELLNODE_URL")
    token = token or os.environ.get("CELLNODE_TOKEN")
    if url is None or token is None:
        profile_path = default_profile_path()
        if profile_path.exists():
            try:
                profile = json.loads(profile_path.read_text())
                url = url or profile.get("url")
                # The profile's key goes only to the profile's server, never to a URL given elsewhere.
                if token is None and profile.get("key_file") and url == profile.get("url"):
                    token = Path(profile["key_file"]).read_text().strip()
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"Cannot read the profile {str(profile_path)!r}: {exc}. "
                    "Fix or delete it, or pass --url and --token."
                ) from exc
    return (url or DEFAULT_URL).rstrip("/"), token


class Client(IAMMethods, SecretMethods, CheckpointMethods, NodeMethods, AliasMethods):
    """A synchronous client of a cellnode server.

    Parameters:
        url: the server, e.g. `http://127.0.0.1:8080`. Default: CELLNODE_URL, then the profile.
        token: an API key or an IAM token. Default: CELLNODE_TOKEN, then the key file named in the profile.
        timeout: seconds to wait for an answer; checkpoint capture passes its own, longer one.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0) -> None:
        self.url, self._token = resolve_connection(url, token)
        headers = {"Authorization": authorization(self._token)} if self._token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        # `request()`'s pass-through headers by (node, folder_id, alias): one lookup per node and client.
        self._targets: dict[tuple[str, str | None, bool], dict[str, str]] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(
        self,
        node: str,
        method: str,
        path: str,
        *,
        folder_id: str | None = None,
        alias: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """Call a docker node's own service (or a docker alias's, with `alias=True`) through the pass-through: the
        request goes out with `x-node-id` (or `x-node-alias`) and `x-folder-id`, and the service's answer comes back
        as it is, whatever its status: check it as you would any `httpx.Response`.

        Parameters:
            node: node ID or name; with `alias`, a routing name (`datasphere.user.NAME`), a name or an ID.
            method, path: what the service gets (not under `/cellnode/v1/` or `/datasphere/v1/`, cellnode's own).
            folder_id: the folder to call from (`x-folder-id`), and where to find a node or alias by name.
                Default: the node's (alias's) own folder. Looked up once per client and kept until a NotFound.
            kwargs: passed to `httpx.Client.request`: `params`, `headers`, `json`, `content`, `timeout`, ...

        Raises the matching APIError only when cellnode itself answered with its own error (no instance took the
        request: NotFound, PermissionDenied, Unavailable while the node starts, DeadlineExceeded past the node's
        timeout, ...), which it recognizes by the `x-cellnode-error` header that only cellnode's own errors carry.
        TransportError if the server cannot be reached, or drops the connection once the service's answer has
        started.

        Example:
            >>> client.request("model", "POST", "/predict", json={"x": 1}).json()
            {'y': 2}
        """
        if not path.startswith("/"):
            path = "/" + path
        if path.startswith(OWN_PREFIXES):
            raise InvalidArgument(
                f"Path {path!r} is under cellnode's own API, which never passes through to a node; give the path "
                "the service answers."
            )
        key = (node, folder_id, alias)
        target = self._targets.get(key) or self._target(node, folder_id, alias)
        headers = httpx.Headers(kwargs.pop("headers", None))
        headers.update(target)
        with self._transport_errors(method, path):
            response = self._http.request(method, path, headers=headers, **kwargs)
        error = _cellnode_error(response)
        if error is None:
            self._targets[key] = target
            return response
        if isinstance(error, NotFound):
            self._targets.pop(key, None)  # the node may have gone, or come back under the same name
        raise error

    def _target(self, ref: str, folder_id: str | None, alias: bool) -> dict[str, str]:
        """The pass-through headers that name a node (or alias) and the folder it is called from."""
        if not alias:
            found = self.get_node(ref, folder_id=folder_id)
            return {"x-node-id": found["id"], "x-folder-id": folder_id or found["folder_id"]}
        routing_name, folder = ref, folder_id
        if "." not in ref or folder_id is None:
            try:
                found = self.get_alias(ref, folder_id=folder_id)
            except NotFound:
                if "." not in ref:
                    raise
                # A public alias of another folder: callable, not readable.
            else:
                routing_name, folder = found["routing_name"], folder_id or found["folder_id"]
        return {"x-node-alias": routing_name} | ({"x-folder-id": folder} if folder else {})


def _cellnode_error(response: httpx.Response) -> APIError | None:
    """The error in a pass-through answer, if cellnode gave it rather than the service: only cellnode's own errors
    carry `x-cellnode-error` (the pass-through drops it from services' answers)."""
    if "x-cellnode-error" not in response.headers:
        return None
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return APIError.from_status(response.status_code, body)
