"""cellnode: turn a notebook cell, with the interpreter state it ran in, into an authenticated API service.

The public SDK surface is imported lazily, so that `python -m cellnode.runtime` (which runs inside instances,
with only the standard library and cloudpickle) does not import the server's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cellnode._version import __version__

if TYPE_CHECKING:
    from cellnode.client import Client
    from cellnode.exceptions import (
        APIError,
        CellExecutionError,
        CellnodeError,
        DeadlineExceeded,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        TransportError,
        Unauthenticated,
        Unavailable,
    )

__all__ = [
    "APIError",
    "CellExecutionError",
    "CellnodeError",
    "Client",
    "DeadlineExceeded",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from cellnode.client import Client

        return Client
    if name in __all__:
        from cellnode import exceptions

        return getattr(exceptions, name)
    raise AttributeError(f"module 'cellnode' has no attribute {name!r}")
